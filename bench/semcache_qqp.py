"""The semantic cache on real user questions: Quora question pairs (QQP), `python bench/semcache.py qqp`.

Data: ../shared/data/pairs/qqp/qqp-train.tsv (15.5k labelled pairs, read by path, never copied). Pairs with
`int(id) % 5 == 0` are held out: evaluation only, never used to tune anything (`split_held_out`); the others
are the tuning split. Both are balanced (`balanced`): the held-out pairs used are all held-out duplicates and as
many non-duplicates drawn with a fixed seed, as the issue's live measurement balanced 150 and 150; the tuning
pairs, a seeded draw of as many of each (bench/semcache.py caps them at QQP_TUNE_PER_CLASS).

Protocol (`cache_outcomes`), as the issue measured it, through the real `SemanticCache` with the default
settings (or the command's overrides, `settings_with`) and the embedded answer store (or Redis): for each
held-out pair, store the first question with an answer of its own, look up the second question, then drop the entry,
so that each lookup sees its own pair's first question only. Whatever the cache decides (categories, scopes,
thresholds, and any verifier inside `SemanticCache.lookup`) is what is measured. A hit on a duplicate pair is a
true hit, on a non-duplicate a false hit. Reported: the share of duplicate pairs served from the cache and the
false share of hits (false / all hits), each with a 95% bootstrap interval over pairs (resampled within
duplicates and within non-duplicates, keeping the balance).

Baselines come from the all-MiniLM-L6-v2 cosine of each pair alone (no cache): a static threshold serves a pair
when the cosine reaches it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from blendgate.semcache.answer_store import AnswerStore, MemoryAnswerStore
from blendgate.semcache.cache import SemanticCache
from blendgate.semcache.lookup import CacheQuery
from blendgate.semcache.metrics import SemanticCacheMetrics
from blendgate.semcache.pairs import is_held_out
from blendgate.semcache.settings import CategoryPolicy, SemanticCacheSettings
from prometheus_client import CollectorRegistry

QQP_FILE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "pairs" / "qqp" / "qqp-train.tsv"
GPTCACHE_DEFAULT = 0.8  # GPTCache's similarity threshold
REDISVL_DEFAULT = 0.9  # RedisVL's SemanticCache distance_threshold 0.1 (cosine distance) as a cosine similarity
BOUNDS = (0.01, 0.02, 0.05)  # false shares of hits a static threshold is tuned for (vCache's error bound)


@dataclass(frozen=True)
class QqpPair:
    """One labelled Quora question pair (the data file -> the benchmark's protocol)."""

    pair_id: int
    first: str
    second: str
    duplicate: bool


def load_qqp(path: Path = QQP_FILE) -> list[QqpPair]:
    """Every pair of the file (tab-separated: id, qid1, qid2, question1, question2, is_duplicate; a header)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    return [QqpPair(int(row[0]), row[3].strip(), row[4].strip(), row[5] == "1") for row in rows[1:]]


def split_held_out(pairs: list[QqpPair]) -> tuple[list[QqpPair], list[QqpPair]]:
    """(tuning, held out): a pair whose id is a multiple of 5 is held out for evaluation and never used to tune
    or train anything (semcache/pairs.py: `is_held_out`, the rule the verifier's training follows)."""
    return [p for p in pairs if not is_held_out(p.pair_id)], [p for p in pairs if is_held_out(p.pair_id)]


def balanced(pairs: list[QqpPair], per_class: int | None = None, seed: int = 0) -> list[QqpPair]:
    """`per_class` duplicates and as many non-duplicates (None: all duplicates, and as many non-duplicates
    as there are duplicates, or all of them if fewer), drawn with `seed`, in file order."""
    duplicates = [p for p in pairs if p.duplicate]
    others = [p for p in pairs if not p.duplicate]
    count = min(per_class or len(duplicates), len(duplicates), len(others))
    rng = np.random.default_rng(seed)
    chosen = {p.pair_id for group in (duplicates, others)
              for p in (group[i] for i in rng.choice(len(group), count, replace=False))}
    return [p for p in pairs if p.pair_id in chosen]


# -- the cache's decisions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairOutcome:
    """What the cache did with one pair's second question (the protocol -> the counting)."""

    pair: QqpPair
    status: str  # the lookup's status: "hit", "miss" or "bypass"
    category: str | None  # the second question's category
    threshold: float | None  # the threshold of that category the lookup applied (None: not looked up)
    stored: bool  # whether the first question was stored at all (not: personal, no user...)
    lookup_ms: float  # SemanticCache.lookup, end to end (classify, search, candidate checks, fetch)

    @property
    def served(self) -> bool:
        return self.status == "hit"


def settings_with(overrides: list[str], category_overrides: list[str]) -> SemanticCacheSettings:
    """The default settings with KEY=VALUE `overrides` of their own fields and `category_overrides` of every
    category's (values read as YAML: 0.01, false, [a, b]), e.g. a false-hit bound or a verifier part switched
    off. Raises ValueError for a pair without "=", pydantic's ValidationError for an unknown key or a bad value."""
    def parsed(pairs: list[str]) -> dict:
        if any("=" not in pair for pair in pairs):
            raise ValueError(f"expected KEY=VALUE, got {[pair for pair in pairs if '=' not in pair]}")
        return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}

    defaults = SemanticCacheSettings()
    categories = [CategoryPolicy.model_validate({**c.model_dump(), **parsed(category_overrides)})
                  for c in defaults.categories]
    return SemanticCacheSettings.model_validate({**defaults.model_dump(), "categories": categories,
                                                 **parsed(overrides)})


def default_cache(settings: SemanticCacheSettings, dimension: int, embed: Callable[[list[str]], np.ndarray],
                  store: AnswerStore | None = None) -> SemanticCache:
    """A `SemanticCache` over `store` (default: the embedded one) reporting to a registry of its own."""
    return SemanticCache(settings, store or MemoryAnswerStore(), dimension, embed,
                         SemanticCacheMetrics(CollectorRegistry()))


def pair_query(text: str) -> CacheQuery:
    # One tenant, one end user and one context: only the question differs between the two sides of a pair.
    return CacheQuery(tenant="qqp", model="bench", text=text, context="qqp", user="bench")


async def cache_outcomes(cache: SemanticCache, pairs: list[QqpPair],
                         vector: Callable[[str], np.ndarray]) -> list[PairOutcome]:
    """Per pair: store the first question (in the category the cache's classifier gives it, with an answer of
    its own), look up the second, drop the entry. `vector`: a question's unit-length embedding. The cache must
    be started and empty; it is left empty."""
    outcomes = []
    for pair in pairs:
        first = vector(pair.first)
        category = cache.classify(pair.first, first).category
        entry_id = await cache.put(pair_query(pair.first), first, category,
                                   {"content": f"answer to question {pair.pair_id}/1", "usage": None})
        result = await cache.lookup(pair_query(pair.second), vector(pair.second))
        if result.status == "hit":
            assert result.entry is not None and result.entry.entry_id == entry_id, "hit on another pair's entry"
        if entry_id is not None:
            await cache.invalidate(entry_id=entry_id)
        outcomes.append(PairOutcome(pair, result.status, result.category,
                                    result.policy.threshold if result.policy is not None else None,
                                    entry_id is not None, result.lookup_ms))
    return outcomes


# -- counting ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    """Hit rate on duplicates and false share of hits of one policy on one set of pairs, with 95% bootstrap
    intervals over pairs (the counting -> the report)."""

    pairs: int
    duplicates: int
    true_hits: int  # duplicate pairs served
    false_hits: int  # non-duplicate pairs served
    duplicate_hit_rate: float  # true hits / duplicates
    duplicate_interval: tuple[float, float]
    false_share: float  # false hits / (true + false hits); 0 without hits
    false_interval: tuple[float, float]


def _share(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def resample_indices(duplicate: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, pairs) indices drawn with replacement within duplicates and within non-duplicates."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(duplicate), np.flatnonzero(~duplicate)]
    return np.concatenate([g[rng.integers(0, len(g), (resamples, len(g)))] for g in groups if len(g)], axis=1)


def rates(served: np.ndarray, duplicate: np.ndarray, resamples: int = 2000, seed: int = 0) -> Rates:
    """`served`, `duplicate`: one bool per pair."""
    served, duplicate = np.asarray(served, dtype=bool), np.asarray(duplicate, dtype=bool)
    true, false = served & duplicate, served & ~duplicate
    picks = resample_indices(duplicate, resamples, seed)
    t, f, d = true[picks].sum(axis=1), false[picks].sum(axis=1), duplicate[picks].sum(axis=1)

    def interval(values: np.ndarray) -> tuple[float, float]:
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    hits = int(true.sum() + false.sum())
    return Rates(len(served), int(duplicate.sum()), int(true.sum()), int(false.sum()),
                 float(true.sum() / max(duplicate.sum(), 1)), interval(_share(t, d)),
                 float(false.sum() / hits) if hits else 0.0, interval(_share(f, t + f)))


@dataclass(frozen=True)
class FalseHitComparison:
    """False hits of one policy against a baseline's on the same pairs (the counting -> the report)."""

    mine: int
    theirs: int
    difference_interval: tuple[float, float]  # mine - theirs, 95% paired bootstrap

    @property
    def ratio(self) -> float | None:
        """mine / theirs; None when the baseline has no false hits."""
        return self.mine / self.theirs if self.theirs else None


def compare_false_hits(served: np.ndarray, baseline: np.ndarray, duplicate: np.ndarray, resamples: int = 2000,
                       seed: int = 0) -> FalseHitComparison:
    """False hits of `served` and of `baseline` (one bool per pair each) with the 95% paired-bootstrap interval
    of their difference."""
    duplicate = np.asarray(duplicate, dtype=bool)
    mine, theirs = np.asarray(served, bool) & ~duplicate, np.asarray(baseline, bool) & ~duplicate
    picks = resample_indices(duplicate, resamples, seed)
    difference = mine[picks].sum(axis=1) - theirs[picks].sum(axis=1)
    return FalseHitComparison(int(mine.sum()), int(theirs.sum()),
                              (float(np.percentile(difference, 2.5)), float(np.percentile(difference, 97.5))))


# -- static thresholds on the pair cosine -----------------------------------------------------------------------
def pair_cosines(pairs: list[QqpPair], vector: Callable[[str], np.ndarray]) -> np.ndarray:
    """The cosine of each pair's two questions (unit-length embeddings)."""
    return np.array([float(np.dot(vector(p.first), vector(p.second))) for p in pairs], dtype=np.float64)


def tuned_threshold(cosines: np.ndarray, duplicate: np.ndarray, bound: float) -> float | None:
    """The lowest threshold (one of the cosines) whose false share of hits on these pairs is within `bound`,
    with at least one true hit: the most duplicates served within the bound. None when no threshold is."""
    duplicate = np.asarray(duplicate, dtype=bool)
    order = np.argsort(-cosines, kind="stable")
    ranked, labels = cosines[order], duplicate[order]
    true, false = np.cumsum(labels), np.cumsum(~labels)
    # A threshold serves every pair at or above it: only the last of a run of equal cosines is a cut.
    cuts = np.flatnonzero(np.append(ranked[1:] < ranked[:-1], True))
    within = [k for k in cuts if true[k] > 0 and false[k] / (true[k] + false[k]) <= bound]
    return float(ranked[within[-1]]) if within else None


def same_rate_threshold(cosines: np.ndarray, duplicate: np.ndarray, duplicate_hit_rate: float) -> float:
    """The highest threshold serving at least `duplicate_hit_rate` of the duplicate pairs."""
    duplicates = np.sort(cosines[np.asarray(duplicate, dtype=bool)])[::-1]
    needed = max(1, int(np.ceil(duplicate_hit_rate * len(duplicates) - 1e-9)))
    return float(duplicates[min(needed, len(duplicates)) - 1])


def write_false_hits(outcomes: list[PairOutcome], cosines: np.ndarray, path: Path) -> int:
    """Write the non-duplicate pairs the cache served (its false hits) to `path` as tab-separated rows (pair id,
    the second question's category, the pair's MiniLM cosine, first question, second question; a header), for
    auditing by hand. `cosines`: one per outcome, in order. Returns the number written."""
    rows = [(o.pair.pair_id, o.category or "", f"{cosine:.4f}", o.pair.first, o.pair.second)
            for o, cosine in zip(outcomes, cosines) if o.served and not o.pair.duplicate]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(("id", "category", "cosine", "first", "second"))
        writer.writerows(rows)
    return len(rows)


# -- the report -------------------------------------------------------------------------------------------------
def table_row(label: str, threshold: str, r: Rates) -> str:
    return (f"| {label} | {threshold} | {r.true_hits}/{r.duplicates} | {r.duplicate_hit_rate:.3f} "
            f"({r.duplicate_interval[0]:.3f}-{r.duplicate_interval[1]:.3f}) | {r.false_hits}/{r.pairs - r.duplicates} "
            f"| {r.false_share:.3f} ({r.false_interval[0]:.3f}-{r.false_interval[1]:.3f}) |")


TABLE_HEAD = ["| policy | threshold | duplicates served | share of duplicates served (95% CI) | "
              "non-duplicates served (false hits) | false share of hits (95% CI) |", "|---|---|---|---|---|---|"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(outcomes: list[PairOutcome], held_out: np.ndarray, tune: tuple[np.ndarray, np.ndarray]) -> str:
    """The markdown section: the cache against static thresholds. `held_out`: the cosine of each outcome's
    pair; `tune`: the tuning split's (cosines, duplicate) that the tuned thresholds are chosen on."""
    duplicate = np.array([o.pair.duplicate for o in outcomes])
    served = np.array([o.served for o in outcomes])
    cache = rates(served, duplicate)
    rows = TABLE_HEAD + [table_row("**semantic cache** (live lookups)", "per category", cache)]
    # The thresholds the cache applied, on the pair cosine alone: the cache without its category and scope
    # routing (a bypassed question, e.g. a personal one, is not served).
    applied = np.array([o.threshold if o.threshold is not None and o.status != "bypass" else np.inf
                        for o in outcomes])
    rows.append(table_row("MiniLM cosine >= the question's category threshold (gateway defaults, no routing)",
                          "per category", rates(held_out >= applied, duplicate)))
    for label, threshold in (("GPTCache default (similarity 0.8)", GPTCACHE_DEFAULT),
                             ("RedisVL default (cosine distance 0.1); also CategoryPolicy's default 0.9",
                              REDISVL_DEFAULT)):
        rows.append(table_row(label, f"{threshold:.4f}", rates(held_out >= threshold, duplicate)))
    tuned_notes = []
    for bound in BOUNDS:
        threshold = tuned_threshold(*tune, bound)
        if threshold is None:
            tuned_notes.append(f"no single threshold keeps the tuning split's false share within {bound:.0%}")
            continue
        rows.append(table_row(f"single MiniLM threshold tuned on the tuning split for <= {bound:.0%} false",
                              f"{threshold:.4f}", rates(held_out >= threshold, duplicate)))
    same = same_rate_threshold(held_out, duplicate, cache.duplicate_hit_rate)
    rows.append(table_row("best single MiniLM threshold at the cache's share of duplicates served "
                          "(chosen on held-out, in its favour)", f"{same:.4f}", rates(held_out >= same, duplicate)))
    versus = compare_false_hits(served, held_out >= same, duplicate)
    low, high = versus.difference_interval

    by_status: dict[str, int] = {}
    for o in outcomes:
        key = o.status + (f" ({o.category})" if o.status == "bypass" else "")
        by_status[key] = by_status.get(key, 0) + 1
    categories = sorted({o.category or "none" for o in outcomes})
    category_rows = ["| second question's category | pairs | duplicates served | false hits | bypassed |",
                     "|---|---|---|---|---|"]
    for name in categories:
        mine = [o for o in outcomes if (o.category or "none") == name]
        true = sum(o.served and o.pair.duplicate for o in mine)
        false = sum(o.served and not o.pair.duplicate for o in mine)
        category_rows.append(f"| {name} | {len(mine)} | {true}/{sum(o.pair.duplicate for o in mine)} | {false} | "
                             f"{sum(o.status == 'bypass' for o in mine)} |")
    looked_up = [o.lookup_ms for o in outcomes if o.status != "bypass"]
    done = cache.false_share <= 0.05 and cache.duplicate_hit_rate >= 0.15
    notes = [
        f"Cache outcomes: {', '.join(f'{k} {v}' for k, v in sorted(by_status.items()))}; first questions stored: "
        f"{sum(o.stored for o in outcomes)} of {len(outcomes)}.",
        f"At the cache's share of duplicates served ({cache.duplicate_hit_rate:.3f}), the best single MiniLM "
        f"threshold ({same:.4f}) serves {versus.theirs} non-duplicates, the cache {versus.mine}: ratio "
        f"{'n/a' if versus.ratio is None else f'{versus.ratio:.2f}'} (the issue asks for at most 0.5); cache minus "
        f"threshold {versus.mine - versus.theirs:+d} false hits, 95% paired bootstrap {low:+.0f} to {high:+.0f}.",
        f"Issue 19's bar (false share <= 5% with >= 15% of duplicates served): {'met' if done else 'not met'} "
        f"(false share {cache.false_share:.3f}, duplicates served {cache.duplicate_hit_rate:.3f}).",
        f"Lookup time of the {len(looked_up)} lookups made (SemanticCache.lookup end to end: classify, search, "
        f"candidate checks, any verifier, fetch on hits; one entry in the cache): p50 {percentile(looked_up, 50):.3f}"
        f" ms, p99 {percentile(looked_up, 99):.3f} ms.",
    ] + tuned_notes
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n\n" + "\n".join(category_rows)
