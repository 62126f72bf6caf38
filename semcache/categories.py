"""Which category a query belongs to: rules first, then the nearest centroid of labelled examples.

Both run on the query embedding the cache computes anyway, so classifying costs a handful of dot
products (microseconds), not another model call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .settings import CategoryPolicy

# Rules see the question's first characters only. The embedding sees its first 256 word pieces anyway, and a
# rule's cost grows with the text it searches (quadratically for some: `def.*[:(]` over 5 MB takes hours),
# on the event loop, where the regular-expression engine holds the GIL however it is called.
RULE_TEXT_CHARS = 4096


@dataclass(frozen=True)
class Classification:
    category: str
    # "rule" when a rule decided, "centroid" for the nearest centroid, "default" when neither applied.
    method: str
    score: float
    # Other categories whose centroid scored within the neighbour margin of the chosen one.
    neighbours: tuple[str, ...] = ()


class CategoryClassifier:
    def __init__(self, categories: list[CategoryPolicy], embed: Callable[[list[str]], np.ndarray],
                 default_category: str, neighbour_margin: float = 0.0) -> None:
        self.default_category = default_category
        self.neighbour_margin = neighbour_margin
        # Rules are tried in the configured order of the categories; the first match wins.
        self._rules = [(c.name, re.compile(rule, re.IGNORECASE)) for c in categories for rule in c.rules]
        self._names: list[str] = []
        centroids = []
        for category in categories:
            if not category.examples:
                continue
            vectors = embed(category.examples)
            centroid = vectors.mean(axis=0)
            centroids.append(centroid / np.linalg.norm(centroid))
            self._names.append(category.name)
        self._centroids = np.stack(centroids).astype(np.float32) if centroids else None

    def classify(self, text: str, vector: np.ndarray) -> Classification:
        """The category of a question (`text`, of which rules read the first RULE_TEXT_CHARS characters) with
        unit-length embedding `vector`."""
        head = text[:RULE_TEXT_CHARS]
        for name, rule in self._rules:
            if rule.search(head):
                return Classification(name, "rule", 1.0)
        if self._centroids is None:
            return Classification(self.default_category, "default", 0.0)
        scores = self._centroids @ vector
        best = int(np.argmax(scores))
        close = np.flatnonzero(scores >= scores[best] - self.neighbour_margin) if self.neighbour_margin else ()
        neighbours = tuple(self._names[i] for i in close if i != best)
        return Classification(self._names[best], "centroid", float(scores[best]), neighbours)
