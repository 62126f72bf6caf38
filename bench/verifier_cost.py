"""Time the semantic cache's verifier per candidate (guards, features, classifier) on CPU: p50/p99 over the
QQP tuning pairs' texts, one candidate at a time as a lookup checks them.

    python bench/verifier_cost.py ../shared/data/pairs/qqp/qqp-train.tsv [repeats]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from blendgate.semcache.pairs import qqp_split
from blendgate.semcache.settings import default_categories
from blendgate.semcache.verifier import Verifier


def main(path: Path, repeats: int) -> None:
    tune, _ = qqp_split(path)
    verifier = Verifier.load(None, default_categories())
    timings = []
    for _ in range(repeats):
        for pair in tune:
            started = time.perf_counter()
            verifier.verify(pair.query, pair.cached, 0.93, "factual")
            timings.append(time.perf_counter() - started)
    us = np.array(timings) * 1e6
    print(f"{len(us)} candidates: p50 {np.percentile(us, 50):.1f} us, p99 {np.percentile(us, 99):.1f} us, "
          f"max {us.max():.1f} us")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
