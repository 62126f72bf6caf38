"""The tiny random-weight Llama-family configuration the GPU tests build their models from (one place for it)."""

from __future__ import annotations


def tiny_config(model_type: str = "llama", max_positions: int = 4096):
    """4 layers, 8 query heads over 2 KV heads of 32, vocabulary 512: a transformers config of `model_type`."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=512, hidden_size=256, intermediate_size=512,
                                num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                max_position_embeddings=max_positions)
