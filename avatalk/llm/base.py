"""The language-model interface every backend implements, and its factory.

The conversation engine only ever sees ``LLM.stream``: text deltas arriving
as they are generated, so the sentence splitter and TTS can start speaking
before the reply is complete, and a barge-in can stop generation mid-reply.
Backends (llama.cpp, transformers, OpenAI-compatible servers) are chosen by
``settings.llm.backend`` and imported lazily, so a deployment that talks to a
remote server never needs llama.cpp or torch installed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from avatalk.config import Settings

logger = logging.getLogger(__name__)

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

    @abstractmethod
    def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        """Yield the reply to ``messages`` as text deltas, in order.

        Implemented as an async generator. When the consumer stops iterating
        (``aclose()`` on the iterator, or cancellation of the task consuming
        it) generation stops within about one token and the model is free for
        the next caller: that is what makes barge-in cheap. Failures raise
        ``LLMError``.
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


def create_llm(settings: Settings) -> LLM:
    """Build the backend named by ``settings.llm.backend``.

    Loading a local model blocks for a moment; call this off the event loop
    (e.g. ``await asyncio.to_thread(create_llm, settings)``) at startup.
    """
    llm_settings = settings.llm
    backend = llm_settings.backend
    logger.info("loading LLM backend %s", backend)
    if backend == "llama-cpp":
        from avatalk.llm.llama_cpp import LlamaCppLLM

        return LlamaCppLLM(
            settings.llm_model_path(),
            n_ctx=llm_settings.context_tokens,
            n_threads=llm_settings.threads,
            max_tokens=llm_settings.max_tokens,
            temperature=llm_settings.temperature,
        )
    if backend == "transformers":
        from avatalk.llm.transformers_llm import TransformersLLM

        if llm_settings.model_path is None:
            # The embedded default is a GGUF file, which transformers cannot load.
            raise LLMError(
                "the transformers LLM backend needs llm.model_path set to a local "
                "Hugging Face model folder (AVATALK_LLM__MODEL_PATH)"
            )
        return TransformersLLM(
            llm_settings.model_path,
            device=llm_settings.device,
            max_tokens=llm_settings.max_tokens,
            temperature=llm_settings.temperature,
        )
    if backend == "openai":
        from avatalk.llm.openai_compatible import OpenAICompatibleLLM

        return OpenAICompatibleLLM(
            llm_settings.base_url,
            model=llm_settings.model,
            api_key=llm_settings.api_key,
            max_tokens=llm_settings.max_tokens,
            temperature=llm_settings.temperature,
            timeout_s=llm_settings.timeout_s,
        )
    raise LLMError(f"unknown LLM backend {backend!r}; choose llama-cpp, transformers or openai")
