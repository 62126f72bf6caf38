"""The verifier of candidate hits: after the index search, does a cached question ask the same thing as the
new one, so that its answer serves both?

It decides from the two texts and their cosine similarity (no second model call): pair features (the
cosine, token overlap, length ratio, the words that differ and how rare they are (pair_words.py), and the
guards' flags, guards.py) go through a logistic regression whose weights ship as JSON
(`verifier_default.json`, trained on the QQP tuning split: verifier_training.py, with the document
frequencies of its questions); a candidate passes when the probability reaches its category's threshold,
calibrated for the category's false-hit bound (bound.py) unless the operator fixes one. Plain Python + numpy:
about 0.1 ms per candidate on one core (bench/verifier_cost.py: p50 82 us, p99 194 us on the QQP tuning pairs).
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
from .pair_words import STOPWORDS, WORD_FEATURES, WordRarity, word_differences
from .settings import CategoryPolicy

DEFAULT_VERIFIER_FILE = Path(__file__).with_name("verifier_default.json")

FEATURES = ("cosine", "jaccard", "content_jaccard", "length_ratio", "differing_content_words",
            "numbers", "entities", "negation", "comparison", *WORD_FEATURES)
# The direction each feature may push the probability of "same question": +1 only up, -1 only down, 0 either.
# Training keeps to these (verifier_training.fit_logistic). The cosine, the shared words (jaccard,
# content_jaccard, rarity_overlap) and the guards' flags have a direction: QQP's different-answer pairs were
# picked for their shared words, so a free fit learns that sharing words, rare ones most, means another
# question, and refused "What is the height of Mount Everest?" for "How tall is Mount Everest?" (cosine 0.97).
# The length and differing-word features do not: at a given cosine, more differing words mean a paraphrase the
# embedding still finds close, a single swapped word one it found close in spite of a changed question ("learn
# Python" / "learn Java"), the opposite of their direction across all pairs. The rephrasings trained on besides
# (rephrasings.py) keep "What's the capital of France?" for "What is the capital of France?". Constraining every
# feature (as before) left the cosine and three guards alone.
FEATURE_SIGNS = (1, 1, 1, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, 0, 1)
# The guards that refuse a candidate on their own, unless the operator fixed the category's probability. On the
# QQP tuning pairs at cosine >= 0.905, refusing on a mismatched number, name or negation served 34.6% of the
# same-answer pairs with 15.3% of hits false (19.4% on the cosine alone); adding the comparison guard served
# 29.8% at 15.1%, so it stays a feature of the classifier only; its narrow case, a word against its opposite
# ("positive" / "negative": 1 duplicate among the 6 tuning pairs at cosine >= 0.89 it fires on, 2 of the 14
# held-out false hits of the default cache), refuses, as does two words exchanged ("Do Croats like Turks?" /
# "Do Turks like Croats?": 1 labelled duplicate among the 5 of all tuning pairs). Neither is a feature: the
# weights need no retraining for them.
VETO_GUARDS = ("numbers", "entities", "negation", "opposites", "exchanged")
_WORD = re.compile(r"[a-z0-9]+")


class VerifierFileError(ValueError):
    """A verifier weights file cannot be read; the message says which and why."""


# Contractions spelled out for `same_wording`: the ending after the apostrophe, and what guards.tokens leaves
# of a negative one ("can't" is "ca" and "n't").
_CONTRACTED = {"s": "is", "re": "are", "ve": "have", "ll": "will", "d": "would", "m": "am"}
_NEGATIVE_STEMS = {"ca": "can", "wo": "will", "sha": "shall", "n't": "not"}


def _spelled_out(text: str) -> list[str]:
    words = []
    for word in tokens(text):
        head, _, tail = word.lower().partition("'")
        if head == "n" and tail == "t":
            words.append("not")
        elif tail in _CONTRACTED:
            words += [head, _CONTRACTED[tail]]
        else:
            words.append(_NEGATIVE_STEMS.get(head, head) + (f"'{tail}" if tail else ""))
    return words


def same_wording(query: str, cached: str) -> bool:
    """Whether the two questions have the same words in the same order, whatever their case and punctuation
    and with contractions spelled out ("What's" is "what is", "can't" is "can not"): one question, whatever
    the cosine says (all-MiniLM-L6-v2 puts "what is the capital of france" at 0.906 from "What is the capital
    of France?", below what the classifier accepts there)."""
    return _spelled_out(query) == _spelled_out(cached)


@dataclass(frozen=True)
class PairFeatures:
    """One (query, cached question) pair as the classifier sees it: the hand-off from `pair_features` to the
    model. `values` follows FEATURES; `guards` names a rejection's reason."""

    values: np.ndarray  # float64, shape (len(FEATURES),)
    guards: GuardFlags


def pair_features(query: str, cached: str, cosine: float, rarity: WordRarity) -> PairFeatures:
    """The features of a new question against a cached one whose embeddings have cosine `cosine`, the words'
    rarity read from `rarity`."""
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
        *word_differences(query, cached, rarity),
    ])
    return PairFeatures(values, guards)


