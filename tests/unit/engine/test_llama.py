"""Our Llama-family forward pass against transformers' own models: same logits within float tolerance."""

from __future__ import annotations

import pytest
import torch
from blendgate.engine.llama import LlamaFamilyModel


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    settings = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    settings.update(overrides)
    return AutoConfig.for_model(model_type, **settings)


CONFIGS = {
    "llama-gqa": tiny_config("llama"),
    "llama3-rope-scaling": tiny_config("llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2-bias": tiny_config("qwen2", tie_word_embeddings=True),
    "mistral": tiny_config("mistral", num_key_value_heads=4, sliding_window=None),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_on_tiny_random_models(name: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(CONFIGS[name]).eval()
    ours = LlamaFamilyModel.from_transformers(reference)
    ids = torch.randint(0, 300, (40,))
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]
        got = ours.forward(ids, torch.arange(40), ours.new_cache(8), last_only=False)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_on_smollm2_real_prompts(loaded_model) -> None:
    tokenizer, reference = loaded_model.tokenizer, loaded_model.model
    ours = LlamaFamilyModel.from_transformers(reference)
    for question in ("What is the capital of France?", "Write a haiku about the sea, then explain it."):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        with torch.inference_mode():
            expected = reference(ids[None]).logits[0]
            # Prefill half, then decode the rest one token at a time through the cache.
            cache = ours.new_cache(4)
            half = len(ids) // 2
            pieces = [ours.forward(ids[:half], torch.arange(half), cache, last_only=False)]
            pieces += [ours.forward(ids[t:t + 1], torch.tensor([t]), cache) for t in range(half, len(ids))]
        torch.testing.assert_close(torch.cat(pieces), expected, atol=2e-4, rtol=1e-4)


def test_random_weights_follow_the_config_shapes() -> None:
    config = CONFIGS["qwen2-bias"]
    model = LlamaFamilyModel.random(config, device="cpu", dtype=torch.bfloat16)
    logits = model.forward(torch.tensor([1, 2, 3]), torch.arange(3), model.new_cache(2))
    assert logits.shape == (1, 300) and torch.isfinite(logits).all()
    assert model.layers[0].qkv_bias is not None and model.lm_head is model.embed_tokens


def test_unsupported_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="not a Llama-family"):
        LlamaFamilyModel(tiny_config("gpt2", n_layer=1), {}, device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("name", ["llama-gqa", "llama3-rope-scaling"])
def test_the_rope_table_gives_the_rotation_of_each_position(name: str) -> None:
    model = LlamaFamilyModel.random(CONFIGS[name], device="cpu", dtype=torch.float32)
    for length in (5, 300, 9000):  # the last grows the table past its first size
        cos, sin = model.rope_table(length)
        expected_cos, expected_sin = model.rope(torch.arange(length))
        assert cos.shape == (length, model.head_dim)
        torch.testing.assert_close(cos, expected_cos)
        torch.testing.assert_close(sin, expected_sin)
