"""Sentence splitting of streamed replies for TTS."""

from __future__ import annotations

import random

import pytest

from avatalk.llm import SentenceSplitter, clean_for_speech


def split_whole(text: str, min_chars: int = 12, max_chars: int = 160) -> list[str]:
    splitter = SentenceSplitter(min_chars, max_chars)
    return splitter.push(text) + splitter.flush()


def split_chars(text: str, min_chars: int = 12, max_chars: int = 160) -> list[str]:
    splitter = SentenceSplitter(min_chars, max_chars)
    sentences: list[str] = []
    for char in text:
        sentences += splitter.push(char)
    return sentences + splitter.flush()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Hello there, friend. How are you today? I am fine!",
            ["Hello there, friend.", "How are you today?", "I am fine!"],
        ),
        (
            "I met Dr. Smith yesterday at the clinic. He was kind.",
            ["I met Dr. Smith yesterday at the clinic.", "He was kind."],
        ),
        (
            "Use a fruit, e.g. an apple, for this recipe. Then bake it.",
            ["Use a fruit, e.g. an apple, for this recipe.", "Then bake it."],
        ),
        (
            "The answer is 3.5 percent of the total. That is small.",
            ["The answer is 3.5 percent of the total.", "That is small."],
        ),
        (
            "Mr. and Mrs. Jones live in the U.S. now. They like it.",
            ["Mr. and Mrs. Jones live in the U.S. now.", "They like it."],
        ),
        ("Wait… The result is here. Done and dusted.", ["Wait… The result is here.", "Done and dusted."]),
        ("Let me think… I am not sure. Maybe.", ["Let me think…", "I am not sure.", "Maybe."]),
        ("Really?! That is quite surprising to me. Wow.", ["Really?! That is quite surprising to me.", "Wow."]),
        ('He said "Go home now." Then he left the room.', ['He said "Go home now."', "Then he left the room."]),
        (
            "First line without a stop\nSecond line without one",
            ["First line without a stop", "Second line without one"],
        ),
        (
            "J. R. R. Tolkien wrote many fine books. Read them.",
            ["J. R. R. Tolkien wrote many fine books.", "Read them."],
        ),
        ("Two plus two is 4. Easy one to remember.", ["Two plus two is 4.", "Easy one to remember."]),
    ],
)
def test_splits_at_sentence_ends(text: str, expected: list[str]) -> None:
    assert split_whole(text) == expected


def test_short_sentences_are_merged_with_the_next() -> None:
    assert split_whole("Sure. Ok. Here is the full answer to it.") == ["Sure. Ok. Here is the full answer to it."]


def test_short_last_sentence_stands_alone_at_flush() -> None:
    assert split_whole("This is a complete sentence. Bye.") == ["This is a complete sentence.", "Bye."]


def test_sentence_is_emitted_as_soon_as_it_ends() -> None:
    splitter = SentenceSplitter(12, 160)
    assert splitter.push("The weather is lovely today.") == []  # a decimal could still follow
    assert splitter.push(" Shall") == ["The weather is lovely today."]
    assert splitter.push(" we go?") == []
    assert splitter.flush() == ["Shall we go?"]


def test_decimal_is_not_cut_while_streaming() -> None:
    splitter = SentenceSplitter(5, 160)
    assert splitter.push("It costs 3.") == []
    assert splitter.push("50 dollars. Cheap") == ["It costs 3.50 dollars."]
    assert splitter.flush() == ["Cheap"]


def test_long_sentence_split_at_last_clause_boundary() -> None:
    text = "This sentence goes on, and on without end; it has clauses: many of them, really quite a lot of them"
    sentences = split_whole(text, min_chars=5, max_chars=40)
    assert all(len(sentence) <= 40 for sentence in sentences)
    assert sentences[0] == "This sentence goes on,"
    assert sentences[1] == "and on without end; it has clauses:"
    assert " ".join(sentences) == text


