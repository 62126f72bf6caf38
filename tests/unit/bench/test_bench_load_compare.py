"""bench/load_compare.py on the rows of the first H200 runs (bench/results/load-2026-11-30.md): sustained rates,
a baseline that never missed its SLO giving an upper bound, TTFT ratios at the rates both arms ran, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_modules import bench_module

compare = bench_module("load_compare.py")


def row(rate, p50, p99, chat50, chat99, failed=0) -> dict:
    return {"rate": rate, "sent": 10, "completed": 10 - failed, "failed": failed, "ttft_rag_p50_ms": p50,
            "ttft_rag_p99_ms": p99, "ttft_chat_p50_ms": chat50, "ttft_chat_p99_ms": chat99, "itl_p50_ms": 5.0,
            "itl_p99_ms": 90.0, "output_tokens_per_s": 100.0, "chunk_hit_rate": None, "errors": []}


def write(path: Path, arm: str, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"arm": arm, "command": "python bench/load.py ...", "slo_ms": 1000.0,
                                "date": "2026-11-30", "rows": rows}))
    return path


def test_the_first_h200_runs_compare_as_their_report_says(tmp_path: Path) -> None:
    stock = write(tmp_path / "stock.json", "stock", [row(8, 123.5, 561.3, 38.5, 264.7),
                                                     row(12, 285.2, 807.7, 176.4, 585.7)])
    blend = write(tmp_path / "blendgate.json", "blendgate", [row(8, 94.9, 316.4, 23.6, 217.8),
                                                             row(12, 95.0, 306.8, 27.1, 354.3),
                                                             row(16, 5146.2, 10553.7, 3906.3, 10613.5)])
    out = tmp_path / "compare.md"
    assert compare.main([str(stock), str(blend), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| stock | at least 12 req/s (the highest rate run) | 1.00x |" in text
    assert "| blendgate | 12 req/s | at most 1.00x |" in text  # stock may hold more than 12
    assert "| blendgate | 12 | 0.33x | 0.38x | 0.15x | 0.60x |" in text
    assert "| blendgate | 16 |" not in text  # stock did not run 16


def test_a_failure_or_a_missed_slo_ends_the_sustained_rate(tmp_path: Path) -> None:
    def arm(*rows: dict):
        return compare.Arm("a", 1000.0, [compare.RateSummary(**{**r, "errors": ()}) for r in rows])

    assert arm(row(2, 50, 200, 10, 20), row(4, 60, 300, 10, 20, failed=1),
               row(8, 70, 2000, 10, 20)).sustained() == (2, True)
    assert arm(row(2, 50, 1500, 10, 20)).sustained() == (None, True)


def test_bad_input_is_a_usage_error(tmp_path: Path) -> None:
    good = write(tmp_path / "good.json", "stock", [row(2, 50, 200, 10, 20)])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        compare.main([str(good), str(tmp_path / "bad.json")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        compare.main([str(good)])  # a baseline alone compares with nothing


def test_a_row_with_fallbacks_and_tiers_reads_back_as_bench_load_wrote_it(tmp_path: Path) -> None:
    written = {**row(8, 90.0, 250.0, 30.0, 130.0), "fallbacks": [["a reason", 2]],
               "tiers": [["gpu", 3, 1024, 4096], ["cpu", 0, 0, 8192]]}
    arm = compare.Arm.read(write(tmp_path / "blendgate.json", "blendgate", [written]))
    assert arm.rows[0].fallbacks == (("a reason", 2),)
    assert arm.rows[0].tiers == (("gpu", 3, 1024, 4096), ("cpu", 0, 0, 8192))
