"""Real parts of a deployment of several nodes, started by the tests in temporary folders on loopback.

``PostgresServer`` runs Debian's PostgreSQL (initdb + postgres) in a
temporary folder; ``HAProxy`` runs Debian's haproxy with the project's own
``deploy/haproxy.cfg`` rewritten for loopback ports; ``Node`` runs
``avatalk serve`` as a real process (so SIGTERM and SIGKILL are real).
``FakeLLMServer`` is the one test double: an OpenAI-compatible chat server
with a fixed reply, so three nodes on two cores do not each run an LLM.
Where PostgreSQL or HAProxy is missing and cannot be installed
(``make cluster-deps``), ``require`` skips with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fakes import LiveServer, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def find_program(name: str) -> str | None:
    """``name`` on PATH, or in Debian's versioned PostgreSQL folder (the newest version)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parent.parent.name), reverse=True
    )
    return str(candidates[0]) if candidates else None


def require(*names: str) -> dict[str, str]:
    """The paths of these programs; skips the test, saying which are missing and how to get them."""
    found = {name: find_program(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed and could not be installed here "
            "(`make cluster-deps` installs Debian's haproxy and postgresql as root)"
        )
    return {name: path for name, path in found.items() if path is not None}


def wait_for_port(port: int, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process on port {port} exited with {process.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, no fsync), in a temporary folder.

    PostgreSQL refuses to run as root, so under root (CI, the Makefile's
    machines) it runs as Debian's ``postgres`` user.
    """

    def __init__(self) -> None:
        programs = require("initdb", "postgres")
        self.folder = Path(tempfile.mkdtemp(prefix="avatalk-pg-"))
        self.port = free_port()
        self.user = "avatalk"
        run_as: dict[str, object] = {}
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        data = self.folder / "data"
        subprocess.run(
            [programs["initdb"], "-D", str(data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            **run_as,  # type: ignore[arg-type]
        )
        self.log = (self.folder / "postgres.log").open("wb")
        self.process = subprocess.Popen(
            [
                programs["postgres"],
                "-D", str(data),
                "-k", str(self.folder),
                "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "max_connections=200",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            **run_as,  # type: ignore[arg-type]
        )
        wait_for_port(self.port, 30, self.process)
        self._wait_accepting(30)
        self._databases = 0

    def _wait_accepting(self, timeout_s: float) -> None:
        """The port opens before recovery ends ("the database system is starting up"): wait for a session."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        self._databases += 1
        name = f"avatalk_test_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class FakeLLMServer:
    """Test double: an OpenAI-compatible ``/v1/chat/completions`` streaming one fixed short reply."""

    REPLY = ["Two plus two", " is four.", " Anything else?"]

    def __init__(self) -> None:
        self.requests = 0
        app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])
        self.server = LiveServer(app, lifespan="off")
        self.base_url = f"{self.server.base_url}/v1"

    async def completions(self, request: Request) -> StreamingResponse:
        await request.json()
        self.requests += 1
        return StreamingResponse(self._events(), media_type="text/event-stream")

    async def _events(self) -> AsyncIterator[str]:
        def event(payload: object) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        yield event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for piece in self.REPLY:
            yield event({"choices": [{"index": 0, "delta": {"content": piece}}]})
            await asyncio.sleep(0.005)
        yield event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        yield "data: [DONE]\n\n"

    def stop(self) -> None:
        self.server.stop()


def clean_environment() -> dict[str, str]:
    """This process's environment without any AVATALK_* setting (a node gets only what the test gives it)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("AVATALK_")}


class Node:
    """``avatalk serve`` as its own process, on loopback, with its settings in environment variables."""

    def __init__(self, name: str, folder: Path, settings: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.agent_port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"{name}.log"
        self.env = clean_environment() | {
            "AVATALK_CONFIG": str(folder / "none.toml"),  # no avatalk.toml of the developer's
            "AVATALK_HOST": "127.0.0.1",
            "AVATALK_PORT": str(self.port),
            "AVATALK_CLUSTER__NODE_ID": name,
            "AVATALK_CLUSTER__AGENT_PORT": str(self.agent_port),
            "AVATALK_WEBRTC__HOST_ADDRESSES": '["127.0.0.1"]',
            **settings,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "avatalk.cli", "serve"],
            cwd=self.folder,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"node {self.name} was not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # twice: no drain, straight to shutdown
        time.sleep(0.2)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def agent_answer(port: int) -> str:
    """What a node's agent-check port says (HAProxy's agent protocol: one line, then the node closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        chunks = []
        while chunk := sock.recv(1024):
            chunks.append(chunk)
    return b"".join(chunks).decode()


