"""The load benchmark (bench/load.py) in one short open-loop run against the stand-in SGLang worker
(tests/sglang_standin.py: SGLang's HTTP API backed by the local engine and SmolLM2), whose prefill reports
give the chunk-cache hit rate."""

from __future__ import annotations

import json
from pathlib import Path

from bench_modules import bench_module
from support import SglangStandin

load = bench_module("load.py")


def test_an_open_loop_run_against_a_stand_in_worker_reports_ttft_and_chunk_hits(workdir: Path, model_cache_dir: Path,
                                                                                tmp_path: Path) -> None:
    worker = SglangStandin("load-standin", workdir, model_cache_dir).start()
    try:
        out = tmp_path / "load.md"
        # Two chunks of a pool of three: after the first requests, chunks come from the worker's chunk-cache.
        code = load.main(["--url", worker.url, "--rates", "2", "--duration", "4", "--vocab", "49152",
                          "--chunk-pool", "3", "--chunks", "2", "--chunk-tokens", "16", "--system-tokens", "8",
                          "--question-tokens", "4", "--answer-tokens", "3", "--chat-share", "0.3",
                          "--chat-tokens", "12", "--slo-ms", "60000", "--seed", "5", "--warmup", "3",
                          "--warmup-concurrency", "2", "--precompute", "--out", str(out)])
    finally:
        worker.stop()
    assert code == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    sent, completed, failed = int(cells[1]), int(cells[2]), int(cells[3])
    assert sent > 0 and completed == sent and failed == 0, text
    assert float(cells[4]) > 0  # RAG TTFT p50, ms
    assert cells[11] != "-" and float(cells[11]) > 0, text  # chunk hits seen in the prefill reports
    assert cells[12] != "-" and 0 <= float(cells[12]) <= 1, text  # the share of RAG requests blended
    assert "3 warm-up requests before the sweep" in text
    # The pool's 3 chunks precomputed 2 to a request before it: 2 requests, all blended.
    assert "the pool precomputed before the warm-up" in text and "2 of 2 requests completed" in text, text
    precomputed = json.loads(out.with_suffix(".json").read_text())["precompute"]
    assert precomputed["completed"] == 2 and precomputed["blended"] == 1.0, precomputed
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]  # for bench/load_compare.py
    assert [r["rate"] for r in rows] == [2] and rows[0]["completed"] == completed
    assert f"{rows[0]['rag_blended']:.2f}" == cells[12]
    assert "sustained rate (RAG p99 TTFT <= 60000 ms, no failures, at it and every rate below it): 2 req/s" in text
