"""Guards for candidate hits: cheap checks for the differences embeddings barely see.

Two questions a sentence embedding puts close together often differ in one number ("2 years" / "5 years"),
one name ("learn Python" / "learn Java"), a negation ("can I" / "can't I"), an opposed comparison word
("best" / "worst", "positive effects" / "negative effects") or two words exchanged ("Do Croats like Turks?" /
"Do Turks like Croats?", "convert MP4 to AVI" / "convert AVI to MP4"). Each guard says whether a (query, cached
question) pair differs in that way. Plain Python: a few regular expressions and set operations per pair (tens
of microseconds: `check` p50 about 32 us on the QQP tuning pairs).

Their flags are features of the verifier's classifier (verifier.py) and name the reason of a rejection; the
number, name, negation, opposites and exchanged-words guards also refuse a candidate on their own
(verifier.VETO_GUARDS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"n't|[A-Za-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
_SPLIT_NEGATION = re.compile(r"(\w)n't\b", re.IGNORECASE)
# Where a question's next sentence starts: after ". " (not after a capital: "U.S. Army"), "?" or "!", before a
# capital ("I love him. He didn't respond.", "ex.I see him" aside).
_SENTENCE_BREAK = re.compile(r"(?<![A-Z])\.\s+(?=[A-Z])|[?!]+\s*(?=[A-Z])")

# "one" is not among them: in questions it is mostly the pronoun ("How does one...", "any one", "which one");
# counted as 1 it refused 63 duplicates among 73 QQP tuning pairs at cosine >= 0.89 (86%, against 79% of all).
NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19",
    "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
    "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000",
    "billion": "1000000000", "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5",
    "half": "0.5", "single": "1", "twice": "2", "double": "2", "dozen": "12",
}
NEGATIONS = {"not", "no", "never", "n't", "without", "none", "nobody", "nothing", "neither", "nor", "cannot",
             "nowhere", "against"}
# Words that flip a question's answer when swapped for their opposite (each maps to its group).
_OPPOSED = [("best", "worst"), ("better", "worse"), ("more", "less", "fewer"), ("most", "least", "fewest"),
            ("before", "after"), ("higher", "lower"), ("highest", "lowest"), ("increase", "decrease", "reduce"),
            ("advantages", "disadvantages"), ("pros", "cons"), ("maximum", "minimum"), ("max", "min"),
            ("cheap", "expensive"), ("cheapest", "costliest"), ("fast", "slow"), ("faster", "slower"),
            ("fastest", "slowest"), ("good", "bad"), ("easy", "hard", "difficult"), ("easiest", "hardest"),
            ("big", "small"), ("bigger", "smaller"), ("biggest", "smallest"), ("largest", "smallest"),
            ("long", "short"), ("longer", "shorter"), ("old", "new"), ("first", "last"), ("top", "bottom"),
            ("rich", "poor"), ("gain", "lose"), ("win", "lose"), ("buy", "sell"), ("start", "stop"),
            ("positive", "negative"), ("true", "false"), ("legal", "illegal"), ("safe", "dangerous")]
COMPARISON_WORDS = {word for group in _OPPOSED for word in group}
# Each comparison word's opposites: the other words of its groups ("lose" is the opposite of "gain" and "win").
OPPOSITES = {word: {other for g in _OPPOSED if word in g for other in g if other != word} for word in COMPARISON_WORDS}
# Words that join a list, whose items may come in any order ("apples and pears" / "pears and apples").
_LIST_JOINERS = {"and", "or", "vs", "versus", "nor", "between"}
# Words too common to tell two questions apart (pair_words.py leaves them out of the word features).
STOPWORDS = frozenset(
    "a an the is are was were be been being do does did i you he she it we they me my your of to in on at for "
    "with by from and or as that this these those what which who whom how why when where can could should "
    "would will shall may might must has have had am any some there their its if so than then into about "
    "get".split())
# Words that give a question a direction (what goes to what, is preferred over what, holds somewhere but not
# elsewhere), each to its kind: "to" and "into" are one. "but not" is a kind of its own (`swapped_roles`).
_DIRECTIONS = {"to": "to", "into": "to", "from": "from", "over": "over"}
# A "to" after these opens an infinitive ("How to convert X to Y?", "Is it safe to travel?") or compares without
# a direction ("compared to"): no direction word. On the QQP tuning pairs at cosine >= 0.89, "Is travel to Egypt
# safe?" / "Is Egypt safe to travel?" and "compare to" were 2 of the 3 duplicates among the 8 it refused before.
_NO_DIRECTION_TO_AFTER = {
    "how", "what", "where", "when", "which", "whom", "way", "ways", "want", "need", "have", "has", "had", "going",
    "able", "like", "order", "try", "trying", "used", "start", "learn", "safe", "easy", "hard", "difficult",
    "possible", "good", "better", "best", "necessary", "important", "okay", "ok", "legal", "illegal",
    "dangerous", "compare", "compared", "comparison", "similar", "equal", "equivalent", "related", "close",
    "next", "relative"}
# Capitalised words that are not names: question words, pronouns, determiners and the like.
_NOT_NAMES = {"i", "what", "which", "who", "whom", "whose", "why", "how", "when", "where", "is", "are", "was",
              "were", "do", "does", "did", "can", "could", "should", "would", "will", "shall", "may", "might",
              "the", "a", "an", "if", "in", "on", "for", "to", "of", "and", "or", "my", "your", "it", "this",
              "that", "there", "i'm", "i've", "i'd", "i'll", "be", "has", "have", "had", "am", "any", "some",
              "best", "most", "from", "with", "as", "at", "by", "quora", "please", "vs", "so", "also",
              "he", "his", "him", "she", "her", "they", "them", "their", "we", "our", "you", "its", "these",
              "those", "but", "then"}


def tokens(text: str) -> list[str]:
    """Words, numbers and "n't" of `text` ("don't" gives "do", "n't"), case kept."""
    return _TOKEN.findall(_SPLIT_NEGATION.sub(r"\1 n't", text))


def numbers(words: list[str]) -> set[str]:
    """The numbers a question names, digits or words ("two" and "2" are both "2"; "1,000" is "1000"; "1.50" is
    "1.5"; the word "one" is not a number here, see NUMBER_WORDS)."""
    found = set()
    for word in words:
        lower = word.lower()
        if lower[0].isdigit():
            digits = lower.replace(",", "")
            found.add(digits.rstrip("0").rstrip(".") if "." in digits else digits)
        elif lower in NUMBER_WORDS:
            found.add(NUMBER_WORDS[lower])
    return found


def names(words: list[str]) -> set[str]:
    """Words of one sentence that look like names: capitalised (or all capitals) anywhere but as the
    sentence's first word, lower-cased, less the common words a question capitalises (pronouns included)."""
    return {w.lower() for w in words[1:] if w[0].isupper() and w.lower() not in _NOT_NAMES}


