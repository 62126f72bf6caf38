"""`blendgate tune-thresholds`: per-category thresholds from labelled pairs, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from blendgate.semcache.settings import SemanticCacheSettings
from blendgate.semcache.tuning import (
    LabelledPair,
    PairsFileError,
    lowest_threshold_within,
    read_pairs,
    suggest_thresholds,
)
from gateway_launcher import run_cli


def test_lowest_threshold_keeps_false_hits_within_the_budget() -> None:
    similarities = np.array([0.99, 0.97, 0.95, 0.93, 0.91, 0.89, 0.80])
    same = np.array([True, True, False, True, True, True, False])
    # At 0.95 one of three hits is false; going down to 0.89 makes it one of six.
    assert lowest_threshold_within(similarities, same, budget=0.2) == 0.89
    # No false hit allowed: only the pairs above the different one at 0.95.
    assert lowest_threshold_within(similarities, same, budget=0.0) == 0.97
    assert lowest_threshold_within(np.array([0.9, 0.8]), np.array([False, True]), budget=0.0) is None


def test_a_threshold_admits_the_pair_it_was_set_on() -> None:
    similarities = np.array([0.912345, 0.7])
    threshold = lowest_threshold_within(similarities, np.array([True, False]), budget=0.0)
    assert threshold == 0.9123 and similarities[0] >= threshold


def write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


@pytest.mark.parametrize("row, message", [
    ("{not json", ":2: not JSON"),
    ('["a", "b", true]', "expected an object"),
    ({"cached": "a", "query": "", "same_answer": True}, "non-empty strings"),
    ({"cached": "a", "query": "b", "same_answer": "yes"}, "true or false"),
])
def test_bad_pairs_files_say_where_and_why(tmp_path: Path, row, message: str) -> None:
    path = write(tmp_path / "pairs.jsonl", [{"cached": "a", "query": "b", "same_answer": True}, row])
    with pytest.raises(PairsFileError, match=message):
        read_pairs(path)


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PairsFileError, match="no labelled pairs"):
        read_pairs(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(PairsFileError, match="cannot read"):
        read_pairs(tmp_path / "missing.jsonl")


CODE_PAIRS = [
    ("How do I reverse a list in Python?", "How can I reverse a Python list?", True),
    ("How do I read a CSV file with pandas?", "Read a CSV file into a pandas DataFrame", True),
    ("How do I undo the last git commit?", "How to revert my most recent git commit?", True),
    ("How do I sort a dictionary by value in Python?", "Sort a Python dict by its values", True),
    ("How do I reverse a list in Python?", "How do I reverse a list in JavaScript?", False),
    ("How do I read a CSV file with pandas?", "How do I write a CSV file with pandas?", False),
]


def test_suggestions_per_category_with_the_real_embedder(embedder) -> None:
    pairs = [LabelledPair(a, b, same) for a, b, same in CODE_PAIRS]
    results = {r.category: r for r in suggest_thresholds(SemanticCacheSettings(), embedder.embed, pairs,
                                                         budget=0.0, min_pairs=3)}
    code = results["code"]
    assert code.pairs == len(CODE_PAIRS) and code.same == 4
    assert code.suggested is not None and code.false_hits == 0 and code.hits >= 1
    # The suggestion sits above every different pair of the category.
    vectors = [embedder.embed([a, b]) for a, b, same in CODE_PAIRS if not same]
    assert all(float(v[0] @ v[1]) < code.suggested for v in vectors)
    assert results["factual"].suggested is None and "fewer than 3" in results["factual"].reason
    assert results["personal"].reason == "never cached"


def test_command_prints_the_suggestions_and_refuses_a_bad_file(tmp_path: Path, embedder) -> None:
    pairs = write(tmp_path / "pairs.jsonl",
                  [{"cached": a, "query": b, "same_answer": same} for a, b, same in CODE_PAIRS])
    command = ["tune-thresholds"]
    result = run_cli([*command, str(pairs), "--min-pairs", "3", "--false-hits", "0"])
    assert result.returncode == 0, result.stderr
    suggested = json.loads(result.stdout)
    assert set(suggested) == {"code"} and 0 < suggested["code"] <= 1
    assert "code" in result.stderr and "fewer than 3 labelled pairs" in result.stderr

    bad = write(tmp_path / "bad.jsonl", ['{"cached": "a"'])
    result = run_cli([*command, str(bad)])
    assert result.returncode == 2 and "bad.jsonl:1: not JSON" in result.stderr


COUNTRIES = ["Canada", "France", "Japan", "Brazil", "Kenya", "Norway", "Chile", "India", "Egypt", "Spain", "Peru",
             "Italy"]


def test_command_trains_the_verifier_with_verifier_out(tmp_path: Path) -> None:
    from blendgate.semcache.verifier import DEFAULT_VERIFIER_FILE, VerifierModel

    rows = []
    for country in COUNTRIES:
        asked = f"What was the population of {country} in 2010?"
        rows.append({"cached": f"What is the population of {country} in 2010?", "query": asked, "same_answer": True})
        rows.append({"cached": f"What was the population of {country} in 2020?", "query": asked,
                     "same_answer": False})
    pairs = write(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "verifier.json"
    command = ["tune-thresholds", str(pairs), "--verifier-out", str(out)]
    result = run_cli(command)
    assert result.returncode == 0, result.stderr
    assert "verifier written to" in result.stderr and json.loads(result.stdout) is not None
    model = VerifierModel.load(out)
    assert model.source.startswith("pairs.jsonl (24 pairs)") and model.calibration.counts.sum() == 24
    # 24 pairs are too few for document frequencies: the words' rarity is the default verifier's.
    assert model.rarity == VerifierModel.load(DEFAULT_VERIFIER_FILE).rarity

    few = write(tmp_path / "few.jsonl", rows[:6])
    result = run_cli([command[0], str(few), "--verifier-out", str(out)])
    assert result.returncode == 2 and "at least 10 pairs of each label" in result.stderr
    # Refused from the labels alone, before the embedder loads and the suggestions are printed.
    assert "the file has 3 labelled same_answer and 3 not" in result.stderr and "labelled pairs," not in result.stderr
