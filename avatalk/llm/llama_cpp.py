"""The embedded default LLM: a GGUF model run in-process by llama.cpp.

llama.cpp's generation loop is synchronous, so it runs in a worker thread via
``iterate_in_thread``. One ``Llama`` context can only decode one sequence at a
time, so a lock serialises generations of the loaded model across sessions;
a stopped consumer releases it within one token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from avatalk.fair_lock import FairLock
from avatalk.llm.base import LLM, ChatMessage, LLMError
from avatalk.threads import iterate_in_thread

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger(__name__)


class LlamaCppLLM(LLM):
    """A GGUF chat model loaded once and shared by every session."""

    name = "llama-cpp"

    def __init__(
        self,
        model_path: Path,
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
            raise LLMError(f"LLM model file {path} does not exist (set llm.model_path to a GGUF file)")
        started = time.perf_counter()
        try:
            self._llama: Llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        except (ValueError, RuntimeError, OSError) as error:
            raise LLMError(
                f"could not load LLM model {path} with llama.cpp (is it a valid GGUF file?): {error}"
            ) from error
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._lock = FairLock()  # sessions take turns in arrival order
        self._closed = False
        logger.info(
            "loaded %s in %.2f s (n_ctx=%d, threads=%d)", path.name, time.perf_counter() - started, n_ctx, n_threads
        )

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        """Stream the reply; see ``LLM.stream``."""
        if self._closed:
            raise LLMError("the llama.cpp model has been closed")
        payload = [{"role": message.role, "content": message.content} for message in messages]
        try:
            async for delta in iterate_in_thread(lambda stop: self._generate(payload, stop), maxsize=2):
                yield delta
        except (ValueError, RuntimeError) as error:  # e.g. the prompt exceeds the context window
            raise LLMError(f"llama.cpp could not generate a reply: {error}") from error

    def _generate(self, payload: list[dict[str, str]], stop: threading.Event) -> Iterator[str]:
        """Blocking generation loop run in a worker thread; holds the model lock."""
        if not self._lock.acquire(stop):
            return
        try:
            if stop.is_set():
                return
            chunks: Any = self._llama.create_chat_completion(
                messages=payload,  # type: ignore[arg-type]
                stream=True,
                max_tokens=self._max_tokens,
                temperature=self._temperature,
            )
            try:
                for chunk in chunks:
                    if stop.is_set():
                        break
                    content = chunk["choices"][0]["delta"].get("content")
                    if content:
                        yield content
            finally:
                # Closing the generator ends llama.cpp's decode loop now rather
                # than at garbage collection, before the lock is released.
                chunks.close()
        finally:
            self._lock.release()

    def count_tokens(self, text: str) -> int:
        """Exact token count with the model's own tokenizer."""
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    async def aclose(self) -> None:
        """Free the model once any running generation has finished."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_model)

    def _close_model(self) -> None:
        """Wait for the model lock (a running generation ends first), then free it."""
        with self._lock:
            self._llama.close()
