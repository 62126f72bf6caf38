"""The verifier of candidate hits: after the index search, does a cached question ask the same thing as the
new one, so that its answer serves both?

It decides from the two texts and their cosine similarity (no second model call): pair features (the
cosine, token overlap, length ratio, the words that differ, and the guards' flags, guards.py) go through a
logistic regression whose weights ship as JSON (`verifier_default.json`, trained on the QQP tuning split:
verifier_training.py); a candidate passes when the probability reaches its category's threshold, calibrated
for the category's false-hit bound (bound.py) unless the operator fixes one. Plain Python + numpy: tens of
microseconds per candidate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bound import Calibration, CalibrationTable
from .guards import GuardFlags, check, tokens
from .settings import CategoryPolicy

DEFAULT_VERIFIER_FILE = Path(__file__).with_name("verifier_default.json")

FEATURES = ("cosine", "jaccard", "content_jaccard", "length_ratio", "differing_content_words",
            "numbers", "entities", "negation", "comparison")
# The direction each feature may push the probability of "same question": +1 only up, -1 only down. Training
# keeps to these (verifier_training.fit_logistic): QQP's different-answer pairs were picked for their shared
# words, so an unconstrained fit learns that near-identical wording means a different question, and would
# refuse "What's the capital of France?" for "What is the capital of France?".
FEATURE_SIGNS = (1, 1, 1, 1, -1, -1, -1, -1, -1)
# The guards that refuse a candidate on their own where the classifier cannot hold a category's bound. On the
# QQP tuning pairs at cosine >= 0.905, refusing on a mismatched number, name or negation served 34.6% of the
# same-answer pairs with 15.3% of hits false (19.4% on the cosine alone); adding the comparison guard served
# 29.8% at 15.1%, so it stays a feature of the classifier only.
VETO_GUARDS = ("numbers", "entities", "negation")
STOPWORDS = frozenset(
    "a an the is are was were be been being do does did i you he she it we they me my your of to in on at for "
    "with by from and or as that this these those what which who whom how why when where can could should "
    "would will shall may might must has have had am any some there their its if so than then into about "
    "get".split())
_WORD = re.compile(r"[a-z0-9]+")


class VerifierFileError(ValueError):
    """A verifier weights file cannot be read; the message says which and why."""


@dataclass(frozen=True)
class PairFeatures:
    """One (query, cached question) pair as the classifier sees it: the hand-off from `pair_features` to the
    model. `values` follows FEATURES; `guards` names a rejection's reason."""

    values: np.ndarray  # float64, shape (len(FEATURES),)
    guards: GuardFlags


def pair_features(query: str, cached: str, cosine: float) -> PairFeatures:
    """The features of a new question against a cached one whose embeddings have cosine `cosine`."""
    guards = check(query, cached)
    first = {w.lower() for w in tokens(query)}
    second = {w.lower() for w in tokens(cached)}
    content_first, content_second = first - STOPWORDS, second - STOPWORDS
    union, content_union = first | second, content_first | content_second
    length_first, length_second = len(_WORD.findall(query.lower())), len(_WORD.findall(cached.lower()))
    values = np.array([
        cosine,
        len(first & second) / len(union) if union else 1.0,
        len(content_first & content_second) / len(content_union) if content_union else 1.0,
        min(length_first, length_second) / max(length_first, length_second, 1),
        math.log1p(len(content_first ^ content_second)),
        float(guards.numbers), float(guards.entities), float(guards.negation), float(guards.comparison),
    ])
    return PairFeatures(values, guards)


@dataclass
class VerifierModel:
    """Logistic regression over standardised FEATURES, and the labelled pairs it was calibrated on.
    `probability` of "same question, same answer" is sigmoid(((x - mean) / scale) @ weights + bias)."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    calibration: CalibrationTable
    source: str  # where the weights came from, for operators (e.g. "QQP tuning split, 12379 pairs")

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for rows of features (shape (n, len(FEATURES))), shape (n,)."""
        logits = ((features - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({
            "features": list(FEATURES), "weights": self.weights.round(6).tolist(), "bias": round(self.bias, 6),
            "mean": self.mean.round(6).tolist(), "scale": self.scale.round(6).tolist(), "source": self.source,
            "calibration": self.calibration.to_json()}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "VerifierModel":
        """Raises VerifierFileError for a file that is missing, not JSON, or made for other features."""
        try:
            data = json.loads(path.read_text())
            if data["features"] != list(FEATURES):
                raise VerifierFileError(f"{path} was trained on features {data['features']}, not {list(FEATURES)}")
            return cls(np.array(data["weights"], dtype=np.float64), float(data["bias"]),
                       np.array(data["mean"], dtype=np.float64), np.array(data["scale"], dtype=np.float64),
                       CalibrationTable.from_json(data["calibration"]), str(data.get("source", path.name)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, VerifierFileError):
                raise
            raise VerifierFileError(f"cannot read verifier weights {path}: {exc}") from None


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer for one candidate (the hand-off from the verifier to the lookup path): whether it
    may be served, the probability, and when refused why: the first guard that fired ("numbers", "entities",
    "negation", "comparison") or "classifier"."""

    accepted: bool
    probability: float
    reason: str | None = None


class Verifier:
    """Decides candidate hits with `model`, per category at the probability threshold its policy fixes
    (CategoryPolicy.verifier_threshold) or else the one calibrated for its false_hit_bound at its threshold.
    Where no probability threshold holds the bound on the calibration pairs (bound.Calibration.met is False),
    the category's candidates are refused only when one of VETO_GUARDS fires: a tighter probability would act as a
    higher cosine threshold (the classifier's probability rises with the cosine), overriding the category's
    threshold and its loosening under load, and the metrics and admin stats say the bound is not met."""

    def __init__(self, model: VerifierModel, categories: list[CategoryPolicy]) -> None:
        self.model = model
        self.calibrations: dict[str, Calibration] = {
            c.name: model.calibration.calibrate(c.name, c.threshold, c.false_hit_bound) for c in categories if c.cached}
        # Per category, the probability a candidate needs; None: guards alone decide.
        self.thresholds: dict[str, float | None] = {
            c.name: c.verifier_threshold if c.verifier_threshold is not None else self.calibrations[c.name].probability
            for c in categories if c.cached}

    @classmethod
    def load(cls, path: Path | None, categories: list[CategoryPolicy]) -> "Verifier":
        """The verifier with the weights at `path` (None: the default shipped with the package)."""
        return cls(VerifierModel.load(path or DEFAULT_VERIFIER_FILE), categories)

    def verify(self, query: str, cached: str, cosine: float, category: str) -> Verdict:
        """Whether the answer cached for question `cached` (of `category`) may answer `query`."""
        features = pair_features(query, cached, cosine)
        probability = float(self.model.probabilities(features.values[None, :])[0])
        threshold = self.thresholds.get(category, math.inf)
        if threshold is None:
            fired = features.guards.fired(VETO_GUARDS)
            return Verdict(fired is None, probability, fired)
        if probability >= threshold:
            return Verdict(True, probability)
        return Verdict(False, probability, features.guards.fired() or "classifier")
