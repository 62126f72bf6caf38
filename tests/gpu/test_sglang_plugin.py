"""Issue 7's acceptance on the GPU: SGLang 0.5.15 with blendgate's plugin against stock SGLang and against the
local engine's blend, on a tiny random-weight Llama (the same safetensors file loaded by all three).

- recompute ratio 1.0: the plugin's prefill (blendgate's kernels, KV written into SGLang's pool) gives stock
  SGLang's next-token log-probabilities, and decoding over that pool continues as stock SGLang does;
- ratio 0.15: the plugin gives the local engine's blend (ChunkBlender on the same weights), and reports it.

Needs CUDA and SGLang (bench/device/sglang_bundle.sh brings it to the GPU machine); skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs SGLang")]

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
TOP = 20


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(1)
    draw = lambda n: torch.randint(10, SHAPE["vocab_size"], (n,), generator=generator).tolist()  # noqa: E731
    system, chunks, question = draw(32), [draw(64) for _ in range(4)], draw(16)
    ids = system + [t for c in chunks for t in c] + question
    spans = [s for n in range(4) for s in (32 + 64 * n, 32 + 64 * (n + 1))]
    return ids, spans


def generate(model_dir, plugin: bool, requests: list[dict]) -> list[dict]:
    import sglang

    os.environ["BLENDGATE_SGLANG_PLUGIN"] = "1" if plugin else "0"  # read by SGLang's scheduler process
    engine = sglang.Engine(model_path=str(model_dir), skip_tokenizer_init=True, disable_radix_cache=True,
                           mem_fraction_static=0.3, dtype="bfloat16", random_seed=0, log_level="error",
                           disable_cuda_graph=True)
    try:
        return [engine.generate(**request) for request in requests]
    finally:
        engine.shutdown()


def request(ids, spans=None, ratio=None, tokens=6) -> dict:
    sampling = {"max_new_tokens": tokens, "temperature": 0.0}
    if spans:
        sampling["custom_params"] = {"blendgate_chunk_spans": spans, "blendgate_prefill_mode": "blend",
                                     "blendgate_recompute_ratio": ratio}
    return {"input_ids": ids, "sampling_params": sampling, "return_logprob": True, "top_logprobs_num": TOP}


def top_logprobs(output, step: int = 0) -> dict[int, float]:
    return {token: logprob for logprob, token, _ in output["meta_info"]["output_top_logprobs"][step]}


@pytest.fixture(scope="module")
def outputs(model_dir, prompt):
    ids, spans = prompt
    stock = generate(model_dir, False, [request(ids, spans, 1.0)])[0]  # a stock worker ignores the spans
    plugin = generate(model_dir, True, [request(ids, spans, 1.0), request(ids, spans, 0.15), request(ids)])
    return stock, plugin


def assert_close(ours: dict[int, float], theirs: dict[int, float], atol: float) -> None:
    shared = [t for t in theirs if t in ours]
    assert len(shared) >= TOP // 2, (ours, theirs)
    worst = max(abs(ours[t] - theirs[t]) for t in shared)
    assert worst <= atol, f"log-probabilities differ by up to {worst:.4f}"


def test_plugin_at_ratio_one_matches_stock_sglang_and_decodes_over_its_pool(outputs) -> None:
    stock, (full, _, _) = outputs
    report = full["meta_info"]["blendgate"][0]
    assert report["mode"] == "blend" and report["recompute_ratio"] == 1.0, report
    assert_close(top_logprobs(full), top_logprobs(stock), atol=0.05)
    # Decoding reads the KV the plugin wrote into SGLang's pool: the same tokens and log-probabilities follow
    # (compared while both pick the same tokens; bf16 near-ties may part them later).
    for step, (ours, theirs) in enumerate(zip(full["output_ids"], stock["output_ids"])):
        assert_close(top_logprobs(full, step), top_logprobs(stock, step), atol=0.05)
        if ours != theirs:
            break
    assert full["output_ids"][:2] == stock["output_ids"][:2]


def test_plugin_blend_matches_the_local_engine(outputs, model_dir, prompt) -> None:
    from blendgate.chunkcache.runner import ChunkBlender
    from blendgate.chunkcache.store import ChunkCacheStore, MemoryTier
    from blendgate.engine.llama import LlamaFamilyModel
    from blendgate.sglang_plugin.protocol import prompt_of
    from safetensors.torch import load_file
    from transformers import AutoConfig

    _, (_, blended, _) = outputs
    ids, spans = prompt
    config = AutoConfig.from_pretrained(model_dir)
    weights = {name: t.cuda() for name, t in load_file(str(model_dir / "model.safetensors")).items()}
    model = LlamaFamilyModel(config, weights, device=torch.device("cuda"), dtype=torch.bfloat16)
    blender = ChunkBlender(model, ChunkCacheStore([MemoryTier("gpu", 1 << 30, "cuda")]))
    custom = {"blendgate_chunk_spans": spans, "blendgate_prefill_mode": "blend", "blendgate_recompute_ratio": 0.15}
    with torch.inference_mode():
        result, local_report = blender.blend(prompt_of(ids, custom))
    local = torch.log_softmax(result.logits.float(), dim=-1)
    report = blended["meta_info"]["blendgate"][0]
    assert report["mode"] == "blend"
    assert report["recomputed_tokens"] == local_report["recomputed_tokens"] < report["chunk_tokens"] == 256
    assert_close({t: float(local[t]) for t in top_logprobs(blended)}, top_logprobs(blended), atol=0.05)


def test_requests_without_chunks_are_stock_sglang(outputs) -> None:
    _, (_, _, plain) = outputs
    assert "blendgate" not in plain["meta_info"]
    assert len(plain["output_ids"]) == 6
