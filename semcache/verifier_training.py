"""Training the verifier (verifier.py) from labelled question pairs: the default weights from the QQP tuning
split (`python -m blendgate.semcache.verifier_training QQP_TSV OUT_JSON`), an operator's from their own pairs
(`blendgate tune-thresholds --verifier-out FILE`).

Logistic regression fitted by Newton's method with a small L2 penalty (deterministic: the fixed seed only
orders the cross-fitting folds). The calibration table is built from cross-fitted probabilities (each pair
scored by a model that did not see it), so the false-hit estimates are not the training fit's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np

from .bound import COSINE_FLOOR, CalibrationTable
from .guards import check
from .tuning import LabelledPair
from .verifier import FEATURE_SIGNS, FEATURES, VETO_GUARDS, VerifierModel, pair_features

SEED = 19
FOLDS = 5
L2 = 1e-3
# Pairs below this cosine train the classifier too: the verifier only sees candidates above a category's
# threshold, but a looser floor gives it more different-answer pairs to learn from.
TRAINING_FLOOR = 0.60


def fit_logistic(x: np.ndarray, y: np.ndarray, signs: tuple[int, ...] | None = None, l2: float = L2,
                 steps: int = 25) -> tuple[np.ndarray, float]:
    """Weights and bias of a logistic regression of labels `y` (0/1, shape (n,)) on standardised features
    `x` (shape (n, d)), by Newton's method with an L2 penalty `l2` (not on the bias). With `signs` (+1 or -1
    per feature), a feature whose weight comes out of the other sign is left out (weight 0) and the rest
    refitted, until every weight keeps to its sign."""
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


def feature_matrix(pairs: list[LabelledPair], cosines: np.ndarray) -> np.ndarray:
    """FEATURES of each pair (the cached question against the query), shape (n, len(FEATURES))."""
    if not pairs:
        return np.zeros((0, len(FEATURES)))
    return np.stack([pair_features(p.query, p.cached, float(c)).values for p, c in zip(pairs, cosines)])


def train_verifier(pairs: list[LabelledPair], cosines: np.ndarray, source: str) -> VerifierModel:
    """A verifier trained on `pairs` whose embeddings have `cosines` (shape (n,)), calibrated on the same pairs
    through cross-fitting. Raises ValueError with too few pairs of either label above TRAINING_FLOOR."""
    keep = cosines >= TRAINING_FLOOR
    chosen = [p for p, k in zip(pairs, keep) if k]
    x, y, cos = feature_matrix(chosen, cosines[keep]), np.array([p.same_answer for p in chosen], float), cosines[keep]
    if y.sum() < 10 or (1 - y).sum() < 10:
        raise ValueError(f"training the verifier needs at least 10 pairs of each label at cosine >= {TRAINING_FLOOR}")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    standard = (x - mean) / scale
    folds = np.random.default_rng(SEED).permutation(len(y)) % FOLDS
    held = np.zeros(len(y))
    for fold in range(FOLDS):
        weights, bias = fit_logistic(standard[folds != fold], y[folds != fold], FEATURE_SIGNS)
        held[folds == fold] = 1.0 / (1.0 + np.exp(-(standard[folds == fold] @ weights + bias)))
    weights, bias = fit_logistic(standard, y, FEATURE_SIGNS)
    guarded = np.array([check(p.query, p.cached).fired(VETO_GUARDS) is not None for p in chosen])
    table = CalibrationTable.from_pairs(cos, held, guarded, y.astype(bool))
    return VerifierModel(weights, bias, mean, scale, table, source)


def train_from_embeddings(pairs: list[LabelledPair], embed: Callable[[list[str]], np.ndarray],
                          source: str) -> VerifierModel:
    """`train_verifier` with the cosines of `embed`'s unit-length embeddings of each pair."""
    cached, query = embed([p.cached for p in pairs]), embed([p.query for p in pairs])
    return train_verifier(pairs, np.einsum("ij,ij->i", cached, query), source)


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
