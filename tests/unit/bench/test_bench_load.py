"""The load benchmark (bench/load.py): its seeded workload and Poisson arrivals, the per-rate summary worked out
by hand (a run against a worker: tests/e2e/test_load_bench_standin.py)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from bench_modules import bench_module

load = bench_module("load.py")


def test_the_workload_is_seeded_and_its_rag_requests_hold_their_chunks_at_their_spans() -> None:
    first = load.Workload(vocab=5000, chunk_pool=50, chunks=3, chunk_tokens=20, system_tokens=7, question_tokens=5,
                          chat_share=0.3, chat_tokens=11, seed=3)
    again = load.Workload(vocab=5000, chunk_pool=50, chunks=3, chunk_tokens=20, system_tokens=7, question_tokens=5,
                          chat_share=0.3, chat_tokens=11, seed=3)
    requests = [first.next() for _ in range(400)]
    assert [r.input_ids for r in requests[:20]] == [again.next().input_ids for _ in range(20)]
    kinds = Counter(r.kind for r in requests)
    assert 0.2 < kinds["chat"] / 400 < 0.4  # 30% chat, binomial spread
    for r in requests:
        if r.kind == "chat":
            assert len(r.input_ids) == 11 and r.chunk_spans == [] and r.body("blendgate")["sampling_params"].get(
                "custom_params") is None
            continue
        assert len(r.input_ids) == 7 + 3 * 20 + 5 and len(set(r.chunk_ids)) == 3
        spans = list(zip(r.chunk_spans[::2], r.chunk_spans[1::2]))
        assert spans == [(7, 27), (27, 47), (47, 67)]
        for (start, end), chunk in zip(spans, r.chunk_ids):  # the pool chunk's tokens, at its span
            assert r.input_ids[start:end] == first._pool[chunk].tolist()
        assert r.input_ids[:7] == first._system  # one system prompt for every RAG request
        params = r.body("blendgate")["sampling_params"]["custom_params"]
        assert params["blendgate_chunk_spans"] == r.chunk_spans
        assert "custom_params" not in r.body("stock")["sampling_params"]


def test_popular_chunks_are_drawn_more_often_and_arrivals_follow_the_rate() -> None:
    workload = load.Workload(vocab=5000, chunk_pool=200, chunks=2, chunk_tokens=4, chat_share=0.0, zipf=1.1, seed=1)
    drawn = Counter(c for _ in range(2000) for c in workload.next().chunk_ids)
    assert drawn[0] > drawn[10] > drawn[150]
    arrivals = workload.arrivals(rate=50, duration_s=100)
    assert arrivals == sorted(arrivals) and 0 < arrivals[0] and arrivals[-1] < 100
    assert abs(len(arrivals) - 5000) < 5 * 5000 ** 0.5  # Poisson: mean 5000, sd ~71
    with pytest.raises(ValueError):
        workload.arrivals(rate=0, duration_s=1)
    with pytest.raises(ValueError):
        load.Workload(chunk_pool=3, chunks=4)


def test_the_precompute_sends_every_pool_chunk_once_least_popular_first_and_leaves_the_sweep_unchanged() -> None:
    settings = dict(vocab=5000, chunk_pool=11, chunks=3, chunk_tokens=4, system_tokens=2, question_tokens=2,
                    answer_tokens=9, chat_share=0.3, seed=4)
    plain, precomputed = load.Workload(**settings), load.Workload(**settings)
    requests = precomputed.precompute_requests()
    assert [r.chunk_ids for r in requests] == [[10, 9, 8], [7, 6, 5], [4, 3, 2], [1, 0]]  # rank 0: most popular
    assert all(r.kind == "rag" and r.max_new_tokens == 1 for r in requests)
    for r in requests:  # each chunk's tokens at its span, after the workload's one system prompt
        assert r.input_ids[:2] == plain._system and len(r.input_ids) == 2 + 4 * len(r.chunk_ids) + 2
        for start, end, chunk in zip(r.chunk_spans[::2], r.chunk_spans[1::2], r.chunk_ids):
            assert r.input_ids[start:end] == plain._pool[chunk].tolist()
    # The measured requests are drawn as without a precompute.
    assert [plain.next().input_ids for _ in range(30)] == [precomputed.next().input_ids for _ in range(30)]


def test_the_summary_counts_percentiles_hits_and_the_sustained_rate() -> None:
    outcomes = [load.Outcome("rag", True, ttft_s=0.1 * (i + 1), itl_s=[0.01, 0.02], output_tokens=3, chunk_hits=i % 3,
                             chunks=2) for i in range(10)]
    outcomes += [load.Outcome("chat", True, ttft_s=0.05, output_tokens=3),
                 load.Outcome("rag", False, error="HTTP 503")]
    row = load.summarise(4.0, outcomes, wall_s=2.0)
    assert (row.sent, row.completed, row.failed) == (12, 11, 1)
    assert row.ttft_rag_p50_ms == pytest.approx(550.0) and row.ttft_rag_p99_ms == pytest.approx(991.0)
    assert row.ttft_chat_p50_ms == pytest.approx(50.0)
    assert row.itl_p50_ms == pytest.approx(15.0)
    assert row.output_tokens_per_s == pytest.approx(33 / 2.0)
    assert row.chunk_hit_rate == pytest.approx(sum(i % 3 for i in range(10)) / 20)
    assert row.errors == ("HTTP 503",)
    ok = load.RateSummary(2.0, 5, 5, 0, 100.0, 900.0, None, None, None, None, 10.0, None, ())
    slow = load.RateSummary(8.0, 5, 5, 0, 100.0, 1500.0, None, None, None, None, 10.0, None, ())
    assert load.sustained_rate([ok, row, slow], slo_ms=1000.0) == 2.0  # row failed one request
    assert load.sustained_rate([slow], slo_ms=1000.0) is None
    # A rate that meets the SLO again above one that missed does not count (a 15-s window's noise).
    again = load.RateSummary(12.0, 5, 5, 0, 100.0, 950.0, None, None, None, None, 10.0, None, ())
    assert load.sustained_rate([again, slow, ok], slo_ms=1000.0) == 2.0
    assert load.highest_rate_meeting([again, slow, ok], slo_ms=1000.0) == 12.0
    text = load.report([ok, slow, again], SimpleNamespace(**REPORT_ARGS), 1000.0)
    assert "every rate below it): 2 req/s" in text and "missed: 12 req/s (not counted)" in text
    assert row.plugin_ms_p50 is None and row.plugin_busy is None  # no profiled worker: nothing to report
    assert "Profiled worker" not in load.report([row], SimpleNamespace(**REPORT_ARGS), 1000.0)


REPORT_ARGS = dict(label="t", arm="blendgate", url="u", chunks=8, chunk_tokens=512, chunk_pool=10, zipf=1.1,
                   system_tokens=64, question_tokens=32, answer_tokens=64, chat_share=0.3, chat_tokens=256,
                   duration=1.0, seed=0, warmup=0)


def test_a_profiled_workers_pass_times_give_the_plugins_share_of_the_run() -> None:
    # Each RAG request's share of its pass: 20 ms a request; 10 of them over 2 s of wall time: 10% busy.
    # Half the requests' passes computed uncached chunks (8 ms of their share, 3 of them pinning new host
    # memory); passes of 1 and 3 requests.
    outcomes = [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, plugin_gpu_ms=20.0,
                             plugin_misses_ms=8.0 * (i % 2), plugin_pinning_ms=3.0 * (i % 2),
                             pass_requests=1 + 2 * (i % 2)) for i in range(10)]
    outcomes.append(load.Outcome("chat", True, ttft_s=0.05, output_tokens=1))
    row = load.summarise(4.0, outcomes, wall_s=2.0)
    assert row.plugin_ms_p50 == pytest.approx(20.0) and row.plugin_busy == pytest.approx(0.1)
    assert row.plugin_misses_ms_mean == pytest.approx(4.0) and row.pass_requests_mean == pytest.approx(2.0)
    assert row.plugin_pinning_ms_mean == pytest.approx(1.5)
    text = load.report([row], SimpleNamespace(**REPORT_ARGS), 1000.0)
    assert "| 4 | 20.0 | 4.0 | 1.5 | 2.0 | 0.10 |" in text
    assert "held at the end" not in text  # no tiers reported


def test_the_tiers_the_last_profiled_report_saw_are_reported() -> None:
    gib = 2 ** 30
    outcomes = [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, plugin_gpu_ms=20.0,
                             tiers=(("gpu", n, n * gib // 2, 40 * gib), ("cpu", 0, 0, 48 * gib))) for n in (1, 3)]
    outcomes.append(load.Outcome("rag", True, ttft_s=0.1, output_tokens=1))  # no report: not the last seen
    row = load.summarise(4.0, outcomes, wall_s=1.0)
    assert row.tiers == (("gpu", 3, 3 * gib // 2, 40 * gib), ("cpu", 0, 0, 48 * gib))
    text = load.report([row], SimpleNamespace(**REPORT_ARGS), 1000.0)
    assert "- 4 req/s: gpu 3 chunks, 1.5 of 40.0 GiB; cpu 0 chunks, 0.0 of 48.0 GiB" in text


def test_the_share_of_rag_requests_blended_comes_from_their_reports() -> None:
    # 3 of 4 reported RAG requests blended; a RAG request without a report (and chat) does not count.
    outcomes = [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, blended=b) for b in (True, True, True, False)]
    outcomes += [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1),
                 load.Outcome("chat", True, ttft_s=0.05, output_tokens=1, blended=False)]
    row = load.summarise(4.0, outcomes, wall_s=2.0)
    assert row.rag_blended == pytest.approx(0.75)
    assert "| 0.75 |" in load.report([row], SimpleNamespace(**REPORT_ARGS), 1000.0)
    stock = load.summarise(4.0, [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1)], wall_s=1.0)
    stock_row = next(line for line in load.report([stock], SimpleNamespace(**REPORT_ARGS), 1000.0).splitlines()
                     if line.startswith("| 4 |"))
    assert stock.rag_blended is None and stock_row.endswith("| - | - |")


def test_the_fallback_reasons_are_counted_with_their_numbers_as_n() -> None:
    slow = "blending 8 chunks ({} not cached) would cost about {} tokens of per-chunk work to save 3481"
    outcomes = [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, blended=False, fallback=slow.format(m, c))
                for m, c in ((2, 4300), (3, 6450), (2, 4301))]
    outcomes += [load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, blended=False,
                              fallback="a piece of a prompt split by chunked prefill, before its last"),
                 load.Outcome("rag", True, ttft_s=0.1, output_tokens=1, blended=True),
                 load.Outcome("chat", True, ttft_s=0.05, output_tokens=1)]
    row = load.summarise(4.0, outcomes, wall_s=1.0)
    assert row.fallbacks == (("blending N chunks (N not cached) would cost about N tokens of per-chunk work to save N",
                              3), ("a piece of a prompt split by chunked prefill, before its last", 1))
    text = load.report([row], SimpleNamespace(**REPORT_ARGS), 1000.0)
    assert "| 4 | 3 | blending N chunks" in text
    # the most frequent reason once with its numbers (the last seen: the calibrated pass cost shows there)
    assert row.fallback_example == slow.format(2, 4301) and f"- 4 req/s: {slow.format(2, 4301)}" in text
