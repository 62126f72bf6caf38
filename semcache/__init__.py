"""Category-aware semantic cache: answers paraphrases of earlier questions without the model."""
