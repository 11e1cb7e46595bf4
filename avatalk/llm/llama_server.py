"""The embedded default LLM: llama.cpp's own ``llama-server``, run and supervised by avatalk.

Why a child process rather than the in-process binding (``llama_cpp.py``): one
llama.cpp context in the binding decodes one sequence at a time, so sessions
queue for it, and each turn prefills whatever part of the prompt is not in
that one context. llama-server decodes all its slots in one batch (continuous
batching) and keeps each slot's prompt in its KV cache; a session that keeps
its slot (``id_slot``, ``cache_prompt``) only prefills its new message. avatalk
talks to it through ``OpenAICompatibleLLM``, the same code path as a vLLM or
SGLang deployment.

``LlamaServerProcess`` (``llama_server_process.py``) owns the process: it
starts, health-checks, restarts and stops it. A reply in flight when the
process dies ends with an ``LLMError`` that says so; later replies wait
(bounded) for the restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sysconfig
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from avatalk.config import LlamaServerLLMSettings, Settings
from avatalk.executors import Executors, run_in
from avatalk.llm.base import ChatMessage, LLMError
from avatalk.llm.llama_server_process import LlamaServerProcess
from avatalk.llm.openai_compatible import OpenAICompatibleLLM

logger = logging.getLogger(__name__)

_EXIT_NOTICE_S = 0.5  # how long a failed request waits to learn whether the process died


def find_llama_server(program: Path | None) -> Path:
    """The llama-server executable: the configured one, the one `make setup` links into the venv, or PATH."""
    if program is not None:
        path = Path(program)
        if path.is_file() and os.access(path, os.X_OK):
            return path
        found = shutil.which(str(program))
        if found:
            return Path(found)
        raise LLMError(f"llama-server program {program} does not exist or is not executable (llm.llama_server.program)")
    beside_python = Path(sysconfig.get_path("scripts")) / "llama-server"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return beside_python
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise LLMError(
        "llama-server was not found: run `make setup` (it compiles it once), set llm.llama_server.program, "
        "or choose another backend (llm.backend = llama-cpp runs llama.cpp in-process)"
    )


class SlotTable:
    """Which llama-server slot each session uses, so its conversation stays cached in that slot.

    A session keeps its slot while it is among the ``slots`` most recently
    active ones; a new session takes the slot of the least recently active
    session not generating right now. When every slot is busy the request
    gets no slot of its own (the server picks a free one or queues it). The
    table holds at most ``slots`` sessions, so it never grows.
    """

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._owners: OrderedDict[str, int] = OrderedDict()
        self._busy = [0] * slots
        # One loaded backend may serve several event loops in threads (tests): keep the counts exact.
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._slots

    def acquire(self, session_key: str | None) -> int:
        """The slot for this request (-1: any), counted busy until ``release``."""
        with self._lock:
            slot = self._slot_for(session_key)
            if slot >= 0:
                self._busy[slot] += 1
            return slot

    def busy(self, slot: int) -> int:
        """Requests using ``slot`` now."""
        with self._lock:
            return self._busy[slot]

    def release(self, slot: int) -> None:
        if slot >= 0:
            with self._lock:
                self._busy[slot] -= 1

    def _slot_for(self, session_key: str | None) -> int:
        if session_key is None:
            return -1
        if session_key in self._owners:
            self._owners.move_to_end(session_key)
            return self._owners[session_key]
        taken = set(self._owners.values())
        free = [slot for slot in range(self._slots) if slot not in taken]
        if free:
            slot = free[0]
        else:
            idle = next((key for key, slot in self._owners.items() if not self._busy[slot]), None)
            if idle is None:
                return -1
            slot = self._owners.pop(idle)
        self._owners[session_key] = slot
        return slot


def server_arguments(settings: LlamaServerLLMSettings, model_path: Path) -> list[str]:
    """llama-server's command line (without host and port) for these settings."""
    parallel = settings.parallel
    return [
        "--model", str(model_path),
        "--parallel", str(parallel),
        # Each slot gets context_tokens: llama-server splits --ctx-size between the slots.
        "--ctx-size", str(settings.context_tokens * parallel),
        "--no-kv-unified",
        "--cont-batching",
        "--cache-prompt",
        "--cache-reuse", str(settings.cache_reuse_tokens),
        "--cache-ram", str(settings.cache_ram_mib),
        "--threads", str(settings.threads),
        "--threads-batch", str(settings.threads_batch),
        "--alias", "avatalk",
        "--no-ui",
        "--log-colors", "off",
        *settings.extra_args,
    ]


@dataclass(frozen=True)
class PromptStats:
    """How a reply's prompt was evaluated: tokens prefilled now, and tokens reused from the slot's cache."""

    prefilled: int
    cached: int