def sentence_tokens(text: str) -> list[list[str]]:
    """`tokens` of each sentence of `text`, in order (their concatenation is `tokens(text)`)."""
    return [tokens(sentence) for sentence in _SENTENCE_BREAK.split(text)]


def question_names(sentences: list[list[str]]) -> set[str]:
    """`names` of each sentence (`sentence_tokens`): the word opening a later sentence is no name either
    ("... for life. Find the cost?", "I told him. He didn't respond.")."""
    return {name for words in sentences for name in names(words)}


def exchanged(first: list[str], second: list[str]) -> bool:
    """Whether two questions' words (case aside) are the same but for two that exchanged places, not next to
    each other nor joined by a list word (and, or, vs, ...): who does what to whom changed ("Do Indian women
    find American men attractive?" / "Do Indian men find American women attractive?", "convert benzene into
    toluene" / "convert toluene into benzene")."""
    if len(first) != len(second):
        return False
    differ = [k for k, (a, b) in enumerate(zip(first, second)) if a.lower() != b.lower()]
    if len(differ) != 2:
        return False
    i, j = differ
    return (first[i].lower() == second[j].lower() and first[j].lower() == second[i].lower() and j > i + 1
            and not {w.lower() for w in first[i + 1:j]} & _LIST_JOINERS)


