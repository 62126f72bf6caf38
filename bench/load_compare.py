"""Issue 20's comparison of load-benchmark arms: each arm's sustained rate and its ratio to the baseline arm's,
and, at the rates both ran, the RAG and chat TTFT of each arm over the baseline's.

Reads the JSON that `bench/load.py --out X.md` writes beside its report (X.json), the baseline first:

    python bench/load_compare.py out/load-stock.json out/load-blendgate.json [out/load-blendgate-cpu.json] \\
        --out bench/results/load-compare.md

A sustained rate is bench/load.py's: the highest rate up to which every rate run completed every request with
RAG p99 TTFT within the arm's SLO. When an arm met the SLO at the highest rate it ran, its true sustained rate is
at least that: the table says "at least", and a ratio over such a baseline is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from load import RateSummary, sustained_rate  # bench/load.py, beside this script


@dataclass(frozen=True)
class Arm:
    """One arm's rows as bench/load.py wrote them (its JSON -> this comparison)."""

    name: str
    slo_ms: float
    rows: list[RateSummary]  # one per rate

    @classmethod
    def read(cls, path: Path) -> "Arm":
        try:
            data = json.loads(path.read_text())
            rows = [RateSummary(**{**row, "errors": tuple(row["errors"]),
                                   "fallbacks": tuple(map(tuple, row.get("fallbacks", ()))),
                                   "tiers": tuple(map(tuple, row.get("tiers", ())))})
                    for row in data["rows"]]
            return cls(data["arm"], float(data["slo_ms"]), rows)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bench/load.py result ({exc})") from None

    def sustained(self) -> tuple[float | None, bool]:
        """(bench/load.py's sustained rate, whether a higher rate was run and missed the SLO)."""
        best = sustained_rate(self.rows, self.slo_ms)
        return best, any(r.rate > (best or 0) for r in self.rows)

    def at(self, rate: float) -> RateSummary | None:
        return next((r for r in self.rows if r.rate == rate), None)


def sustained_text(arm: Arm) -> str:
    best, bounded = arm.sustained()
    if best is None:
        return "none of its rates"
    return f"{best:g} req/s" if bounded else f"at least {best:g} req/s (the highest rate run)"


def ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def compare(arms: list[Arm]) -> str:
    base = arms[0]
    base_rate, base_bounded = base.sustained()
    lines = [f"| arm | sustained rate (RAG p99 TTFT <= {base.slo_ms:g} ms) | over {base.name} |", "|---|---|---|"]
    for arm in arms:
        rate, _ = arm.sustained()
        over = ratio(rate, base_rate)
        if over != "-" and not base_bounded and arm is not base:
            over = f"at most {over}"  # the baseline's own rate is a lower bound
        lines.append(f"| {arm.name} | {sustained_text(arm)} | {over} |")
    lines += ["", "At the rates both ran, TTFT over the baseline's (below 1: faster):", "",
              "| arm | rate (req/s) | RAG p50 | RAG p99 | chat p50 | chat p99 |", "|---|---|---|---|---|---|"]
    for arm in arms[1:]:
        for row in arm.rows:
            theirs = base.at(row.rate)
            if theirs is None:
                continue
            cells = [ratio(getattr(row, key), getattr(theirs, key)) for key in
                     ("ttft_rag_p50_ms", "ttft_rag_p99_ms", "ttft_chat_p50_ms", "ttft_chat_p99_ms")]
            lines.append(f"| {arm.name} | {row.rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="bench/load.py JSON results, the baseline first")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    if len(args.results) < 2:
        parser.error("give the baseline arm and at least one other")
    try:
        arms = [Arm.read(path) for path in args.results]
    except ValueError as exc:
        parser.error(str(exc))
    text = compare(arms)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
