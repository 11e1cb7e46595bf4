"""Dialogue memory: alternation, trimming by turns and by tokens."""

from __future__ import annotations

from avatalk.llm import ChatMessage, DialogueMemory


def words(text: str) -> int:
    """A predictable token counter for budget tests: one token per word."""
    return len(text.split())


def roles(memory: DialogueMemory) -> list[str]:
    return [message.role for message in memory.messages()]


def test_system_prompt_first_then_alternating_turns() -> None:
    memory = DialogueMemory("be brief", max_turns=8, max_tokens=1000, count_tokens=words)
    memory.add_user("hello")
    memory.add_assistant("hi there")
    memory.add_user("how are you")
    assert memory.messages() == [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "hello"),
        ChatMessage("assistant", "hi there"),
        ChatMessage("user", "how are you"),
    ]


def test_empty_assistant_reply_is_dropped_and_next_user_turn_merged() -> None:
    memory = DialogueMemory("sys", max_turns=8, max_tokens=1000, count_tokens=words)
    memory.add_user("tell me a story")
    memory.add_assistant("   ")  # barged in before anything was spoken
    memory.add_user("actually, a joke")
    assert memory.messages()[1:] == [ChatMessage("user", "tell me a story actually, a joke")]
    memory.add_assistant("Why did the chicken cross the road?")
    memory.add_user("why?")
    assert roles(memory) == ["system", "user", "assistant", "user"]


def test_greeting_before_any_user_message_and_appended_replies() -> None:
    memory = DialogueMemory("sys", max_turns=8, max_tokens=1000, count_tokens=words)
    memory.add_assistant("Hello! How can I help?")
    memory.add_user("what time is it")
    memory.add_assistant("It is noon.")
    memory.add_assistant("Anything else?")
    assert memory.messages()[1:] == [
        ChatMessage("assistant", "Hello! How can I help?"),
        ChatMessage("user", "what time is it"),
        ChatMessage("assistant", "It is noon. Anything else?"),
    ]


def test_empty_user_text_is_ignored() -> None:
    memory = DialogueMemory("sys", max_turns=8, max_tokens=1000, count_tokens=words)
    memory.add_user(" \n")
    assert memory.messages() == [ChatMessage("system", "sys")]


def test_max_turns_keeps_the_most_recent_exchanges() -> None:
    memory = DialogueMemory("sys", max_turns=2, max_tokens=1000, count_tokens=words)
    for index in range(5):
        memory.add_user(f"question {index}")
        memory.add_assistant(f"answer {index}")
    memory.add_user("latest")
    contents = [message.content for message in memory.messages()]
    # Over the budget the window moves on in a step, to half of it (the history's start then stays
    # put for a few turns, so a serving engine's prompt cache keeps matching).
    assert contents == ["sys", "question 4", "answer 4", "latest"]


def test_zero_turns_still_keeps_the_latest_user_message() -> None:
    memory = DialogueMemory("sys", max_turns=0, max_tokens=1000, count_tokens=words)
    memory.add_user("first")
    memory.add_assistant("reply")
    memory.add_user("second")
    assert [message.content for message in memory.messages()] == ["sys", "second"]


def test_token_budget_drops_oldest_whole_exchanges() -> None:
    memory = DialogueMemory("a long system prompt not counted", max_turns=10, max_tokens=10, count_tokens=words)
    memory.add_user("one two three")  # exchange of 6 tokens
    memory.add_assistant("four five six")
    memory.add_user("seven eight")  # exchange of 4 tokens
    memory.add_assistant("nine ten")
    memory.add_user("eleven twelve")  # 2 tokens
    messages = memory.messages()
    # 12 tokens exceed 10: the window moves on to half the budget, whole exchanges at a time.
    assert [message.content for message in messages[1:]] == ["eleven twelve"]
    memory.add_assistant("thirteen")
    memory.add_user("fourteen fifteen")
    assert [message.content for message in memory.messages()[1:]] == ["eleven twelve", "thirteen", "fourteen fifteen"]


def test_latest_user_message_kept_even_over_budget() -> None:
    memory = DialogueMemory("sys", max_turns=4, max_tokens=5, count_tokens=words)
    memory.add_user("short")
    memory.add_assistant("ok")
    memory.add_user("this message alone is far longer than the whole token budget")
    messages = memory.messages()
    assert len(messages) == 2
    assert messages[-1].content.startswith("this message alone")


def test_budget_counts_with_the_given_counter() -> None:
    calls: list[str] = []

    def counting(text: str) -> int:
        calls.append(text)
        return 1

    memory = DialogueMemory("sys", max_turns=4, max_tokens=100, count_tokens=counting)
    memory.add_user("hello")
    memory.messages()
    assert calls == ["hello"]


def test_each_message_is_counted_once_however_long_the_conversation() -> None:
    calls: list[str] = []

    def counting(text: str) -> int:
        calls.append(text)
        return len(text.split())

    memory = DialogueMemory("sys", max_turns=4, max_tokens=1000, count_tokens=counting)
    for index in range(20):
        memory.add_user(f"question {index}")
        memory.messages()  # trimmed every turn, as the session does before each reply
        memory.add_assistant(f"answer {index}")
    memory.messages()
    assert len(calls) == 40  # one count per message recorded, none when trimming


def test_a_reply_that_grows_is_recounted_whole() -> None:
    memory = DialogueMemory("sys", max_turns=4, max_tokens=5, count_tokens=words)
    memory.add_user("one")
    memory.add_assistant("two three")
    memory.add_assistant("four five")  # the exchange is now 5 tokens, not 3
    memory.add_user("six")
    assert [message.content for message in memory.messages()] == ["sys", "six"]


def test_the_next_turns_prompt_is_known_before_its_question_even_when_the_window_steps() -> None:
    memory = DialogueMemory("be brief", max_turns=4, max_tokens=1000, count_tokens=words)
    oldest_shown: list[str] = []
    for turn in range(12):
        memory.add_user(f"question {turn}")
        playing = f"answer {turn}"
        ahead = memory.preview_next_turn(playing)  # while the reply plays
        memory.add_assistant(playing)
        assert memory.preview_next_turn() == ahead
        memory.add_user(f"and what about {turn}?")
        after = memory.messages()
        assert after[:-1] == ahead  # the next turn's prompt starts exactly with the prefix cached ahead
        oldest_shown.append(after[1].content)
        memory.add_assistant(f"more {turn}")
    assert len(set(oldest_shown)) >= 3  # the window stepped at least twice, and the prefix was still known ahead


def test_prompts_built_from_previews_keep_the_window_still_between_steps() -> None:
    """Preemptive replies prompt from ``preview_user``; the window must still move in steps, not every turn."""
    memory = DialogueMemory("be brief", max_turns=4, max_tokens=1000, count_tokens=words)
    oldest_shown = []
    for turn in range(16):
        prompt = memory.preview_user(f"question {turn}")
        oldest_shown.append(prompt[1].content)
        memory.add_user(f"question {turn}")  # the prepared reply is committed
        memory.add_assistant(f"answer {turn}")
    changes = sum(1 for before, after in zip(oldest_shown, oldest_shown[1:]) if before != after)
    assert 2 <= changes <= 16 // 3  # once every 3 turns at most (keeping half of 4), never every turn
