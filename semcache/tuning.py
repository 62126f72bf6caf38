"""Per-category thresholds from an operator's labelled question pairs (`blendgate tune-thresholds`).

Each pair is a question that might be cached and a later query, labelled whether one answer serves both.
The query's category is the one the configured classifier gives it, as a lookup would; the pair's
similarity is the cosine of the two embeddings. For each category the suggested threshold is the lowest
at which false hits (pairs labelled different yet at or above it) are at most the budget's share of the
hits, so it keeps as many paraphrases as that budget allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .categories import CategoryClassifier
from .settings import SemanticCacheSettings


class PairsFileError(ValueError):
    """The labelled pairs file cannot be read; the message says where and why."""


@dataclass(frozen=True)
class LabelledPair:
    cached: str
    query: str
    same_answer: bool


@dataclass
class CategoryTuning:
    category: str
    configured: float | None  # None: the category is never cached
    pairs: int
    same: int
    suggested: float | None = None  # None: too few pairs, or no threshold meets the budget
    hits: int = 0
    false_hits: int = 0
    reason: str = ""

    @property
    def recall(self) -> float:
        """Share of the same-answer pairs the suggested threshold would serve from the cache."""
        return (self.hits - self.false_hits) / self.same if self.same else 0.0


def read_pairs(path: Path) -> list[LabelledPair]:
    """JSON lines, each {"cached": str, "query": str, "same_answer": bool}."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PairsFileError(f"cannot read {path}: {exc}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PairsFileError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise PairsFileError(f"{path}:{number}: expected an object with cached, query and same_answer")
        cached, query, same = row.get("cached"), row.get("query"), row.get("same_answer")
        if not isinstance(cached, str) or not cached.strip() or not isinstance(query, str) or not query.strip():
            raise PairsFileError(f"{path}:{number}: cached and query must be non-empty strings")
        if not isinstance(same, bool):
            raise PairsFileError(f"{path}:{number}: same_answer must be true or false")
        pairs.append(LabelledPair(cached, query, same))
    if not pairs:
        raise PairsFileError(f"{path} holds no labelled pairs")
    return pairs


def lowest_threshold_within(similarities: np.ndarray, same: np.ndarray, budget: float) -> float | None:
    """The lowest threshold, to 4 decimal places, at which false hits are at most `budget` of the hits of
    these pairs (a hit: similarity at or above the threshold). Candidates are the same-answer pairs'
    similarities rounded down, so each admits the pair it comes from and is what a config file would say."""
    candidates = np.unique(np.floor(similarities[same] * 10_000) / 10_000)
    every, different = np.sort(similarities), np.sort(similarities[~same])
    hits = len(every) - np.searchsorted(every, candidates, side="left")
    false = len(different) - np.searchsorted(different, candidates, side="left")
    within = np.flatnonzero(false <= budget * hits)
    return float(candidates[within[0]]) if len(within) else None


def suggest_thresholds(settings: SemanticCacheSettings, embed: Callable[[list[str]], np.ndarray],
                       pairs: list[LabelledPair], budget: float, min_pairs: int) -> list[CategoryTuning]:
    """Per category of `settings`: the suggestion, or why there is none (a category with fewer than
    `min_pairs` labelled pairs keeps its configured threshold)."""
    classifier = CategoryClassifier(settings.categories, embed, settings.default_category)
    cached_vectors = embed([p.cached for p in pairs])
    query_vectors = embed([p.query for p in pairs])
    similarities = np.einsum("ij,ij->i", cached_vectors, query_vectors)
    categories = np.array([classifier.classify(p.query, v).category for p, v in zip(pairs, query_vectors)])
    same = np.array([p.same_answer for p in pairs])
    results = []
    for policy in settings.categories:
        mine = categories == policy.name
        tuning = CategoryTuning(policy.name, policy.threshold if policy.cached else None, int(mine.sum()),
                                int(same[mine].sum()))
        results.append(tuning)
        if not policy.cached:
            tuning.reason = "never cached"
        elif tuning.pairs < min_pairs:
            tuning.reason = f"fewer than {min_pairs} labelled pairs; keep the configured threshold"
        elif tuning.same == 0:
            tuning.reason = "no pair labelled same_answer; keep the configured threshold"
        else:
            threshold = lowest_threshold_within(similarities[mine], same[mine], budget)
            if threshold is None:
                tuning.reason = f"no threshold keeps false hits within {budget:.1%}; consider cached: false"
                continue
            tuning.suggested = threshold
            above = similarities[mine] >= tuning.suggested
            tuning.hits = int(above.sum())
            tuning.false_hits = int((above & ~same[mine]).sum())
    return results