class HAProxy:
    """Debian's haproxy running ``deploy/haproxy.cfg``, its addresses moved to loopback ports.

    The configuration is the documented one; only the listening address,
    the server addresses and the check timings (faster, so the tests do not
    wait) are rewritten. A stats socket lets the tests read the servers' state.
    """

    def __init__(self, folder: Path, nodes: list[Node]) -> None:
        program = require("haproxy")["haproxy"]
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.stats_socket = folder / "haproxy.sock"
        self.config = folder / "haproxy.cfg"
        self.config.write_text(loopback_config(HAPROXY_CFG.read_text(), self.port, nodes, self.stats_socket))
        checked = subprocess.run([program, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if checked.returncode != 0:
            raise RuntimeError(f"haproxy refused the configuration:\n{checked.stdout}{checked.stderr}")
        self.log_path = folder / "haproxy.log"
        log = self.log_path.open("wb")
        self.process = subprocess.Popen([program, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for_port(self.port, 30, self.process)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/ws"

    def command(self, line: str) -> str:
        """One command on the runtime API (the stats socket)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers(self, backend: str = "avatalk_sessions") -> dict[str, dict[str, str]]:
        """Each server of a backend (new sessions by default): its status (UP, DOWN, ...), weight, sessions."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            values = dict(zip(header, line.split(","), strict=False))
            if values.get("pxname") == backend and values.get("svname") not in ("FRONTEND", "BACKEND", None):
                rows[values["svname"]] = values
        return rows

    def wait_until(
        self, predicate, timeout_s: float = 30.0, what: str = "the servers' state", backend: str = "avatalk_sessions"
    ) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            servers = self.servers(backend)
            if predicate(servers):
                return servers
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached; haproxy says {servers}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def loopback_config(config: str, port: int, nodes: list[Node], stats_socket: Path) -> str:
    """``deploy/haproxy.cfg`` for this test: loopback addresses, the test's nodes, fast checks, a stats socket.

    Everything else (balancing, checks, routing of WebRTC calls, the 503 page) is the documented file as it is.
    """
    text = re.sub(r"(?m)^(\s*)bind .*$", rf"\1bind 127.0.0.1:{port}", config)  # no TLS on loopback
    text = re.sub(r"(?m)^(\s*)stats socket .*$", rf"\1stats socket {stats_socket} mode 600 level admin", text)
    text = re.sub(r"(?m)^(\s*)log /dev/log .*$", r"\1log stderr format short local0 notice", text)
    text = text.replace("/etc/haproxy/errors/", f"{HAPROXY_CFG.parent}/errors/")
    # A test needs few connections (and may not raise its file limit to what 20000 need).
    text = re.sub(r"(?m)^(\s*)maxconn \d+$", r"\1maxconn 1000", text)
    # The documented servers are examples: the test's nodes replace them, with fast checks.
    text = re.sub(r"(?m)^\s*(server|use-server) node\d.*\n", "", text)
    fast = "inter 300ms fall 1 rise 1"
    session_servers = "".join(
        f"    server {node.name} 127.0.0.1:{node.port} check agent-port {node.agent_port} {fast} agent-inter 300ms\n"
        for node in nodes
    )
    servers = "".join(
        f"    use-server {node.name} if {{ path_beg /v1/webrtc/{node.name}. }}\n" for node in nodes
    ) + "".join(f"    server {node.name} 127.0.0.1:{node.port} check {fast}\n" for node in nodes)
    for marker, lines in (("    # --- session nodes ---\n", session_servers), ("    # --- nodes ---\n", servers)):
        if marker not in text:
            raise RuntimeError(f"{HAPROXY_CFG} has no {marker.strip()!r} line for the test to put its nodes under")
        text = text.replace(marker, marker + lines, 1)
    return text
