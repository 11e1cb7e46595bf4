"""What the model is shown: the persona's examples, greedy decoding, repeated replies left out."""

from __future__ import annotations

import sys
from pathlib import Path

from avatalk.config import DEFAULT_EXAMPLES, ExampleExchange, Settings
from avatalk.llm import ChatMessage, DialogueMemory


def words(text: str) -> int:
    return len(text.split())


def memory(examples: list[ExampleExchange] | tuple[tuple[str, str], ...] = (), max_turns: int = 8) -> DialogueMemory:
    return DialogueMemory("sys", max_turns=max_turns, max_tokens=1000, count_tokens=words, examples=examples)


def test_examples_follow_the_system_prompt_and_are_not_history() -> None:
    examples = [ExampleExchange(user="What is one plus one?", assistant="One plus one is two.")]
    dialogue = memory(examples, max_turns=0)
    dialogue.add_user("hello")
    dialogue.add_assistant("Hi there, how can I help you today?")
    dialogue.add_user("what is the time")
    assert dialogue.messages() == [
        ChatMessage("system", "sys"),
        ChatMessage("user", "What is one plus one?"),
        ChatMessage("assistant", "One plus one is two."),
        ChatMessage("user", "what is the time"),  # max_turns=0 drops history, never the examples
    ]
    assert [m.content for m in dialogue.history()] == ["hello", "Hi there, how can I help you today?", "what is the time"]


def test_a_reply_the_model_repeated_is_left_out_and_its_question_joins_the_next() -> None:
    dialogue = memory()
    dialogue.add_user("What is the opposite of hot?")
    dialogue.add_assistant("The opposite of hot is cold, of course.")
    dialogue.add_user("What do you call a baby cat?")
    dialogue.add_assistant("The opposite of hot is cold, of course!")  # a loop: the previous answer again
    dialogue.add_user("What is frozen water called?")
    assert [(m.role, m.content) for m in dialogue.messages()[1:]] == [
        ("user", "What is the opposite of hot?"),
        ("assistant", "The opposite of hot is cold, of course."),
        ("user", "What do you call a baby cat? What is frozen water called?"),
    ]


def test_an_example_answer_repeated_by_the_model_is_left_out() -> None:
    dialogue = memory((("How many wheels does a bicycle have?", "A bicycle has two wheels, always."),))
    dialogue.add_user("How many legs does a spider have?")
    dialogue.add_assistant("A bicycle has two wheels, always.")
    dialogue.add_user("Are you sure?")
    assert [m.content for m in dialogue.messages()[3:]] == ["How many legs does a spider have? Are you sure?"]


def test_short_replies_that_repeat_naturally_are_kept() -> None:
    dialogue = memory()
    for question in ("Thanks!", "Thank you again!"):
        dialogue.add_user(question)
        dialogue.add_assistant("You're welcome.")
    dialogue.add_user("Bye")
    assert [m.content for m in dialogue.messages()[1:]] == [
        "Thanks!", "You're welcome.", "Thank you again!", "You're welcome.", "Bye",
    ]


def test_the_preview_of_a_prepared_reply_shows_the_examples_too() -> None:
    dialogue = memory((("Who are you?", "I am Ava."),))
    dialogue.add_user("hello")
    dialogue.add_assistant("Hi!")
    preview = dialogue.preview_user("how are you")
    assert [m.content for m in preview] == ["sys", "Who are you?", "I am Ava.", "hello", "Hi!", "how are you"]
    assert [m.content for m in dialogue.messages()][-1] == "Hi!"  # nothing recorded


def test_embedded_defaults_are_greedy_with_examples() -> None:
    settings = Settings()
    assert settings.llm.temperature == 0.0
    assert [(e.user, e.assistant) for e in settings.persona.examples] == list(DEFAULT_EXAMPLES)
    assert "examples" not in settings.persona.model_dump()  # not sent in session events


def test_quality_questions_are_not_among_the_examples() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    asked = {question.text.lower().strip() for conversation in quality.CONVERSATIONS for question in conversation}
    shown = {user.lower().strip() for user, _answer in DEFAULT_EXAMPLES}
    assert len(asked) >= 40
    assert not asked & shown


def test_the_history_window_moves_in_steps_so_its_start_stays_put_for_several_turns() -> None:
    dialogue = DialogueMemory("sys", max_turns=8, max_tokens=1000, count_tokens=words)
    previous: list[ChatMessage] = []
    moves = 0
    for turn in range(30):
        dialogue.add_user(f"question number {turn}")
        shown = dialogue.messages()
        assert len(shown) - 1 <= 2 * 8 + 1  # never over the budget
        if previous and shown[: len(previous)] != previous:
            moves += 1  # the history no longer starts as it did: a prompt cache misses here
        dialogue.add_assistant(f"answer number {turn} is a different one")
        previous = [*shown, ChatMessage("assistant", f"answer number {turn} is a different one")]
    # Sliding one exchange per turn would change the start on every turn from the ninth on (21 times).
    assert 1 <= moves <= 6
