"""The embedded default LLM: llama.cpp's own ``llama-server``, run and supervised by avatalk.

Why a child process rather than the in-process binding (``llama_cpp.py``): one
llama.cpp context in the binding decodes one sequence at a time, so sessions
queue for it, and each turn prefills whatever part of the prompt is not in
that one context. llama-server decodes all its slots in one batch (continuous
batching) and keeps each slot's prompt in its KV cache; a session that keeps
its slot (``id_slot``, ``cache_prompt``) only prefills its new message. avatalk
talks to it through ``OpenAICompatibleLLM``, the same code path as a vLLM or
SGLang deployment.

``LlamaServerProcess`` owns the process: it starts it on a loopback port and
waits for its health check (so the server is ready only once the model is),
restarts it with back-off when it dies, and stops it on shutdown. The kernel
ends it too if avatalk dies without stopping it (Linux parent-death signal),
so it never outlives its parent. A reply in flight when the process dies ends
with an ``LLMError`` that says so; later replies wait (bounded) for the restart.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx

from avatalk.config import LlamaServerLLMSettings, Settings
from avatalk.executors import Executors, run_in
from avatalk.llm.base import ChatMessage, LLMError
from avatalk.llm.openai_compatible import OpenAICompatibleLLM

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # waits before successive restarts; a healthy run resets it
_HEALTHY_RUN_S = 30.0  # a process that ran this long before dying restarts without back-off
_STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
_OUTPUT_TAIL_LINES = 20  # lines of the server's output kept to explain a failure
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


def free_loopback_port() -> int:
    """A port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _parent_death_prefix() -> list[str]:
    """A command prefix that has Linux SIGTERM the child when the thread that started it dies.

    The child is started by the supervisor thread, which lives until the
    child is stopped, so this fires only when avatalk itself dies (crash,
    SIGKILL) without stopping the server. ``setpriv`` (util-linux) sets the
    parent-death signal and execs the server; it is kept across the exec.
    Without it (not Linux, or a minimal image) only a normal exit stops the
    server (``atexit``).
    """
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "SIGTERM", "--"] if setpriv else []


