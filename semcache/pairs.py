"""Labelled question pairs from Quora Question Pairs (QQP) and the one rule that holds some of them out.

The rule: a pair whose `id` is a multiple of 5 is HELD OUT, for evaluation only (the benchmark's numbers);
every other pair may train or tune something (the verifier's default weights, its calibration, thresholds).
Everything that reads QQP goes through `qqp_split`, so the rule lives here and nowhere else.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .tuning import LabelledPair, PairsFileError

# One pair in this many (by id) is held out.
HELD_OUT_MODULUS = 5


def is_held_out(pair_id: int) -> bool:
    """True for a pair kept for evaluation only (never trained or tuned on)."""
    return pair_id % HELD_OUT_MODULUS == 0


def read_qqp(path: Path) -> list[tuple[int, LabelledPair]]:
    """(id, pair) per row of a QQP TSV (columns id, qid1, qid2, question1, question2, is_duplicate): question1
    is the cached question, question2 the later query. Raises PairsFileError for a file that cannot be read
    or lacks the columns."""
    try:
        with path.open(encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PairsFileError(f"cannot read {path}: {exc}") from None
    pairs = []
    for number, row in enumerate(rows, 2):
        try:
            pair_id, first, second = int(row["id"]), row["question1"], row["question2"]
            same = row["is_duplicate"].strip() == "1"
        except (KeyError, TypeError, ValueError, AttributeError):
            raise PairsFileError(f"{path}:{number}: expected id, question1, question2 and is_duplicate") from None
        if first and first.strip() and second and second.strip():
            pairs.append((pair_id, LabelledPair(first, second, same)))
    return pairs


def qqp_split(path: Path) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """(tune, held_out): the pairs of a QQP TSV that may be trained and tuned on, and those held out
    (`is_held_out` of their id), each in file order."""
    tune, held_out = [], []
    for pair_id, pair in read_qqp(path):
        (held_out if is_held_out(pair_id) else tune).append(pair)
    return tune, held_out
