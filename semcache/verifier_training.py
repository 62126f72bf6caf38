"""Training the verifier (verifier.py) from labelled question pairs: the default weights from the QQP tuning
split (`python -m blendgate.semcache.verifier_training QQP_TSV OUT_JSON`), an operator's from their own pairs
(`blendgate tune-thresholds --verifier-out FILE`). The word rarity the features read (pair_words.WordRarity)
comes from the training questions for the default; an operator's pairs, too few for document frequencies,
keep the default's.

Logistic regression fitted by Newton's method with a small L2 penalty (deterministic: the fixed seed only
orders the cross-fitting folds), on the labelled pairs plus trivial rephrasings of their questions labelled
"same answer" (rephrasings.py; REPHRASINGS of them). The calibration table is built from the labelled pairs'
cross-fitted probabilities alone (each pair scored by a model that did not see it), so the false-hit
estimates are neither the training fit's nor the rephrasings'.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .bound import COSINE_FLOOR, CalibrationTable
from .guards import check
from .pair_words import WordRarity
from .rephrasings import rephrasings
from .tuning import LabelledPair
from .verifier import FEATURE_SIGNS, FEATURES, VETO_GUARDS, VerifierModel, pair_features

SEED = 19
FOLDS = 5
L2 = 1e-3
# Pairs below this cosine train the classifier too: the verifier only sees candidates above a category's
# threshold, but a looser floor gives it more different-answer pairs to learn from.
TRAINING_FLOOR = 0.60
# Rephrasings (rephrasings.py) trained on besides the labelled pairs, at most.
REPHRASINGS = 1500


@dataclass(frozen=True)
class EmbeddedPairs:
    """Labelled pairs and the cosine of each pair's two embedded questions (the hand-off from embedding to
    training): `cosines` has shape (len(pairs),)."""

    pairs: list[LabelledPair]
    cosines: np.ndarray

    @classmethod
    def embedded(cls, pairs: list[LabelledPair], embed: Callable[[list[str]], np.ndarray]) -> "EmbeddedPairs":
        """The pairs with the cosines of `embed`'s unit-length embeddings."""
        if not pairs:
            return cls([], np.zeros(0))
        cached, query = embed([p.cached for p in pairs]), embed([p.query for p in pairs])
        return cls(pairs, np.einsum("ij,ij->i", cached, query))


def fit_logistic(x: np.ndarray, y: np.ndarray, signs: tuple[int, ...] | None = None, l2: float = L2,
                 steps: int = 25) -> tuple[np.ndarray, float]:
    """Weights and bias of a logistic regression of labels `y` (0/1, shape (n,)) on standardised features
    `x` (shape (n, d)), by Newton's method with an L2 penalty `l2` (not on the bias). With `signs` (+1, -1, or 0
    for either, per feature), a feature whose weight comes out of the other sign is left out (weight 0) and the
    rest refitted, until every weight keeps to its sign."""
    active = np.ones(x.shape[1], dtype=bool)
    while True:
        weights = np.zeros(x.shape[1])
        fitted, bias = _newton(x[:, active], y, l2, steps)
        weights[active] = fitted
        wrong = (weights * np.asarray(signs) < 0) if signs is not None else np.zeros_like(active)
        if not wrong.any():
            return weights, bias
        active &= ~wrong


def _newton(x: np.ndarray, y: np.ndarray, l2: float, steps: int) -> tuple[np.ndarray, float]:
    design = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(design.shape[1])
    penalty = np.full(design.shape[1], l2 * len(x))
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) + penalty * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty) + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def feature_matrix(pairs: list[LabelledPair], cosines: np.ndarray, rarity: WordRarity) -> np.ndarray:
    """FEATURES of each pair (the cached question against the query), shape (n, len(FEATURES))."""
    if not pairs:
        return np.zeros((0, len(FEATURES)))
    return np.stack([pair_features(p.query, p.cached, float(c), rarity).values for p, c in zip(pairs, cosines)])


def cross_fitted(standard: np.ndarray, y: np.ndarray, extra: np.ndarray,
                 signs: tuple[int, ...] | None = FEATURE_SIGNS) -> np.ndarray:
    """Each labelled pair's probability of "same answer" from a model that did not see it: FOLDS folds drawn
    with SEED, each scored by `fit_logistic` on the other folds plus every row of `extra` (rephrasings, labelled
    same answer). `standard`: standardised features, shape (n, d); `y`: labels 0/1, shape (n,); `extra`: shape
    (m, d). Returns shape (n,)."""
    ones = np.ones(len(extra))
    folds = np.random.default_rng(SEED).permutation(len(y)) % FOLDS
    held = np.zeros(len(y))
    for fold in range(FOLDS):
        train = folds != fold
        weights, bias = fit_logistic(np.vstack([standard[train], extra]), np.concatenate([y[train], ones]), signs)
        held[folds == fold] = 1.0 / (1.0 + np.exp(-(standard[folds == fold] @ weights + bias)))
    return held


