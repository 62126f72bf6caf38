"""The verifier's guards (semcache/guards.py), each with pairs of its own: pairs that differ in that way
fire it, paraphrases do not."""

import pytest
from blendgate.semcache.guards import (
    check,
    direction_sides,
    names,
    numbers,
    question_names,
    sentence_tokens,
    swapped_roles,
    tokens,
)


@pytest.mark.parametrize("query, cached", [
    ("What can I do with 2 years of experience?", "What can I do with 5 years of experience?"),
    ("Is 1,000 dollars enough for a week in Paris?", "Is 100 dollars enough for a week in Paris?"),
    ("What are three ways to save money?", "What are ten ways to save money?"),
    ("How old is the universe?", "How old is the universe in 2020?"),
    ("Which is the best reference book for ICSE class 8 science?",
     "Which is the best reference book for ICSE class 7 science?"),
    ("Is one year enough to learn French?", "Are two years enough to learn French?"),
])
def test_numbers_guard_fires_on_different_numbers(query: str, cached: str) -> None:
    assert check(query, cached).numbers


@pytest.mark.parametrize("query, cached", [
    ("What are 2 ways to save money?", "What are two ways to save money?"),
    ("Is 1,000 dollars enough?", "Is 1000 dollars enough?"),
    ("How do I cook rice?", "What is the way to cook rice?"),
    ("Is 1.50 dollars a fair price?", "Is 1.5 dollars a fair price?"),
    # "one" as a pronoun (QQP tuning pairs the guard refused before).
    ("How do I become a fashion photographer?", "How does one become a fashion photographer?"),
    ("Has any one regretted going to college?", "Does anyone regret going to college?"),
    ("What are the best romantic movies?", "Which one is the best romantic movie?"),
])
def test_numbers_guard_keeps_same_numbers(query: str, cached: str) -> None:
    assert not check(query, cached).numbers


