"""Dialogue history of one conversation, trimmed to fit the model's budget.

Small embedded models have short contexts and slow prompt processing, so
only the most recent exchanges are sent, within both a turn count and a token
budget. History is kept as exchanges (a user message and the reply that was
actually spoken) so trimming drops whole exchanges and the messages always
alternate user/assistant, which many chat templates require.

The persona's example exchanges go between the system prompt and the history:
a small model imitates the answers it has just seen far better than it follows
instructions. An earlier reply the model repeated word for word is left out of
what it sees: a loop in the history is what makes a small model answer the
next question with its previous answer again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from avatalk.config import ExampleExchange
from avatalk.llm.base import ChatMessage

logger = logging.getLogger(__name__)

_NEXT_QUESTION_STAND_IN = "And then?"  # a typical short next question (see ``preview_next_turn``)


@dataclass
class _Exchange:
    """A user message and the assistant reply to it; either may be missing.

    ``user`` is None only for a reply spoken before the user said anything
    (the greeting); ``assistant`` is None while the reply is pending or when
    nothing of it was spoken. The token counts are those of the current
    texts, counted once when a text is set.
    """

    user: str | None
    assistant: str | None = None
    user_tokens: int = 0
    assistant_tokens: int = 0

    @property
    def tokens(self) -> int:
        """Tokens of the whole exchange, from the cached counts."""
        return self.user_tokens + self.assistant_tokens

    def messages(self) -> list[ChatMessage]:
        """The exchange as chat messages, missing parts left out."""
        result: list[ChatMessage] = []
        if self.user is not None:
            result.append(ChatMessage("user", self.user))
        if self.assistant is not None:
            result.append(ChatMessage("assistant", self.assistant))
        return result


class DialogueMemory:
    """System prompt plus the recent user/assistant exchanges of one session.

    Alternation rules, so the history is always valid for strict chat
    templates:

    - ``add_assistant`` with empty or whitespace-only text (nothing was spoken,
      e.g. an immediate barge-in) records nothing; the user message stays
      unanswered.
    - ``add_user`` while the previous user message is still unanswered merges
      the two into one user message (joined by a space): to the model it is
      one longer turn, which is what the user experienced.
    - ``add_assistant`` when the last reply already has text appends to it,
      and before any user message it starts an assistant-only exchange (the
      greeting).
    """

    def __init__(
        self,
        system_prompt: str,
        max_turns: int,
        max_tokens: int,
        count_tokens: Callable[[str], int],
        examples: Sequence[ExampleExchange | tuple[str, str]] = (),
    ) -> None:
        """``max_turns`` earlier exchanges and ``max_tokens`` of history at most.

        ``count_tokens`` is usually ``LLM.count_tokens`` so budgets match the
        model's tokenizer. It can be slow (a tokenizer call), so each message
        is counted once, when it is recorded or grows, never when the history
        is trimmed. ``examples`` (``persona.examples``) follow the system
        prompt in every ``messages()``; like it, they are not history and not
        counted against the budget.
        """
        self.system_prompt = system_prompt
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self._count_tokens = count_tokens
        self.examples: list[tuple[str, str]] = [
            (example.user, example.assistant) if isinstance(example, ExampleExchange) else example
            for example in examples
        ]
        self._exchanges: list[_Exchange] = []
        self._start = 0  # index of the oldest exchange still shown to the model

    def add_user(self, text: str) -> None:
        """Record what the user said (empty text is ignored)."""
        text = text.strip()
        if not text:
            return
        last = self._exchanges[-1] if self._exchanges else None
        if last is not None and last.user is not None and last.assistant is None:
            logger.debug("merging user message into the unanswered one before it")
            last.user = f"{last.user} {text}"
            last.user_tokens = self._count_tokens(last.user)
        else:
            self._exchanges.append(_Exchange(user=text, user_tokens=self._count_tokens(text)))
        # The window steps here, when a question is recorded, not only when a prompt is built: a
        # preemptive reply builds its prompt from a copy, and a window left unstepped in the
        # history itself would step again from its old start in every later copy (sliding by one
        # exchange per turn, the prefix changing every turn).
        self._window()

    def preview_user(self, text: str) -> list[ChatMessage]:
        """``messages()`` as they would be after ``add_user(text)``, recording nothing.

        A reply prepared before the user's turn is over (a preemptive reply)
        is generated from this; the text enters the history only if the turn
        ends as it was heard.
        """
        preview = self._copy()
        preview.add_user(text)
        return preview.messages()

    def preview_next_turn(self, assistant: str | None = None) -> list[ChatMessage]:
        """The prompt the next turn will start with (before its user message), recording nothing.

        ``assistant`` is a reply still playing, taken as spoken in full. A
        short stand-in question places the history window exactly as the
        next real message will in all but rare cases (a message long
        enough to cross the token budget), so a serving engine can cache
        this prefix while the user has not even spoken; after a window step
        that is a whole history's prefill taken off the next turn.
        """
        preview = self._copy()
        if assistant is not None:
            preview.add_assistant(assistant)
        preview.add_user(_NEXT_QUESTION_STAND_IN)
        return preview.messages()[:-1]

    def _copy(self) -> DialogueMemory:
        copy = DialogueMemory(self.system_prompt, self.max_turns, self.max_tokens, self._count_tokens, self.examples)
        copy._exchanges = [replace(exchange) for exchange in self._exchanges]
        copy._start = self._start
        return copy

    def add_assistant(self, text: str) -> None:
        """Record what the assistant actually said (empty text is dropped)."""
        text = text.strip()
        if not text:
            return
        last = self._exchanges[-1] if self._exchanges else None
        if last is None:
            self._exchanges.append(_Exchange(user=None, assistant=text, assistant_tokens=self._count_tokens(text)))
            return
        last.assistant = text if last.assistant is None else f"{last.assistant} {text}"
        last.assistant_tokens = self._count_tokens(last.assistant)

    def history(self) -> list[ChatMessage]:
        """What was said in this conversation, oldest first: no system prompt, no examples, nothing trimmed."""
        return [message for exchange in self._exchanges for message in exchange.messages()]

    def _window(self) -> list[_Exchange]:
        """The exchanges shown to the model, oldest first; the window's start moves in steps.

        Once the exchanges from the window's start exceed a budget, the start
        moves on to keep about half of each budget. Moving it one exchange per
        turn would change the start of the history, right after the cached
        persona prefix, on every turn, and a serving engine would prefill the
        whole history again each time (measured: 10x the first-token latency
        from the turn the window filled up); in steps, the history before the
        new message stays the same for several turns.
        """
        window = self._exchanges[self._start :]
        earlier = window[:-1]
        if earlier and (len(earlier) > self.max_turns or sum(e.tokens for e in window) > self.max_tokens):
            kept = 1
            tokens = window[-1].tokens
            for exchange in reversed(earlier):
                if kept - 1 >= self.max_turns // 2 or tokens + exchange.tokens > self.max_tokens // 2:
                    break
                kept += 1
                tokens += exchange.tokens
            self._start = len(self._exchanges) - kept
            window = self._exchanges[self._start :]
        return window

    def messages(self) -> list[ChatMessage]:
        """The system prompt, the examples and the newest exchanges within both budgets.

        The newest exchange (which holds the latest user message) is always
        kept, even alone over the token budget; ``max_turns`` and
        ``max_tokens`` limit the exchanges before it: when they are exceeded
        the oldest are dropped down to about half of each budget (see
        ``_window``). The system prompt and the examples are not counted
        against the history budget. An earlier exchange whose reply repeats an
        example's or an earlier reply (ignoring case and punctuation) is left
        out.
        """
        kept = list(reversed(self._window()))
        result = [ChatMessage("system", self.system_prompt)]
        seen: set[str] = set()
        for user, assistant in self.examples:
            result += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
            seen.add(_normalised(assistant))
        newest = kept[0] if kept else None
        carried: str | None = None  # the user's words of a left-out exchange join the next question
        for exchange in reversed(kept):
            if exchange.assistant is not None and exchange is not newest:
                reply = _normalised(exchange.assistant)
                if len(reply.split()) >= _MIN_REPEAT_WORDS and reply in seen:
                    logger.debug("leaving a repeated reply out of the prompt: %r", exchange.assistant)
                    carried = " ".join(part for part in (carried, exchange.user) if part) or None
                    continue
                seen.add(reply)
            messages = exchange.messages()
            if carried is not None and messages and messages[0].role == "user":
                messages[0] = ChatMessage("user", f"{carried} {messages[0].content}")
                carried = None
            result.extend(messages)
        return result


#: Shorter replies ("You're welcome.", "Sure.") repeat naturally and are kept.
_MIN_REPEAT_WORDS = 5


def _normalised(text: str) -> str:
    """``text`` compared as words: lower case, punctuation and spacing ignored."""
    return " ".join(re.findall(r"\w+", text.lower()))
