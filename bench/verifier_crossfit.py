"""The verifier's parts measured on the QQP tuning split alone (the held-out pairs stay untouched): what each
guard refuses among the candidate pairs, and the classifier's false hits by 5-fold cross-fitting against the
best single MiniLM threshold at the same share of duplicates served.

    python bench/verifier_crossfit.py ../shared/data/pairs/qqp/qqp-train.tsv [--cache-dir DIR] [--floor 0.89]

Candidates: the tuning pairs (QQP's own balance) at MiniLM cosine >= --floor. Guards: per guard
(guards.GUARDS, and the two halves of `exchanged`), the candidates it fires on and the labelled duplicates
among them. Cross-fitting: every pair's probability from a model fitted on the other four folds plus the
rephrasings (verifier_training.cross_fitted, as the calibration table is built); a candidate is served when
no veto guard fires (verifier.VETO_GUARDS, as a lookup decides) and the probability reaches a threshold, set
so that 15%, 20% and 25% of the tuning duplicates are served. Ratio: its false hits over those of the highest
single cosine threshold serving as many duplicates.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from blendgate.retriever.embedder import Embedder
from blendgate.semcache.guards import GUARDS, check, exchanged, swapped_roles, tokens
from blendgate.semcache.pair_words import WordRarity
from blendgate.semcache.pairs import qqp_split
from blendgate.semcache.rephrasings import rephrasings
from blendgate.semcache.tuning import LabelledPair
from blendgate.semcache.verifier import VETO_GUARDS
from blendgate.semcache.verifier_training import REPHRASINGS, EmbeddedPairs, cross_fitted, training_matrix

SHARES = (0.15, 0.20, 0.25)


def guard_table(pairs: list[LabelledPair], cosines: np.ndarray, floor: float) -> list[str]:
    """Per guard: candidates (cosine >= floor) it fires on, labelled duplicates among them."""
    candidates = [p for p, c in zip(pairs, cosines) if c >= floor]
    base = sum(p.same_answer for p in candidates) / len(candidates)
    firing = {name: [] for name in (*GUARDS, "exchanged: two words changed places",
                                    "exchanged: roles swapped around a direction word")}
    for pair in candidates:
        flags = check(pair.query, pair.cached)
        for name in GUARDS:
            if getattr(flags, name):
                firing[name].append(pair)
        first, second = tokens(pair.query), tokens(pair.cached)
        if exchanged(first, second):
            firing["exchanged: two words changed places"].append(pair)
        if swapped_roles(first, second):
            firing["exchanged: roles swapped around a direction word"].append(pair)
    rows = [f"{len(candidates)} candidates at cosine >= {floor}, {base:.1%} of them duplicates", "",
            "| guard | veto | fires on | duplicates among them |", "|---|---|---|---|"]
    for name, fired in firing.items():
        same = sum(p.same_answer for p in fired)
        veto = "yes" if name.split(":")[0] in VETO_GUARDS else "no (a feature)"
        rows.append(f"| {name} | {veto} | {len(fired)} | {same} ({same / max(len(fired), 1):.0%}) |")
    return rows


def false_hits_at(scores: np.ndarray, duplicate: np.ndarray, needed: int) -> int:
    """False hits of the highest threshold on `scores` (one per pair; -inf: never served) that serves at least
    `needed` of the pairs marked `duplicate` (all of them when fewer can be served)."""
    order = np.argsort(-scores, kind="stable")
    true = np.cumsum(duplicate[order])
    k = int(np.searchsorted(true, needed))  # first position where `needed` duplicates are served
    cut = scores[order][min(k, len(order) - 1)]
    served = (scores >= cut) & np.isfinite(scores)
    return int((served & ~duplicate).sum())


def crossfit_table(pairs: list[LabelledPair], cosines: np.ndarray, floor: float, embed) -> list[str]:
    """The cross-fitted verifier against the single cosine threshold, at SHARES of the tuning duplicates."""
    rarity = WordRarity.from_questions(q for p in pairs for q in (p.cached, p.query))
    rephrased = EmbeddedPairs.embedded(rephrasings([p.cached for p in pairs], REPHRASINGS), embed)
    matrix = training_matrix(pairs, cosines, rarity, rephrased)
    held = cross_fitted(matrix.standard, matrix.y, matrix.extra)
    duplicate = matrix.y.astype(bool)
    vetoed = np.array([check(p.query, p.cached).fired(VETO_GUARDS) is not None for p in matrix.pairs])
    candidate = matrix.cosines >= floor
    verifier = np.where(candidate & ~vetoed, held, -np.inf)
    threshold = np.where(candidate, matrix.cosines, -np.inf)
    total = sum(p.same_answer for p in pairs)
    rows = ["| share of tuning duplicates served | duplicates | verifier false hits | single threshold false hits "
            "| ratio |", "|---|---|---|---|---|"]
    for share in SHARES:
        needed = int(np.ceil(share * total))
        mine, theirs = false_hits_at(verifier, duplicate, needed), false_hits_at(threshold, duplicate, needed)
        rows.append(f"| {share:.0%} | {needed} | {mine} | {theirs} | {mine / max(theirs, 1):.2f} |")
    return rows


@dataclass(frozen=True)
class TuningSplit:
    """QQP's tuning pairs embedded with all-MiniLM-L6-v2: `cosines` shape (len(pairs),); `embed` returns the
    unit-length embeddings of texts among the pairs' questions and their rephrasings (rephrasings.py), shape
    (n, 384)."""

    pairs: list[LabelledPair]
    cosines: np.ndarray
    embed: Callable[[list[str]], np.ndarray]


def embedded_tuning_split(qqp: Path, cache_dir: Path) -> TuningSplit:
    """The tuning split of the QQP file `qqp` (held-out pairs left out), its questions and REPHRASINGS rephrasings
    embedded once and kept in `cache_dir` between runs."""
    # bench/semcache.py, found first on sys.path when this file runs as a script (imported here, not at the top,
    # so that the tests can load this module without it).
    from semcache import Embeddings

    cache_dir.mkdir(parents=True, exist_ok=True)
    tune, _ = qqp_split(qqp)
    embeddings = Embeddings(Embedder(device="cpu", batch_size=64), cache_dir)
    rephrased = rephrasings([p.cached for p in tune], REPHRASINGS)
    embeddings.load([q for p in (*tune, *rephrased) for q in (p.cached, p.query)])

    def embed(texts: list[str]) -> np.ndarray:
        return np.stack([embeddings(t) for t in texts])

    cosines = np.array([float(embeddings(p.cached) @ embeddings(p.query)) for p in tune])
    return TuningSplit(tune, cosines, embed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("qqp", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "blendgate-bench",
                        help="where sentence embeddings are kept between runs")
    parser.add_argument("--floor", type=float, default=0.89, help="the lowest cosine of a candidate pair")
    args = parser.parse_args()
    tuning = embedded_tuning_split(args.qqp, args.cache_dir)
    print("\n".join(guard_table(tuning.pairs, tuning.cosines, args.floor)), "", sep="\n")
    print("\n".join(crossfit_table(tuning.pairs, tuning.cosines, args.floor, tuning.embed)))


if __name__ == "__main__":
    main()
