"""The supervised ``llama-server`` child process behind ``LlamaServerLLM`` (``llama_server.py``).

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
import shutil
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path

import httpx

from avatalk.llm.base import LLMError

logger = logging.getLogger(__name__)


HOST = "127.0.0.1"
_RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # waits before successive restarts; a healthy run resets it
_HEALTHY_RUN_S = 30.0  # a process that ran this long before dying restarts without back-off
_STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
_OUTPUT_TAIL_LINES = 20  # lines of the server's output kept to explain a failure


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
