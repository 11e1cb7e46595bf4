"""The language-model interface every backend implements.

The conversation engine only ever sees ``LLM.stream``: text deltas arriving
as they are generated, so the sentence splitter and TTS can start speaking
before the reply is complete, and a barge-in can stop generation mid-reply.
Backends (one module each) are registered by name in ``avatalk.llm`` and
chosen by ``settings.llm.backend``; they import their heavy library (llama.cpp,
torch) only when a model is loaded, so a deployment that talks to a remote
server never needs llama.cpp or torch installed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Self

from avatalk.config import Settings
from avatalk.executors import Executors

Role = Literal["system", "user", "assistant"]


@dataclass
class ChatMessage:
    """One message of a chat, in the shape every chat template and API expects."""

    role: Role
    content: str


class LLMError(Exception):
    """A language-model failure, worded for the person running the server.

    Backends translate library and network errors into this one type so the
    session can end the turn with a readable error event instead of a trace.
    """


class LLM(ABC):
    """A chat model that streams its reply as text deltas.

    One instance holds one loaded model (or one remote connection pool) and
    is shared by every session of the server.
    """

    name: str

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """Build the backend from its section of ``settings.llm`` and the shared ``llm`` fields.

        Loading a local model blocks for a moment: call this off the event
        loop at startup. Blocking model work later runs on ``executors.llm``.
        """

    @abstractmethod
    def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        """Yield the reply to ``messages`` as text deltas, in order.

        Implemented as an async generator. When the consumer stops iterating
        (``aclose()`` on the iterator, or cancellation of the task consuming
        it) generation stops within about one token and the model is free for
        the next caller: that is what makes barge-in cheap. Failures raise
        ``LLMError``.

        ``session_key`` names the conversation (the session id). A serving
        engine that caches prompts per slot (llama-server) keeps each
        conversation on its own slot with it, so a new turn only prefills the
        new message; other backends ignore it.
        """

    async def warm_up(self, messages: list[ChatMessage]) -> None:
        """Evaluate ``messages`` once before the first session, so no user pays for cold caches.

        The base version generates the first token of a reply (llama.cpp then
        keeps the persona prompt as a reusable prefix); backends with several
        caches (llama-server's slots) fill each.
        """
        stream = self.stream(messages)
        try:
            async for _delta in stream:
                break
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def prefill(self, messages: list[ChatMessage], session_key: str) -> None:
        """Put ``messages`` in this conversation's prompt cache ahead of its reply (the user is still speaking).

        The reply then only prefills what differs: the user's last words.
        Backends whose cache belongs to one conversation (llama-server's
        slots) override it; for the others it does nothing, because a
        shared cache would be evicted by other sessions' prompts first.
        Cancelling the call stops the prefill.
        """

    async def aclose(self) -> None:
        """Free the model or connections; the instance is unusable afterwards.

        The base version has nothing to free; backends holding resources
        override it.
        """

    def count_tokens(self, text: str) -> int:
        """Approximate number of tokens in ``text``, for history budgets.

        About four characters per token for English; backends with a local
        tokenizer override this with an exact count.
        """
        return len(text) // 4 + 1