class LlamaServerLLM(OpenAICompatibleLLM):
    """The OpenAI-compatible client, pointed at a llama-server it supervises, with a slot per session."""

    name = "llama-server"

    def __init__(
        self,
        server: LlamaServerProcess,
        executor: Executor,
        *,
        parallel: int,
        max_tokens: int = 96,
        temperature: float = 0.0,
        sampling: dict[str, Any] | None = None,
        ready_timeout_s: float = 60.0,
    ) -> None:
        """Use the (started) ``server``; ``executor`` runs the blocking stop at shutdown."""
        super().__init__(
            server.base_url,
            model="avatalk",
            max_tokens=max_tokens,
            temperature=temperature,
            # A local server answers at once; reading may wait behind other slots' prefill.
            timeout_s=ready_timeout_s,
        )
        self.server = server
        self._executor = executor
        self._slots = SlotTable(parallel)
        self._sampling = dict(sampling or {})
        self._ready_timeout_s = ready_timeout_s
        #: The prompt of each recent session's last reply (bounded: the sessions that hold slots, and a few more).
        self.prompt_stats: OrderedDict[str | None, PromptStats] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """Start llama-server for ``llm.llama_server`` and wait for its health (blocking: at startup only)."""
        section = settings.llm.llama_server
        model_path = settings.llama_server_model_path()
        if not Path(model_path).is_file():
            raise LLMError(
                f"LLM model file {model_path} does not exist (set llm.llama_server.model_path to a GGUF file)"
            )
        server = LlamaServerProcess(
            find_llama_server(section.program),
            server_arguments(section, model_path),
            port=section.port,
            startup_timeout_s=section.startup_timeout_s,
        )
        started = time.perf_counter()
        server.start()
        logger.info(
            "llama-server serving %s with %d slots in %.2f s", Path(model_path).name, section.parallel,
            time.perf_counter() - started,
        )
        return cls(
            server,
            executors.llm,
            parallel=section.parallel,
            max_tokens=settings.llm.max_tokens,
            temperature=settings.llm.temperature,
            sampling=section.sampling,
            ready_timeout_s=section.startup_timeout_s,
        )

    def _completions_url(self) -> str:
        return self.server.base_url + "/chat/completions"

    def _fields(self, slot: int) -> dict[str, Any]:
        """llama-server's own request fields: the slot, prompt caching, sampling extras."""
        return {**self._sampling, "id_slot": slot, "cache_prompt": True}

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        """Stream the reply from this session's slot; see ``LLM.stream``.

        While the server restarts, the request waits (up to the startup
        timeout) instead of failing at once. If the server dies during the
        reply, the error says so rather than quoting a broken connection.
        """
        if not await self.server.wait_ready(self._ready_timeout_s):
            raise LLMError(
                f"the embedded LLM server (llama-server) is not running; last output: "
                f"{self.server.output_tail() or '(none)'}"
            )
        slot = self._slots.acquire(session_key)

        def note_timings(timings: dict[str, Any]) -> None:
            stats = PromptStats(int(timings.get("prompt_n", 0)), int(timings.get("cache_n", 0)))
            self.prompt_stats[session_key] = stats
            self.prompt_stats.move_to_end(session_key)
            while len(self.prompt_stats) > 2 * self._slots.size:
                self.prompt_stats.popitem(last=False)
            logger.debug("slot %d: prompt of %d tokens, %d from the cache", slot, stats.prefilled + stats.cached,
                         stats.cached)

        deltas = self._stream_from(messages, self._fields(slot), on_timings=note_timings)
        try:
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except LLMError as error:
            status = await self.server.wait_exit(_EXIT_NOTICE_S)
            if status is not None:
                raise LLMError(
                    f"the embedded LLM server (llama-server) stopped during the reply (exit status {status}); "
                    "it is being restarted"
                ) from error
            raise
        finally:
            self._slots.release(slot)

    async def prefill(self, messages: list[ChatMessage], session_key: str) -> None:
        """Prefill ``messages`` in the session's slot (one token generated), so its reply starts from them.

        Skipped while the server is not ready or the session's slot is taken
        (its reply is being generated): a prefill never delays a reply.
        """
        if not self.server.ready:
            return
        slot = self._slots.acquire(session_key)
        try:
            if slot >= 0 and self._slots.busy(slot) == 1:
                await self._prefill_slot(messages, slot)
        finally:
            self._slots.release(slot)

    async def _prefill_slot(self, messages: list[ChatMessage], slot: int) -> None:
        """Evaluate ``messages`` in ``slot`` (one token generated): its KV cache then holds them."""
        deltas = self._stream_from(messages, self._fields(slot), max_tokens=1)
        async with aclosing(deltas):
            async for _delta in deltas:
                pass

    async def warm_up(self, messages: list[ChatMessage]) -> None:
        """Prefill ``messages`` (the persona's prompt) in every slot at once, so no session's first turn pays it."""
        await asyncio.gather(*(self._prefill_slot(messages, slot) for slot in range(self._slots.size)))

    async def aclose(self) -> None:
        """Close the connections and stop the server process."""
        await super().aclose()
        try:
            await run_in(self._executor, self.server.stop)
        except RuntimeError:  # the pools are already shut down: stop it from a plain thread
            await asyncio.to_thread(self.server.stop)
