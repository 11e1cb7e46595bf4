"""The embedded default LLM: a GGUF model run in-process by llama.cpp.

llama.cpp's generation loop is synchronous, so it runs on the ``llm``
executor and its deltas reach the event loop through a small bounded queue.
One ``Llama`` context decodes one sequence at a time, so sessions take turns
on the loaded model (``ModelTurns``): they wait in asyncio, in arrival order,
and a generation is submitted to the executor only when the model is free. A
consumer that stops reading ends its generation at the next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm.base import LLM, ChatMessage, LLMError
from avatalk.threads import Emit, ModelTurns

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)


class LlamaCppLLM(LLM):
    """A GGUF chat model loaded once and shared by every session."""

    name = "llama-cpp"

    def __init__(
        self,
        model_path: Path,
        executors: Executors,
        *,
        n_ctx: int = 2048,
        n_threads: int = 2,
        max_tokens: int = 96,
        temperature: float = 0.3,
    ) -> None:
        """Load ``model_path``; raises ``LLMError`` if it is missing or not a GGUF model."""
        try:
            from llama_cpp import Llama
        except ImportError as error:
            raise LLMError(
                "the llama-cpp LLM backend needs llama-cpp-python; install it with "
                "`pip install llama-cpp-python` or choose another backend"
            ) from error
        path = Path(model_path)
        if not path.is_file():
            raise LLMError(f"LLM model file {path} does not exist (set llm.llama_cpp.model_path to a GGUF file)")
        started = time.perf_counter()
        try:
            self._llama: Llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        except (ValueError, RuntimeError, OSError) as error:
            raise LLMError(
                f"could not load LLM model {path} with llama.cpp (is it a valid GGUF file?): {error}"
            ) from error
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._turns = ModelTurns(executors.llm)
        self._closed = False
        logger.info(
            "loaded %s in %.2f s (n_ctx=%d, threads=%d)", path.name, time.perf_counter() - started, n_ctx, n_threads
        )

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The model of ``llm.llama_cpp`` (the bundled SmolLM2 when unset)."""
        section = settings.llm.llama_cpp
        return cls(
            settings.llm_model_path(),
            executors,
            n_ctx=section.context_tokens,
            n_threads=section.threads,
            max_tokens=settings.llm.max_tokens,
            temperature=settings.llm.temperature,
        )

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        """Stream the reply; see ``LLM.stream`` (one model context: ``session_key`` changes nothing)."""
        if self._closed:
            raise LLMError("the llama.cpp model has been closed")
        payload = [{"role": message.role, "content": message.content} for message in messages]
        deltas = self._turns.stream(lambda emit, stop: self._generate(payload, emit, stop), maxsize=2)
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except (ValueError, RuntimeError) as error:  # e.g. the prompt exceeds the context window
            raise LLMError(f"llama.cpp could not generate a reply: {error}") from error

    def _generate(self, payload: list[dict[str, str]], emit: Emit[str], stop: threading.Event) -> None:
        """Blocking generation loop, run on the ``llm`` executor during this caller's turn."""
        chunks: Any = self._llama.create_chat_completion(
            messages=payload,  # type: ignore[arg-type]
            stream=True,
            max_tokens=self._max_tokens,
            temperature=self._temperature,
        )
        try:
            for chunk in chunks:
                content = chunk["choices"][0]["delta"].get("content")
                if content and not emit(content):
                    break
        finally:
            # Closing the generator ends llama.cpp's decode loop now rather
            # than at garbage collection, before the turn passes on.
            chunks.close()

    def count_tokens(self, text: str) -> int:
        """Exact token count with the model's own tokenizer."""
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def aclose(self) -> None:
        """Free the model once a running generation has finished (waiting in asyncio, like a session)."""
        if self._closed:
            return
        self._closed = True
        await self._turns.run(self._llama.close)