@dataclass(frozen=True)
class TrainingMatrix:
    """Labelled pairs as the classifier is fitted on them (the hand-off from feature extraction to fitting,
    cross-fitting and calibration): the pairs at cosine >= TRAINING_FLOOR, their `cosines` and labels `y`
    (0/1), shape (n,); `standard`, their FEATURES standardised with `mean` and `scale` (shape (n, d)); `extra`,
    the rephrasings' standardised features (shape (m, d)), all labelled same answer."""

    pairs: list[LabelledPair]
    cosines: np.ndarray
    y: np.ndarray
    standard: np.ndarray
    extra: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


MIN_PAIRS_PER_LABEL = 10  # the fewest pairs of each label (at cosine >= TRAINING_FLOOR) a verifier is trained on


def check_label_counts(pairs: list[LabelledPair]) -> None:
    """Raises ValueError when `pairs` hold fewer than MIN_PAIRS_PER_LABEL of either label at all: what training
    would refuse, found before any embedding (the floor on cosines can only remove pairs)."""
    same = sum(p.same_answer for p in pairs)
    if min(same, len(pairs) - same) < MIN_PAIRS_PER_LABEL:
        raise ValueError(f"training the verifier needs at least {MIN_PAIRS_PER_LABEL} pairs of each label at cosine "
                         f">= {TRAINING_FLOOR}; the file has {same} labelled same_answer and {len(pairs) - same} not")


def training_matrix(pairs: list[LabelledPair], cosines: np.ndarray, rarity: WordRarity,
                    rephrased: EmbeddedPairs | None = None) -> TrainingMatrix:
    """The `TrainingMatrix` of `pairs` whose embeddings have `cosines` (shape (n,)) and of `rephrased`. Raises
    ValueError with too few pairs of either label above TRAINING_FLOOR."""
    keep = cosines >= TRAINING_FLOOR
    chosen = [p for p, k in zip(pairs, keep) if k]
    x, y = feature_matrix(chosen, cosines[keep], rarity), np.array([p.same_answer for p in chosen], float)
    if min(y.sum(), (1 - y).sum()) < MIN_PAIRS_PER_LABEL:
        raise ValueError(f"training the verifier needs at least {MIN_PAIRS_PER_LABEL} pairs of each label at cosine "
                         f">= {TRAINING_FLOOR}")
    extra = feature_matrix(rephrased.pairs, rephrased.cosines, rarity) if rephrased else np.zeros((0, x.shape[1]))
    both = np.vstack([x, extra])
    mean, scale = both.mean(axis=0), both.std(axis=0)
    scale[scale == 0] = 1.0
    return TrainingMatrix(chosen, cosines[keep], y, (x - mean) / scale, (extra - mean) / scale, mean, scale)


def train_verifier(pairs: list[LabelledPair], cosines: np.ndarray, source: str,
                   rarity: WordRarity | None = None, rephrased: EmbeddedPairs | None = None) -> VerifierModel:
    """A verifier trained on `pairs` whose embeddings have `cosines` (shape (n,)) and on `rephrased` (same-answer
    rewrites: in every fold's training, never in the calibration), calibrated on `pairs` through cross-fitting,
    its features reading `rarity` (None: the document frequencies of the pairs' own questions). Raises
    ValueError with too few pairs of either label above TRAINING_FLOOR."""
    rarity = rarity or WordRarity.from_questions(q for p in pairs for q in (p.cached, p.query))
    m = training_matrix(pairs, cosines, rarity, rephrased)
    held = cross_fitted(m.standard, m.y, m.extra)
    weights, bias = fit_logistic(np.vstack([m.standard, m.extra]), np.concatenate([m.y, np.ones(len(m.extra))]),
                                 FEATURE_SIGNS)
    guarded = np.array([check(p.query, p.cached).fired(VETO_GUARDS) is not None for p in m.pairs])
    table = CalibrationTable.from_pairs(m.cosines, held, guarded, m.y.astype(bool))
    return VerifierModel(weights, bias, m.mean, m.scale, table, source, rarity)


def train_from_embeddings(pairs: list[LabelledPair], embed: Callable[[list[str]], np.ndarray],
                          source: str, rarity: WordRarity | None = None) -> VerifierModel:
    """`train_verifier` with the cosines of `embed`'s unit-length embeddings of each pair, and REPHRASINGS
    rephrasings of the pairs' cached questions embedded the same way."""
    labelled = EmbeddedPairs.embedded(pairs, embed)
    rephrased = EmbeddedPairs.embedded(rephrasings([p.cached for p in pairs], REPHRASINGS), embed)
    return train_verifier(labelled.pairs, labelled.cosines, source, rarity, rephrased)


def main(argv: list[str]) -> None:
    """Train the default weights on the QQP tuning split (the held-out pairs stay untouched)."""
    from ..retriever.embedder import Embedder
    from .pairs import qqp_split

    tune, _ = qqp_split(Path(argv[0]))
    embedder = Embedder(device="cpu", batch_size=64)
    model = train_from_embeddings(tune, embedder.embed, f"QQP tuning split ({len(tune)} pairs), {embedder.name}")
    model.save(Path(argv[1]))
    print(f"wrote {argv[1]} ({COSINE_FLOOR=})")


if __name__ == "__main__":
    main(sys.argv[1:])