class LlamaServerProcess:
    """One supervised ``llama-server`` child process.

    Thread-based on purpose: the process is started while the models load
    (before any event loop serves requests) and one loaded set of models may be
    shared by several event loops (tests run apps in threads), so supervision
    must not belong to a loop. One supervisor thread spawns the process, waits
    for its health check, waits for it to exit and restarts it; one reader
    thread per process forwards its output to the log (and keeps the last
    lines to explain a failure). The event loop only reads flags.
    """

    def __init__(
        self,
        program: Path,
        arguments: list[str],
        *,
        port: int = 0,
        startup_timeout_s: float = 60.0,
    ) -> None:
        """``arguments`` are everything but ``--host``/``--port``, which the supervisor adds."""
        self._program = program
        self._arguments = list(arguments)
        self._fixed_port = port
        self._port = port or free_loopback_port()
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._first_outcome = threading.Event()
        self._first_failure: str | None = None
        self._output: deque[str] = deque(maxlen=_OUTPUT_TAIL_LINES)
        self._thread: threading.Thread | None = None
        self._last_exit: int | None = None
        #: Completed restarts after the first start (tests and logs read it).
        self.restarts = 0

    # ---- what the backend asks -----------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root of the current process."""
        return f"http://{HOST}:{self._port}/v1"

    @property
    def ready(self) -> bool:
        """The process is running and answered its health check."""
        return self._ready.is_set()

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def last_exit(self) -> int | None:
        """The exit status of the last process that ended (negative: killed by that signal)."""
        return self._last_exit

    def output_tail(self) -> str:
        """The last lines the server printed, on one line, to quote in errors."""
        return " | ".join(line for line in list(self._output)[-5:] if line)

    def start(self) -> None:
        """Start the process and block until it is healthy; ``LLMError`` (with its output) if it is not.

        Blocking (up to ``startup_timeout_s``): call it off the event loop,
        while the models load. A first start that fails is not retried: the
        configuration is wrong, and the server should not report ready.
        """
        if self._thread is not None:
            raise RuntimeError("the llama-server supervisor was already started")
        self._thread = threading.Thread(target=self._supervise, name="avatalk-llama-server", daemon=True)
        self._thread.start()
        self._first_outcome.wait()
        if self._first_failure is not None:
            self._thread.join(timeout=_STOP_GRACE_S)
            raise LLMError(self._first_failure)
        _running.add(self)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and the supervisor; blocking, at most a few seconds."""
        with self._lock:
            self._stopping.set()
            process = self._process
        self._ready.clear()
        if process is not None:
            _terminate(process)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=_STOP_GRACE_S * 2)
        _running.discard(self)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait (in asyncio, polling) until the process is healthy; False after ``timeout_s`` or once stopped."""
        deadline = time.monotonic() + timeout_s
        while not self._ready.is_set():
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def wait_exit(self, timeout_s: float) -> int | None:
        """The exit status if the current process ends within ``timeout_s``, else None (it still runs)."""
        process = self._process
        deadline = time.monotonic() + timeout_s
        while process is not None:
            status = process.poll()
            if status is not None:
                return status
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.02)
        return self._last_exit

    # ---- the supervisor thread -----------------------------------------------------------

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            problem = self._run_once()
            if not self._first_outcome.is_set():  # the first start failed: no retries
                self._first_failure = problem or f"llama-server exited with status {self._last_exit} while starting"
                self._first_outcome.set()
                return
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started >= _HEALTHY_RUN_S else failures + 1
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)] if failures else 0.0
            logger.warning(
                "llama-server stopped (%s); restarting in %.1f s. Last output: %s",
                problem or f"exit status {self._last_exit}", delay, self.output_tail() or "(none)",
            )
            if self._stopping.wait(delay):
                return
            if not self._fixed_port:
                self._port = free_loopback_port()  # the old one may have been taken meanwhile
            self.restarts += 1

    def _run_once(self) -> str | None:
        """Run one process until it exits. Returns why it never became healthy, or None once it did."""
        command = [
            *_parent_death_prefix(), str(self._program), *self._arguments, "--host", HOST, "--port", str(self._port)
        ]
        with self._lock:
            if self._stopping.is_set():
                return "stopped"
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    # Its own process group: a SIGTERM to avatalk's group (Ctrl-C, systemd) must not kill
                    # the model under replies that are finishing during the drain; the parent-death
                    # signal still stops it when avatalk itself goes away.
                    start_new_session=True,
                )
            except OSError as error:
                return f"could not start llama-server ({self._program}): {error}"
            self._process = process
        logger.info("llama-server started (pid %d, port %d)", process.pid, self._port)
        reader = threading.Thread(
            target=self._pump_output, args=(process,), name="avatalk-llama-server-output", daemon=True
        )
        reader.start()
        problem = self._wait_healthy(process)
        if problem is None:
            self._ready.set()
            self._first_outcome.set()
            logger.info("llama-server ready on %s", self.base_url)
        else:
            _terminate(process)
        self._last_exit = process.wait()
        self._ready.clear()
        reader.join(timeout=_STOP_GRACE_S)
        return problem

    def _wait_healthy(self, process: subprocess.Popen[bytes]) -> str | None:
        """Poll ``/health`` until it answers 200; why not, otherwise."""
        url = f"http://{HOST}:{self._port}/health"
        deadline = time.monotonic() + self._startup_timeout_s
        with httpx.Client(timeout=1.0) as client:
            while True:
                status = process.poll()
                if status is not None:
                    time.sleep(0.1)  # let the reader catch the last lines
                    return f"llama-server exited with status {status} while starting: {self.output_tail() or '(no output)'}"
                if self._stopping.is_set():
                    return "stopped"
                try:
                    if client.get(url).status_code == 200:
                        return None
                except httpx.HTTPError:
                    pass  # not listening yet, or still loading the model
                if time.monotonic() >= deadline:
                    return (
                        f"llama-server did not become healthy within {self._startup_timeout_s:g} s "
                        f"(llm.llama_server.startup_timeout_s): {self.output_tail() or '(no output)'}"
                    )
                time.sleep(0.05)

    def _pump_output(self, process: subprocess.Popen[bytes]) -> None:
        """Forward the server's output to the log at debug level; keep the last lines."""
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._output.append(line)
                logger.debug("llama-server: %s", line)
        process.stdout.close()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


#: Processes to stop when the interpreter exits without having stopped them (e.g. shared test models).
_running: weakref.WeakSet[LlamaServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    for server in list(_running):
        server.stop()


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

    async def warm_up(self, messages: list[ChatMessage]) -> None:
        """Prefill ``messages`` (the persona's prompt) in every slot at once, so no session's first turn pays it."""

        async def one(slot: int) -> None:
            deltas = self._stream_from(messages, self._fields(slot), max_tokens=1)
            async with aclosing(deltas):
                async for _delta in deltas:
                    pass

        await asyncio.gather(*(one(slot) for slot in range(self._slots.size)))

    async def aclose(self) -> None:
        """Close the connections and stop the server process."""
        await super().aclose()
        try:
            await run_in(self._executor, self.server.stop)
        except RuntimeError:  # the pools are already shut down: stop it from a plain thread
            await asyncio.to_thread(self.server.stop)