def test_long_sentence_without_clauses_split_at_a_space() -> None:
    text = "word " * 30
    sentences = split_whole(text, min_chars=5, max_chars=32)
    assert all(len(sentence) <= 32 for sentence in sentences)
    assert " ".join(sentences).split() == text.split()


def test_long_word_is_cut_hard() -> None:
    sentences = split_whole("x" * 50, min_chars=5, max_chars=20)
    assert sentences == ["x" * 20, "x" * 20, "x" * 10]


def test_long_text_is_emitted_before_the_reply_ends() -> None:
    splitter = SentenceSplitter(12, 60)
    emitted = splitter.push("a sentence that keeps going, and going, and going, and going, and going")
    assert emitted and all(len(sentence) <= 60 for sentence in emitted)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("**Bold** and _italic_ and `code` here", "Bold and italic and code here"),
        ("## A heading line", "A heading line"),
        ("- a bullet item", "a bullet item"),
        ("* another bullet", "another bullet"),
        ("1. numbered item", "numbered item"),
        ("> quoted text", "quoted text"),
        ("Great job! 🎉🎉 See you 👋🏽 soon", "Great job! See you soon"),
        ("A [link](https://example.com) here", "A link here"),
        ("**Yes**.", "Yes."),
        ("---", ""),
        ("🙂", ""),
    ],
)
def test_clean_for_speech(text: str, expected: str) -> None:
    assert clean_for_speech(text) == expected


def test_markdown_list_becomes_sentences() -> None:
    text = "Here are two options:\n\n1. Take the early train.\n2. Drive there yourself.\n\n**Pick one!**"
    assert split_whole(text) == [
        "Here are two options:",
        "Take the early train.",
        "Drive there yourself.",
        "Pick one!",
    ]


def test_nothing_speakable_yields_nothing() -> None:
    assert split_whole("🎉 *** 🎉\n---\n") == []
    assert split_whole("") == []


def test_flush_resets_for_reuse() -> None:
    splitter = SentenceSplitter(12, 160)
    splitter.push("An unfinished thought")
    assert splitter.flush() == ["An unfinished thought"]
    assert splitter.flush() == []


def test_max_must_exceed_min() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=50, max_chars=20)


SAMPLES = [
    "Hello there, friend. How are you today? I am fine!",
    "I met Dr. Smith at 3.5 p.m. today, e.g. near the U.S. border. It was odd… Really?! Yes.",
    "Sure!\n\n## Steps\n1. Open the **app**.\n2. Tap `Settings` 🎉.\n- Done, basically.\nThat's all.",
    "A very long sentence that rambles on, and on; it has many clauses: some short, some long, "
    "and it never seems to end because the model keeps generating words without any punctuation at all "
    "which forces the splitter to cut it somewhere sensible",
    "He said \"Stop.\" She replied 'No!' Then (quietly) they left. The end.",
    "x" * 400,
    "Numbers: 1.5, 2.25 and 10. Then more text follows here. Ok.",
]


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize(("min_chars", "max_chars"), [(12, 160), (1, 40), (30, 60)])
def test_streaming_char_by_char_equals_whole_text(text: str, min_chars: int, max_chars: int) -> None:
    assert split_chars(text, min_chars, max_chars) == split_whole(text, min_chars, max_chars)


@pytest.mark.parametrize("seed", range(20))
def test_streaming_random_deltas_equals_whole_text(seed: int) -> None:
    rng = random.Random(seed)
    text = " ".join(rng.choice(SAMPLES) for _ in range(3))
    splitter = SentenceSplitter(12, 80)
    sentences: list[str] = []
    position = 0
    while position < len(text):
        size = rng.randint(1, 12)
        sentences += splitter.push(text[position : position + size])
        position += size
    sentences += splitter.flush()
    assert sentences == split_whole(text, 12, 80)
    assert all(len(sentence) <= 80 for sentence in sentences)
