"""The false-hit bound (vCache's error bound δ, arXiv 2502.03771): the verifier's decision threshold per
category, calibrated on labelled pairs so that the share of hits that are wrong stays within the operator's
bound with 95% confidence.

Plain Python + numpy. The labelled pairs are kept as a `CalibrationTable`: counts of pairs per (cosine bin,
verifier probability bin, same answer or not), small enough to ship as JSON with the verifier's weights and
fine enough to calibrate any category's cosine threshold and bound at start-up without the pairs themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Upper bound of a binomial share at 95% confidence (one-sided): the normal quantile of 0.95.
Z_95 = 1.6448536269514722
COSINE_FLOOR = 0.70  # pairs below this cosine never reach the verifier: no category threshold is that low
COSINE_BINS = 60  # of 0.005 from COSINE_FLOOR to 1.0
PROBABILITY_BINS = 100  # of 0.01
# Where no probability threshold meets a bound, the loosest whose upper bound is within this of the lowest
# applies: the very lowest often sits on a few dozen pairs that happen to be all right and serves next to
# nothing (on the QQP tuning pairs at cosine >= 0.905: 0 false of 28 hits, upper bound 8.8%, against 61 of
# 747 at 10.0% and 73 of 845 at 10.4%, which serve 27 times as many same-answer pairs).
CLOSEST_SLACK = 0.02
# A probability threshold is only chosen where at least this many calibration hits (pairs it serves) stand
# behind it: the fewest at which none of them false bounds the false share within the default 2% (Wilson, 95%:
# 1.8% at 150). Without it the lowest upper bound of a small category could sit on a few dozen lucky pairs
# (time_sensitive on the QQP tuning pairs, earlier weights: 2 false of 68 hits at probability 0.94, upper
# 8.5%, serving 1.6% of its same-answer pairs, where 523 hits at 0.0 had an upper bound of 10.0% and served
# 11%). Where even the loosest threshold serves fewer, it alone is eligible: nothing narrower than all the
# pairs is trusted.
MIN_CALIBRATION_HITS = 150


def wilson_upper(false_hits: int, hits: int, z: float = Z_95) -> float:
    """Upper end of the Wilson score interval of the false share `false_hits / hits` (1.0 when no hits)."""
    if hits <= 0:
        return 1.0
    share = false_hits / hits
    denominator = 1 + z * z / hits
    centre = share + z * z / (2 * hits)
    margin = z * math.sqrt(share * (1 - share) / hits + z * z / (4 * hits * hits))
    return min(1.0, (centre + margin) / denominator)


@dataclass(frozen=True)
class Calibration:
    """One category's calibrated verifier threshold (the hand-off from bound.py to the verifier and, through
    it, to the metrics and the admin stats). Of the calibration pairs served (at or above the category's cosine
    threshold and let through): `estimate` the false share, `upper` its 95% upper bound (Wilson); `hit_rate`
    the share of all same-answer calibration pairs served, `unverified_hit_rate` the share served on the cosine
    alone (what the verifier costs is the difference), `unverified_estimate` the false share on the cosine
    alone. Served means: no veto guard fired (verifier.VETO_GUARDS) and the probability reached `probability`.
    `met` is False when no probability threshold meets the bound on these pairs: `probability` is then the
    one that comes closest (the loosest within CLOSEST_SLACK of the lowest 95% upper bound, among those with at
    least MIN_CALIBRATION_HITS hits behind them), and `estimate`,
    `upper` and `hit_rate` are its. Without any calibration pair at or above the cosine threshold that the
    guards let through, `probability` is None (the guards alone decide, verifier.Verifier) and `estimate`,
    `upper` and `hit_rate` are 0, 1 and 0."""

    category: str
    bound: float
    cosine_threshold: float
    probability: float | None
    estimate: float
    upper: float
    hit_rate: float
    unverified_hit_rate: float
    unverified_estimate: float
    pairs: int
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return {"category": self.category, "bound": self.bound, "cosine_threshold": round(self.cosine_threshold, 4),
                "probability_threshold": None if self.probability is None else round(self.probability, 4),
                "estimate": round(self.estimate, 4), "upper": round(self.upper, 4),
                "hit_rate": round(self.hit_rate, 4), "unverified_hit_rate": round(self.unverified_hit_rate, 4),
                "unverified_estimate": round(self.unverified_estimate, 4), "pairs": self.pairs, "met": self.met}


SHAPE = (COSINE_BINS, PROBABILITY_BINS, 2, 2)


class CalibrationTable:
    """Labelled pairs as counts[cosine bin, probability bin, a veto guard fired (verifier.VETO_GUARDS; 0/1),
    same answer (0/1)]."""

    def __init__(self, counts: np.ndarray) -> None:
        if counts.shape != SHAPE:
            raise ValueError(f"calibration counts must have shape {SHAPE}")
        self.counts = counts.astype(np.int64)

    @classmethod
    def from_pairs(cls, cosines: np.ndarray, probabilities: np.ndarray, guarded: np.ndarray,
                   same: np.ndarray) -> "CalibrationTable":
        """From each pair's cosine, verifier probability (held out from its training: cross-fitted), whether a
        guard fired and its label (all shape (n,)); pairs below COSINE_FLOOR are left out."""
        keep = cosines >= COSINE_FLOOR
        cosine_bin = np.minimum(((cosines[keep] - COSINE_FLOOR) / (1 - COSINE_FLOOR) * COSINE_BINS).astype(int),
                                COSINE_BINS - 1)
        probability_bin = np.minimum((probabilities[keep] * PROBABILITY_BINS).astype(int), PROBABILITY_BINS - 1)
        counts = np.zeros(SHAPE, dtype=np.int64)
        np.add.at(counts, (cosine_bin, probability_bin, guarded[keep].astype(int), same[keep].astype(int)), 1)
        return cls(counts)

    def to_json(self) -> list[list[int]]:
        """Sparse: [cosine bin, probability bin, guarded, same, count] per non-empty cell."""
        return [[*map(int, cell), int(self.counts[cell])] for cell in zip(*np.nonzero(self.counts))]

    @classmethod
    def from_json(cls, cells: list[list[int]]) -> "CalibrationTable":
        counts = np.zeros(SHAPE, dtype=np.int64)
        for i, j, g, k, count in cells:
            counts[i, j, g, k] = count
        return cls(counts)

    def calibrate(self, category: str, cosine_threshold: float, bound: float) -> Calibration:
        """The lowest probability threshold (a multiple of 0.01) at which the 95% upper bound of the false share
        of hits, among the pairs at or above `cosine_threshold` (to the bin below it) that no veto guard
        refuses (the verifier refuses those on their own), is within `bound`; where none is, the loosest within
        CLOSEST_SLACK of the lowest upper bound and `met` False; either way only among the thresholds that serve
        at least MIN_CALIBRATION_HITS of these pairs (where fewer pairs are let through at all, the loosest
        threshold alone). Without such pairs: None, with the shares of the guards alone (see Calibration). Hit
        rates are shares of all the table's same-answer pairs (cosine
        >= COSINE_FLOOR)."""
        first = max(0, int((cosine_threshold - COSINE_FLOOR) / (1 - COSINE_FLOOR) * COSINE_BINS + 1e-9))
        same_total = int(self.counts[..., 1].sum())
        above = self.counts[first:].sum(axis=0)  # [probability bin, guarded, same]
        pairs = int(above.sum())
        both = above.sum(axis=1)  # [probability bin, same]
        hits_all, false_all = int(both.sum()), int(both[:, 0].sum())
        unverified_false = false_all / hits_all if hits_all else 0.0
        unverified_hit_rate = (hits_all - false_all) / same_total if same_total else 0.0
        # Hits and false hits when the probability threshold is bin k's lower edge: the pairs no guard refuses,
        # from bin k up.
        unguarded = above[:, 0]  # [probability bin, same]
        hits_at = np.cumsum(unguarded[::-1].sum(axis=1))[::-1]
        false_at = np.cumsum(unguarded[::-1, 0])[::-1]
        uppers = np.array([wilson_upper(int(f), int(h)) if h else np.inf for f, h in zip(false_at, hits_at)])

        def at(k: int, met: bool) -> Calibration:
            hits, false = int(hits_at[k]), int(false_at[k])
            return Calibration(category, bound, cosine_threshold, k / PROBABILITY_BINS, false / hits, float(uppers[k]),
                               (hits - false) / same_total, unverified_hit_rate, unverified_false, pairs, met)

        # Thresholds with too few hits behind them are not eligible (MIN_CALIBRATION_HITS).
        uppers[hits_at < min(MIN_CALIBRATION_HITS, int(hits_at[0]))] = np.inf
        within = np.flatnonzero(uppers <= bound)
        if len(within):
            return at(int(within[0]), True)
        if np.isfinite(uppers).any():
            return at(int(np.flatnonzero(uppers <= uppers.min() + CLOSEST_SLACK)[0]), False)
        # No pair at or above the cosine threshold that the guards let through: nothing to calibrate on.
        return Calibration(category, bound, cosine_threshold, None, 0.0, 1.0, 0.0, unverified_hit_rate,
                           unverified_false, pairs, False)