@pytest.mark.parametrize("query, cached", [
    ("How do I learn Python quickly?", "How do I learn Java quickly?"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("Is Barack Obama taller than Trump?", "Is Barack Obama taller than Biden?"),
])
def test_entity_guard_fires_on_a_name_not_shared(query: str, cached: str) -> None:
    assert check(query, cached).entities


@pytest.mark.parametrize("query, cached", [
    ("How do I learn Python quickly?", "How can I learn python fast?"),
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How Do I Reverse A List?", "how do i reverse a list?"),
])
def test_entity_guard_keeps_shared_names_whatever_the_case(query: str, cached: str) -> None:
    assert not check(query, cached).entities


@pytest.mark.parametrize("query, cached", [
    ("Why can't I sleep at night?", "Why can I sleep at night?"),
    ("Is it safe to drink coffee without milk?", "Is it safe to drink coffee with milk?"),
    ("Why do people never vote?", "Why do people vote?"),
    ("Is a tomato not a fruit?", "Is a tomato a fruit?"),
])
def test_negation_guard_fires_when_one_negates(query: str, cached: str) -> None:
    assert check(query, cached).negation


@pytest.mark.parametrize("query, cached", [
    ("Why can't I sleep at night?", "Why am I not able to sleep at night?"),
    ("How do I stop snoring?", "What can I do to stop snoring?"),
])
def test_negation_guard_keeps_both_negated_or_neither(query: str, cached: str) -> None:
    assert not check(query, cached).negation


@pytest.mark.parametrize("query, cached", [
    ("What is the best phone to buy?", "What is the worst phone to buy?"),
    ("What should I eat before a run?", "What should I eat after a run?"),
    ("How do I earn more money?", "How do I earn less money?"),
    ("What are the advantages of remote work?", "What are the disadvantages of remote work?"),
])
def test_comparison_guard_fires_on_opposed_words(query: str, cached: str) -> None:
    assert check(query, cached).comparison


@pytest.mark.parametrize("query, cached", [
    ("What is the best phone to buy?", "Which phone is the best to buy?"),
    ("Which is faster, a cheetah or a horse?", "Which is faster: a horse or a cheetah?"),
])
def test_comparison_guard_keeps_the_same_comparison(query: str, cached: str) -> None:
    assert not check(query, cached).comparison


@pytest.mark.parametrize("query, cached", [
    # Held-out QQP false hits of the default cache before this guard (MiniLM cosine 0.98 and 0.96).
    ("What are the negative effects, if any, of long-term caffeine consumption?",
     "What are the positive effects, if any, of long-term caffeine consumption?"),
    ("What were the negative effects of imperialism in Africa?",
     "What were some of the positive effects that imperialism had in Africa?"),
    ("What are the disadvantages of being an only child?", "What are the advantages to being an only child?"),
    ("Does drinking alcohol decrease depression?", "Does alcohol increase my depression?"),
    ("How do I make my hair look less greasy?", "How can I make my hair more greasy?"),
])
def test_opposites_guard_fires_on_a_word_against_its_opposite(query: str, cached: str) -> None:
    flags = check(query, cached)
    assert flags.opposites and flags.comparison


@pytest.mark.parametrize("query, cached", [
    ("What is the best way to find a pen pal?", "Where would I find a pen pal?"),  # comparison fires, not this
    ("What are the pros and cons of marriage?", "What are the pros of marriage?"),  # both words on one side
    ("What are the pros and cons of marriage?", "What are the cons and pros of getting married?"),
    ("Which is faster, a cheetah or a horse?", "Which is faster: a horse or a cheetah?"),
])
def test_opposites_guard_keeps_pairs_without_an_opposed_word(query: str, cached: str) -> None:
    assert not check(query, cached).opposites


@pytest.mark.parametrize("query, cached", [
    ("What do Iranians think about Pakistanis?", "What do Pakistanis think about Iranians?"),  # held-out QQP
    ("Do Indian men find American women attractive?", "Do Indian women find American men attractive?"),
    ("How do you convert toluene into benzene?", "How do you convert benzene into toluene?"),
    ("What if Samsung buys Apple?", "What if Apple buys Samsung?"),
])
def test_exchanged_guard_fires_when_two_words_change_places(query: str, cached: str) -> None:
    assert check(query, cached).exchanged


@pytest.mark.parametrize("query, cached", [
    ("What is the difference between Chinese and English?", "What is the difference between English and Chinese?"),
    ("Which is faster, a cheetah or a horse?", "Which is faster, a horse or a cheetah?"),
    ("What time is it in Paris?", "What time it is in Paris?"),  # next to each other
    ("Why did Burma change its name to Myanmar?", "Why did Myanmar change its name from Burma?"),  # more changed
    ("How do I learn Python?", "How do I learn Python?"),
])
def test_exchanged_guard_keeps_lists_neighbours_and_rewordings(query: str, cached: str) -> None:
    assert not check(query, cached).exchanged


@pytest.mark.parametrize("query, cached", [
    # A word opening a later sentence, or a pronoun, is no name (QQP tuning duplicates the guard refused).
    ("A seller gave 15% discount on a bat. He gave a ball for free. Find the cost of the bat?",
     "A seller gave a 15% discount on a bat and a ball for free. What is the cost of the bat?"),
    ("My friend lost his job. His wife left him. What should he do?",
     "My friend lost his job and his wife left him. What should he do?"),
    ("What does it mean when a guy stares at you? Should I talk to him?",
     "What does it mean when a guy stares at you? Is it a sign?"),
    ("I can't get over my ex.I see him daily. What should I do?", "How do I get over my ex whom I see daily?"),
])
def test_entity_guard_keeps_sentence_starts_and_pronouns(query: str, cached: str) -> None:
    assert not check(query, cached).entities


def test_question_names_read_each_sentence() -> None:
    assert question_names(sentence_tokens("I told him. He didn't respond. Does Anna love me?")) == {"anna"}
    # No break after a capital ("S.") nor inside a number.
    assert question_names(sentence_tokens("Why did the U.S. Army leave Iraq?")) == {"u", "s", "army", "iraq"}
    assert question_names(sentence_tokens("Is 1.5 litres enough? Find out")) == set()
    text = "Why? Is 1.5 enough. He said no!Really"
    assert sum(sentence_tokens(text), []) == tokens(text) and len(sentence_tokens(text)) == 4


@pytest.mark.parametrize("query, cached", [
    # Tuning-split QQP non-duplicates at MiniLM cosine >= 0.95 (the audit) and reworded ones of the same kinds.
    ("How do I convert MP4 to AVI?", "How can I convert AVI to MP4?"),
    ("How do I convert Celsius into Fahrenheit?", "How can you convert Fahrenheit to Celsius?"),
    ("What are some of the things that you can do in the US but not in India?",
     "What are some things that you can do in India but not in the US?"),
    ("What benefits do iPhone users have over Android users?",
     "What are the benefits that Android users have over iPhone users?"),
    ("Why do people prefer tea over coffee?", "Why do so many prefer coffee over tea?"),
])
def test_exchanged_guard_fires_on_roles_swapped_around_a_direction_word(query: str, cached: str) -> None:
    flags = check(query, cached)
    assert flags.exchanged and swapped_roles(tokens(query), tokens(cached))


@pytest.mark.parametrize("query, cached", [
    ("How do I go from Mumbai to Delhi?", "How do I go to Delhi from Mumbai?"),  # the same trip
    ("What is the best way to learn guitar?", "How to learn the guitar in the best way?"),  # an infinitive
    ("How to convert MP4 to AVI?", "Which tool converts MP4 files to AVI?"),  # the same direction
    ("Why did Burma change its name to Myanmar?", "Why did Myanmar change its name from Burma?"),  # other words
    ("Which is better, Java or Python?", "Which is better, Python or Java?"),  # a list has no direction
])
def test_exchanged_guard_keeps_the_same_direction_and_lists(query: str, cached: str) -> None:
    assert not check(query, cached).exchanged


def test_direction_sides_skip_infinitives_and_repeated_words() -> None:
    assert direction_sides(tokens("How to convert Celsius to Kelvin?")) == {"to": ({"convert", "celsius"}, {"kelvin"})}
    assert direction_sides(tokens("What to give to a friend moving to Paris?")) == {}  # "to" twice
    assert direction_sides(tokens("Fun but not in a romantic way")) == {"but not": ({"fun", "but"},
                                                                                 {"romantic", "way"})}


def test_first_guard_names_the_reason() -> None:
    assert check("What is the best phone?", "What is the worst phone?").fired() == "comparison"
    assert check("How do I cook rice?", "How should I cook rice?").fired() is None


def test_tokens_split_negations_and_keep_numbers() -> None:
    assert tokens("Don't sell 1,500 shares") == ["Do", "n't", "sell", "1,500", "shares"]
    assert numbers(tokens("two or 2 or 3.5 or 3.50 or 1,000.0")) == {"2", "3.5", "1000"}
    assert numbers(tokens("one of them")) == set()
    assert names(tokens("What Is the capital of France")) == {"france"}
