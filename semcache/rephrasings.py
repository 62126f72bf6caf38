"""Trivial rephrasings of questions, labelled "same answer", to train the verifier on (verifier_training.py).

Quora's different-answer pairs were picked for the words they share, so a classifier trained on them alone
learns that near-identical wording means a different question. Each question here is paired with one
rewrite that cannot change its answer: lower case without the question mark, title case, a contraction made
or expanded ("What is" / "What's"), or the two words around an "and" swapped ("apples and pears" / "pears and
apples"). Plain Python, seeded: the same questions give the same pairs.
"""

from __future__ import annotations

import re

import numpy as np

from .tuning import LabelledPair

CONTRACTIONS = (("What is", "What's"), ("what is", "what's"), ("Who is", "Who's"), ("it is", "it's"),
                ("do not", "don't"), ("does not", "doesn't"), ("is not", "isn't"), ("can not", "can't"),
                ("I am", "I'm"), ("I have", "I've"))
_AND = re.compile(r"\b(\w+) and (\w+)\b")
SEED = 19


def rewrites(question: str) -> list[str]:
    """The rewrites of `question` that differ from it (see the module docstring), in a fixed order."""
    found = [question.lower().rstrip("?").strip(), question.title()]
    for long, short in CONTRACTIONS:
        if long in question:
            found.append(question.replace(long, short))
            break
        if short in question:
            found.append(question.replace(short, long))
            break
    pair = _AND.search(question)
    if pair:
        found.append(f"{question[:pair.start()]}{pair.group(2)} and {pair.group(1)}{question[pair.end():]}")
    return [r for r in found if r and r != question]


def rephrasings(questions: list[str], count: int, seed: int = SEED) -> list[LabelledPair]:
    """Up to `count` pairs (a question, one of its rewrites chosen with `seed`), labelled same answer, from
    distinct questions of `questions` drawn with `seed`."""
    distinct = sorted(set(questions))
    rng = np.random.default_rng(seed)
    pairs = []
    for i in rng.permutation(len(distinct))[:count]:
        options = rewrites(distinct[i])
        if options:
            pairs.append(LabelledPair(distinct[i], options[int(rng.integers(len(options)))], True))
    return pairs
