"""GPU tests: run on the device machine with `pytest tests/gpu --confcutdir tests/gpu`. Each test module
skips itself without CUDA (`pytestmark`); a collection hook here would reach every test of the session.
Shared here: the tiny random-weight Llama that the SGLang tests load (test_sglang_worker.py, test_sglang_http.py)."""

from __future__ import annotations

import json

import pytest
import torch

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.for_model("llama", **SHAPE).to_dict()
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    h, i, v, d = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], 64
    q, kv = SHAPE["num_attention_heads"] * d, SHAPE["num_key_value_heads"] * d

    def tensor(*shape, scale=0.08):
        return (torch.randn(*shape, generator=generator) * scale).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": tensor(v, h, scale=1.0), "lm_head.weight": tensor(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        weights.update({p + "self_attn.q_proj.weight": tensor(q, h), p + "self_attn.k_proj.weight": tensor(kv, h),
                        p + "self_attn.v_proj.weight": tensor(kv, h), p + "self_attn.o_proj.weight": tensor(h, q),
                        p + "mlp.gate_proj.weight": tensor(i, h), p + "mlp.up_proj.weight": tensor(i, h),
                        p + "mlp.down_proj.weight": tensor(h, i),
                        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save_file(weights, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="session")
def prompt():
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(10, SHAPE["vocab_size"], (n,), generator=generator).tolist()  # noqa: E731
    system, chunks, question = draw(32), [draw(64) for _ in range(4)], draw(16)
    ids = system + [t for c in chunks for t in c] + question
    spans = [s for n in range(4) for s in (32 + 64 * n, 32 + 64 * (n + 1))]
    return ids, spans
