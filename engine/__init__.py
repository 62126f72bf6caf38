"""blendgate's local inference engine: weights, model runner, scheduler and sampling."""
