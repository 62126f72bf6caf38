"""The QQP held-out rule (semcache/pairs.py)."""

from pathlib import Path

import pytest
from blendgate.semcache.pairs import is_held_out, qqp_split
from blendgate.semcache.tuning import PairsFileError


def test_every_fifth_id_is_held_out(tmp_path: Path) -> None:
    rows = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "10\t1\t2\tHow do I learn Python?\tHow can I learn Python?\t1",
            "11\t3\t4\tHow do I learn Python?\tHow do I learn Java?\t0",
            '12\t5\t6\tWhat rhymes with orange?\t"What rhymes with ""blue""?"\t0']
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n")
    tune, held_out = qqp_split(path)
    assert [p.query for p in held_out] == ["How can I learn Python?"] and held_out[0].same_answer
    assert [p.query for p in tune] == ["How do I learn Java?", 'What rhymes with "blue"?']
    assert is_held_out(0) and is_held_out(15) and not is_held_out(16)


def test_a_file_without_the_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(PairsFileError):
        qqp_split(path)
