"""bench/specache.py's pieces on CPU with a small random model: the SpeCache row runs and reports fewer GPU KV
bytes than full KV's, plain eviction's settings leave one top-k pair, and the items place the gold passage at
its depth among the others."""

from __future__ import annotations

import gzip
import json

import torch
from bench_modules import bench_module
from blendgate.engine.llama import LlamaFamilyModel

specache = bench_module("specache.py")


def test_the_specache_row_runs_with_fewer_gpu_bytes_than_full_kv() -> None:
    from transformers import AutoConfig

    spec = dict(specache.SMOKE_CONFIG)
    model = LlamaFamilyModel.random(AutoConfig.for_model(spec.pop("model_type"), **spec), device="cpu",
                                    dtype=torch.float32)
    settings = specache.SpeCacheSettings(enabled=True, min_context_tokens=1, gpu_budget_fraction=1 / 4, bits=2,
                                         group=32, recent_tokens=64)
    with torch.inference_mode():
        run = specache.specache_rate(model, 512, settings, steps=2, warmup=1)
        rate, host_ms, hit_rate, host_bytes = run.rate, run.host_ms, run.hit_rate, run.host_bytes
        assert specache.full_kv_rate(model, 512, steps=2, warmup=1) > 0
    assert rate > 0 and host_ms > 0 and 0 <= hit_rate <= 1
    assert 0 < run.copied_share <= 2  # the step's misses and the prefetch: each at most the top-k
    gpu = specache.gpu_kv_bytes(settings, 512, specache.kv_shape(model))
    assert gpu.total < gpu.full == 512 * specache.kv_shape(model).pair_bytes <= host_bytes


def test_eviction_keeps_the_sinks_and_a_window_of_the_budget() -> None:
    budget = specache.evicting(200).budget(4000)
    assert (budget.sink_tokens, budget.recent_tokens, budget.top_k) == (4, 195, 1)


def test_items_put_the_gold_passage_at_its_depth(tmp_path) -> None:
    path = tmp_path / "nq.jsonl.gz"
    with gzip.open(path, "wt") as out:
        for i in range(30):
            out.write(json.dumps({"question": f"q{i}", "answers": [f"a{i}"],
                                  "ctxs": [{"title": f"t{i}", "text": f"passage {i}"}]}) + "\n")
    for number, (question, answers, passages) in enumerate(specache.items(path, 4, 5, seed=1)):
        i = int(question[1:])
        assert answers == [f"a{i}"] and len(passages) == 5 and len(set(passages)) == 5
        assert passages[number % 5] == f"t{i}. passage {i}"
        assert specache.contains(f"It is A{i}.", answers) and not specache.contains("no", answers)
