"""The verifier's word-level evidence (semcache/pair_words.py) and the rephrasings it is trained on besides
Quora's pairs (semcache/rephrasings.py), with pairs of their own."""

import math

import pytest
from blendgate.semcache.pair_words import WORD_FEATURES, WordRarity, content_words, stem, word_differences
from blendgate.semcache.rephrasings import rephrasings, rewrites

RARITY = WordRarity.from_questions([
    "How do I learn Python?", "How do I learn Java?", "How can I learn to cook?", "What is the best way to learn?",
    "How do I learn to swim?", "Where can I learn French?"])


def test_stem_strips_one_inflection_and_keeps_three_letters() -> None:
    assert [stem(w) for w in ("emotions", "started", "learning", "boxes", "is", "gas", "Python")] == \
        ["emotion", "start", "learn", "box", "is", "gas", "python"]


def test_content_words_leave_out_stop_words_and_contractions() -> None:
    assert content_words("What's the capital of France?") == content_words("What is the capital of France?") == \
        {"capital", "france"}
    assert content_words("Why can't I sleep? Won't they?") == {"sleep"}
    assert content_words("Is 1,000 enough?") == {"1,000", "enough"}


def test_word_rarity_counts_questions_and_round_trips() -> None:
    # "learn" is in all 6 questions; "python" in one (below KEEP_FROM: counted as seen once, as an unseen word).
    assert RARITY.questions == 6 and RARITY.counts["learn"] == 6 and "python" not in RARITY.counts
    assert RARITY.idf("learn") == pytest.approx(math.log(7 / 7))
    assert RARITY.idf("python") == RARITY.idf("never-seen") == pytest.approx(math.log(7 / 2))
    assert WordRarity.from_json(RARITY.to_json()) == RARITY


def test_a_swapped_word_is_a_substitution_an_extra_word_an_addition() -> None:
    swapped = dict(zip(WORD_FEATURES, word_differences("How do I learn Java?", "How do I learn Python?", RARITY)))
    assert swapped["substituted_words"] == 1 and swapped["added_words"] == 0
    # Both sides lack a rare word of the other: the swapped names.
    assert swapped["substituted_rarity"] == swapped["rarest_differing"] == pytest.approx(math.log(7 / 2))
    assert swapped["rarity_overlap"] == 0.0  # "learn" is in every question: it weighs nothing
    added = dict(zip(WORD_FEATURES, word_differences("How do I learn Python fast?", "How do I learn Python?",
                                                     RARITY)))
    assert added["substituted_words"] == 0 and added["added_words"] == 1 and added["substituted_rarity"] == 0.0
    same = dict(zip(WORD_FEATURES, word_differences("What's the capital of France?",
                                                    "what is the capital of france", RARITY)))
    assert same == {**same, "substituted_words": 0, "added_words": 0, "differing_rarity": 0, "rarity_overlap": 1.0}


@pytest.mark.parametrize("question, expected", [
    ("What is the capital of France?", {"what is the capital of france", "What Is The Capital Of France?",
                                        "What's the capital of France?"}),
    ("Which is better, tea and coffee?", {"which is better, tea and coffee", "Which Is Better, Tea And Coffee?",
                                          "Which is better, coffee and tea?"}),
    ("Why don't cats swim?", {"why don't cats swim", "Why Don'T Cats Swim?", "Why do not cats swim?"}),
])
def test_rewrites_cannot_change_the_answer(question: str, expected: set[str]) -> None:
    assert set(rewrites(question)) == expected


def test_rephrasings_are_seeded_same_answer_pairs_of_distinct_questions() -> None:
    questions = [f"What is the capital of country {i}?" for i in range(50)] * 2
    pairs = rephrasings(questions, 20)
    assert len(pairs) == 20 and len({p.cached for p in pairs}) == 20 and all(p.same_answer for p in pairs)
    assert all(p.query in rewrites(p.cached) for p in pairs)
    assert pairs == rephrasings(questions, 20)
