"""The probe pass replayed from CUDA graphs (chunkcache/probe.py: ProbeGraphs) against the same pass launched
op by op: the same scores for prompts of any shape (padded to the graphs' buckets; the graphs' attention is
kernels/probe_attention.py, the eager pass's the sparse kernel and attention_mass), replays that read the new
prompt rather than the one captured, and blends that select the same tokens."""

from __future__ import annotations

import pytest
import torch
from blendgate.chunkcache.blend import ChunkKV, ChunkLoader, _layout, blend_prefill, precompute_chunk
from blendgate.chunkcache.probe import ProbeGraphs, probe_eager
from blendgate.chunkcache.selection import DEFAULT_RULE, SelectionRule
from blendgate.engine.llama import LlamaFamilyModel
from tiny_models import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")



@pytest.fixture(scope="module")
def model() -> LlamaFamilyModel:
    return LlamaFamilyModel.random(tiny_config(max_positions=8192), device="cuda", dtype=torch.bfloat16, seed=5)


def prompt(model: LlamaFamilyModel, seed: int, chunks: int, length: int, question: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, 512, (length + i,), generator=generator).tolist() for i in range(chunks)]
    segments: list = [torch.randint(0, 512, (9,), generator=generator).tolist()]
    for chunk in ids:
        segments += [precompute_chunk(model, chunk), [1, 2]]  # a marker after each chunk, as the template has
    segments.append(torch.randint(0, 512, (question,), generator=generator).tolist())
    return segments


def both_probes(model: LlamaFamilyModel, segments: list, layers: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(segments, None)
    total = len(layout.ids)
    positions = torch.arange(total, device="cuda")
    cos, sin = model.rope(positions)
    ids = layout.ids.to("cuda")
    rows = layout.other_rows.to("cuda")
    cache = model.new_cache(total)
    cache.positions[:total], cache.length = positions, total
    loader = ChunkLoader(cache, layout.placements, cos, sin, 0)
    with torch.no_grad():
        eager = probe_eager(model, ids, rows, len(layout.vote_rows), total, cache, loader.ready, cos, sin, layers)
        graphs = ProbeGraphs.for_model(model)
        with graphs.arena_for(total, rows.shape[0]) as arena:
            loader = ChunkLoader(arena, layout.placements, cos, sin, 0)
            graphed = graphs.probe(ids, rows, len(layout.vote_rows), total, cos, sin, loader.ready, layers).clone()
    chunk = layout.chunk_rows.to("cuda")
    return eager[chunk], graphed[chunk]


@pytest.mark.parametrize("chunks,length,question,layers", [(3, 100, 7, 4), (5, 301, 33, 4), (2, 40, 1, 2),
                                                           (9, 130, 17, 3), (4, 200, 20, [0, 2])])
def test_graphs_give_the_scores_of_the_eager_probe(model, chunks, length, question, layers) -> None:
    assert ProbeGraphs.usable(model)
    eager, graphed = both_probes(model, prompt(model, chunks, chunks, length, question), layers)
    assert not graphed.isnan().any()
    # Padding changes the reduction order only (bfloat16 scores, float32 sums).
    assert float((graphed - eager).norm() / eager.norm()) < 1e-2
    top = max(1, eager.numel() // 7)
    same = set(torch.topk(eager, top).indices.tolist()) & set(torch.topk(graphed, top).indices.tolist())
    assert len(same) >= 0.9 * top


def test_a_replay_reads_the_new_prompt_not_the_captured_one(model) -> None:
    first = prompt(model, 11, 4, 200, 12)
    second = prompt(model, 12, 4, 210, 14)  # the same buckets: replays the graphs captured for `first`
    graphs = ProbeGraphs.for_model(model)
    both_probes(model, first, 4)
    kept = len(graphs.captured)
    eager, graphed = both_probes(model, second, 4)
    assert len(graphs.captured) == kept
    assert float((graphed - eager).norm() / eager.norm()) < 1e-2


@pytest.mark.parametrize("on_cpu,rule", [(False, SelectionRule("attention")), (True, SelectionRule("attention")),
                                         (False, DEFAULT_RULE)], ids=["gpu", "cpu", "default-rule"])
def test_a_blend_with_graphs_selects_what_the_eager_probe_selects(model, on_cpu, rule) -> None:
    """The default rule's probe runs every probe_stride-th layer (the residual stream going on past the others)."""
    segments = prompt(model, 21, 6, 250, 20)
    if on_cpu:  # chunks streamed from pinned CPU memory during the probe
        segments = [ChunkKV(s.token_ids, s.keys.cpu().pin_memory(), s.values.cpu().pin_memory())
                    if isinstance(s, ChunkKV) else s for s in segments]
    graphed = blend_prefill(model, segments, 0.15, rule=rule, probe_graphs=True)
    eager = blend_prefill(model, segments, 0.15, rule=rule, probe_graphs=False)
    assert graphed.recomputed_chunk_tokens == eager.recomputed_chunk_tokens
    chosen, expected = set(graphed.selected_rows.tolist()), set(eager.selected_rows.tolist())
    assert len(chosen & expected) >= 0.9 * len(expected)
    assert graphed.cache.length == eager.cache.length
    torch.testing.assert_close(graphed.logits, eager.logits, atol=0.1, rtol=0.1)
    full = blend_prefill(model, segments, 1.0, rule=rule, probe_graphs=True)
    with torch.no_grad():
        layout = _layout(segments, None)
        reference = model.forward(layout.ids.to("cuda"), None, model.new_cache(len(layout.ids)))[-1]
    torch.testing.assert_close(full.logits, reference, atol=5e-2, rtol=5e-2)


def test_graphs_are_captured_while_another_thread_works_on_the_gpu() -> None:
    """A gateway captures the probe's graphs on its engine thread while other threads use the same GPU (the
    shared tier's writer encoding an entry and waiting for it). Captured in global mode, such a wait invalidated
    the capture and aborted the process (bench/fetch_ttft.py on SmolLM2, H200, 2026-12-01); a device-wide wait
    is refused during any capture. The other thread's work goes under kernels.graph_capture.gpu_work, as the
    writer's does."""
    import threading

    from blendgate.kernels.graph_capture import gpu_work

    fresh = LlamaFamilyModel.random(tiny_config(max_positions=8192), device="cuda", dtype=torch.bfloat16, seed=6)
    stop, errors = threading.Event(), []

    def busy() -> None:
        x = torch.randn(512, 512, device="cuda")
        try:
            while not stop.is_set():
                with gpu_work():
                    (x @ x).sum().item()
                    torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        for seed in range(3):  # new shapes: each blend captures graphs of its own
            segments = prompt(fresh, 40 + seed, 3 + seed, 150 + 60 * seed, 10 + seed)
            result = blend_prefill(fresh, segments, 0.15, rule=DEFAULT_RULE, probe_graphs=True)
            assert not result.logits.isnan().any()
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert ProbeGraphs.for_model(fresh).captured