def direction_sides(words: list[str]) -> dict[str, tuple[set[str], set[str]]]:
    """Per kind of direction word (_DIRECTIONS, and "but not") that occurs exactly once in `words`: the
    content words (lower-cased, possessives cut, STOPWORDS left out) before it and after it. A "to" opening an
    infinitive or compares ("how to", "safe to", "compared to": _NO_DIRECTION_TO_AFTER) is no direction word."""
    lower = [w.lower().split("'", 1)[0] for w in words]
    kinds = [None if k and lower[k - 1] in _NO_DIRECTION_TO_AFTER and w == "to" else
             "but not" if w == "not" and k and lower[k - 1] == "but" else _DIRECTIONS.get(w)
             for k, w in enumerate(lower)]
    sides = {}
    for kind in set(kinds) - {None}:
        if kinds.count(kind) == 1:
            at = kinds.index(kind)
            sides[kind] = (set(lower[:at]) - STOPWORDS, set(lower[at + 1:]) - STOPWORDS)
    return sides


def swapped_roles(first: list[str], second: list[str]) -> bool:
    """Whether two questions put their words on opposite sides of the same direction word, both ways, however
    the rest is reworded: a word only before it in one is only after it in the other and another word went the
    other way ("How do I convert MP4 to AVI?" / "How can I convert AVI to MP4?", "benzene into toluene" /
    "toluene into benzene", "benefits iPhone users have over Android users" / "benefits Android users have over
    iPhone users", "things you can do in the US but not in India" / "in India but not in the US"). Lists
    ("X and Y") have no direction and are no concern here."""
    one, other = direction_sides(first), direction_sides(second)
    for kind in one.keys() & other.keys():
        (before, after), (before_other, after_other) = one[kind], other[kind]
        if (before - after) & (after_other - before_other) and (after - before) & (before_other - after_other):
            return True
    return False


GUARDS = ("numbers", "entities", "negation", "comparison", "opposites", "exchanged")


@dataclass(frozen=True)
class GuardFlags:
    """Which guards fired for one (query, cached question) pair: the hand-off from guards.py to the verifier's
    features (verifier.py). True means the two questions differ in that way."""

    numbers: bool
    entities: bool
    negation: bool
    comparison: bool
    opposites: bool
    exchanged: bool

    def fired(self, among: tuple[str, ...] = GUARDS) -> str | None:
        """The first of the guards `among` (in their order) that fired; None if none."""
        for name in among:
            if getattr(self, name):
                return name
        return None


def check(query: str, cached: str) -> GuardFlags:
    """The guards' flags for a new question `query` against a cached question `cached`.

    - numbers: the sets of numbers differ (one names a number the other does not);
    - entities: a name of one (see `question_names`) appears nowhere in the other, whatever its case;
    - negation: one has a negation word (not, no, never, n't, without, ...) and the other has none;
    - comparison: one has an opposed comparison word (best/worst, more/less, before/after, ...) the other
      lacks;
    - opposites: a comparison word only one has stands against its opposite only the other has ("positive
      effects" / "negative effects", "advantages" / "disadvantages"): the narrow case of `comparison` (which
      also fires on "the best way" / "a way"), rare among paraphrases. On the QQP tuning pairs at MiniLM cosine
      >= 0.89 it fires on 6 of 2762, 1 of them a duplicate (bench/results/semcache-qqp-2026-11-30.md);
    - exchanged: the same words but two that exchanged places (see `exchanged`; on all 12,379 QQP tuning
      pairs it fires on 5, 1 of them labelled a duplicate, all at cosine >= 0.97), or words on opposite sides of
      the same direction word however the rest is reworded (see `swapped_roles`: "convert MP4 to AVI" / "convert
      AVI to MP4"). Figures: bench/results/semcache-qqp-2026-11-30.md."""
    sentences_first, sentences_second = sentence_tokens(query), sentence_tokens(cached)
    first, second = [w for s in sentences_first for w in s], [w for s in sentences_second for w in s]
    lower_first, lower_second = {w.lower() for w in first}, {w.lower() for w in second}
    return GuardFlags(
        numbers=numbers(first) != numbers(second),
        entities=bool(question_names(sentences_first) - lower_second or question_names(sentences_second) - lower_first),
        negation=bool(lower_first & NEGATIONS) != bool(lower_second & NEGATIONS),
        comparison=(lower_first & COMPARISON_WORDS) != (lower_second & COMPARISON_WORDS),
        opposites=any(OPPOSITES[word] & (lower_second - lower_first)
                      for word in (lower_first - lower_second) & COMPARISON_WORDS),
        exchanged=exchanged(first, second) or swapped_roles(first, second),
    )