@dataclass
class VerifierModel:
    """Logistic regression over standardised FEATURES, the labelled pairs it was calibrated on and the word
    rarity its features read. `probability` of "same question, same answer" is
    sigmoid(((x - mean) / scale) @ weights + bias)."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    calibration: CalibrationTable
    source: str  # where the weights came from, for operators (e.g. "QQP tuning split, 12379 pairs")
    rarity: WordRarity

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for rows of features (shape (n, len(FEATURES))), shape (n,)."""
        logits = ((features - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({
            "features": list(FEATURES), "weights": self.weights.round(6).tolist(), "bias": round(self.bias, 6),
            "mean": self.mean.round(6).tolist(), "scale": self.scale.round(6).tolist(), "source": self.source,
            "calibration": self.calibration.to_json(), "word_rarity": self.rarity.to_json()}) + "\n")

    @classmethod
    def load(cls, path: Path) -> "VerifierModel":
        """Raises VerifierFileError for a file that is missing, not JSON, or made for other features."""
        try:
            data = json.loads(path.read_text())
            if data["features"] != list(FEATURES):
                raise VerifierFileError(f"{path} was trained on features {data['features']}, not {list(FEATURES)}")
            return cls(np.array(data["weights"], dtype=np.float64), float(data["bias"]),
                       np.array(data["mean"], dtype=np.float64), np.array(data["scale"], dtype=np.float64),
                       CalibrationTable.from_json(data["calibration"]), str(data.get("source", path.name)),
                       WordRarity.from_json(data["word_rarity"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, VerifierFileError):
                raise
            raise VerifierFileError(f"cannot read verifier weights {path}: {exc}") from None


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer for one candidate (the hand-off from the verifier to the lookup path): whether it
    may be served, the probability, and when refused why: the first guard that fired ("numbers", "entities",
    "negation", "comparison", "opposites", "exchanged") or "classifier"."""

    accepted: bool
    probability: float
    reason: str | None = None


class Verifier:
    """Decides candidate hits with `model`, per category at the probability threshold its policy fixes
    (CategoryPolicy.verifier_threshold) or else the one calibrated for its false_hit_bound at its threshold.
    With a calibrated threshold, a candidate on which one of VETO_GUARDS fires is refused on its own (the
    calibration counts only what they let through, bound.CalibrationTable.calibrate); with a fixed one the
    probability alone decides. Where no probability threshold holds the bound on the calibration pairs
    (bound.Calibration.met is False), the one that comes closest applies, and the metrics and admin stats say
    the bound is not met (refusing on VETO_GUARDS alone instead, as before, served 24% of QQP's held-out
    duplicates with 12% of hits false: worse than one cosine threshold). A category without calibration pairs
    at or above its threshold has no probability threshold: only VETO_GUARDS refuse there.

    Under load the probability a candidate needs falls with the model's load level as the category's cosine
    threshold does (policy.effective_policy): threshold * (1 - level), so that at full load only the guards
    refuse what the category's threshold_under_load lets through (with a fixed threshold, a candidate on
    which one of VETO_GUARDS fires still needs all of it)."""

    def __init__(self, model: VerifierModel, categories: list[CategoryPolicy]) -> None:
        self.model = model
        self.calibrations: dict[str, Calibration] = {
            c.name: model.calibration.calibrate(c.name, c.threshold, c.false_hit_bound) for c in categories if c.cached}
        # Per category, the probability a candidate needs; None: guards alone decide.
        self.thresholds: dict[str, float | None] = {
            c.name: c.verifier_threshold if c.verifier_threshold is not None else self.calibrations[c.name].probability
            for c in categories if c.cached}
        # The categories whose threshold the operator fixed: there the guards do not refuse on their own.
        self.fixed = {c.name for c in categories if c.cached and c.verifier_threshold is not None}

    @classmethod
    def load(cls, path: Path | None, categories: list[CategoryPolicy]) -> "Verifier":
        """The verifier with the weights at `path` (None: the default shipped with the package)."""
        return cls(VerifierModel.load(path or DEFAULT_VERIFIER_FILE), categories)

    def verify(self, query: str, cached: str, cosine: float, category: str, load_level: float = 0.0) -> Verdict:
        """Whether the answer cached for question `cached` (of `category`) may answer `query`, the model being at
        `load_level` (0 to 1, policy.LoadMonitor.level): always when both have the same wording
        (`same_wording`), else as the class docstring says."""
        features = pair_features(query, cached, cosine, self.model.rarity)
        probability = float(self.model.probabilities(features.values[None, :])[0])
        if same_wording(query, cached):
            return Verdict(True, probability)
        threshold = self.thresholds.get(category, math.inf)
        fired = features.guards.fired(VETO_GUARDS)
        if fired and category not in self.fixed:
            return Verdict(False, probability, fired)
        if threshold is None:
            return Verdict(True, probability)
        if probability >= (threshold if fired else threshold * (1 - min(max(load_level, 0.0), 1.0))):
            return Verdict(True, probability)
        return Verdict(False, probability, features.guards.fired() or "classifier")
