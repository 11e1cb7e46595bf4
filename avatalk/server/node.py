"""One node as a load balancer sees it: readiness, the agent-check port, draining, and the process that serves it.

A load balancer needs two answers from each node: may I send it a new
session at all (``/readyz``: 503 while the models load, while draining and
at the session limit, with the reason in the body), and how much room does
it have (the agent port: HAProxy's agent-check protocol, one line per TCP
connection, a weight from the node's sessions and free slots; see
``Readiness.agent_reply``). WebRTC calls carry their media past the
balancer, so its own connection counts cannot see them: the weight is what
spreads them.

Draining is one mechanism for every way a node stops: SIGTERM (``avatalk
serve``), a rolling deploy, a test. ``drain`` stops admitting at once
(``/readyz`` 503, agent ``drain``, new sessions refused with
``server_shutdown``), stops taking jobs, tells every WebSocket and WebRTC
session ``server_shutdown``, lets replies in progress finish up to
``limits.drain_s``, then hangs up each transport and closes the session.
uvicorn closes every WebSocket (code 1012) as soon as it starts shutting
down, before the app's own shutdown runs, so ``GracefulServer`` runs the
drain first and only then lets uvicorn shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from types import FrameType
from typing import Literal

import uvicorn
from starlette.applications import Starlette

from avatalk.server.services import Services, services

logger = logging.getLogger(__name__)

ReadyState = Literal["ready", "loading", "draining", "full"]


@dataclass(frozen=True)
class Readiness:
    """Whether this node takes a new session now, and why not; ``calls`` of its ``sessions`` are WebRTC calls."""

    status: ReadyState
    sessions: int
    max_sessions: int
    node: str | None
    calls: int = 0

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def body(self) -> dict[str, object]:
        """The JSON of ``/readyz``."""
        return {"status": self.status, "sessions": self.sessions, "max_sessions": self.max_sessions, "node": self.node}

    def agent_reply(self) -> str:
        """The line of HAProxy's agent-check protocol.

        ``ready up N%``: in service, with N % of its configured weight.
        HAProxy's ``leastconn`` sends a new session to the server with the
        lowest (connections + 1) / weight. It counts each WebSocket
        conversation (a connection through it) but no WebRTC call (the
        media bypasses it), so the weight carries what it cannot see:
        N = 100 (ws + 1) / (sessions + 1), which makes HAProxy's score
        (sessions + 1) / configured weight, every session counted once. A node
        of WebSocket sessions only reports 100 %, so a check that is a little
        late never skews a spread the connection counts make exact. 0 % when
        the node is full (no new session, the ones it has go on); ``drain``
        while shutting down; ``down`` while the models load. Text after ``#``
        shows in HAProxy's stats.
        """
        if self.status == "loading":
            return "down #loading models\n"
        if self.status == "draining":
            return "drain #shutting down\n"
        free = max(self.max_sessions - self.sessions, 0)
        websockets = self.sessions - self.calls
        percent = 0 if free == 0 else max(1, round(100 * (websockets + 1) / (self.sessions + 1)))
        return f"ready up {percent}% #{free} of {self.max_sessions} session slots free\n"


def readiness(svc: Services) -> Readiness:
    """This node's readiness from its services (models, draining, session slots)."""
    sessions = svc.sessions
    status: ReadyState
    if svc.models is None:
        status = "loading"
    elif sessions.draining:
        status = "draining"
    elif sessions.active >= sessions.capacity:
        status = "full"
    else:
        status = "ready"
    return Readiness(status, sessions.active, sessions.capacity, svc.settings.cluster.node_id, sessions.over("webrtc"))


class AgentServer:
    """The agent-check port: every TCP connection gets this node's ``Readiness.agent_reply`` and is closed."""

    def __init__(self, svc: Services) -> None:
        self._svc = svc
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._answer, host, port)
        logger.info("agent-check on %s:%d", host, port)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(readiness(self._svc).agent_reply().encode())
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the checker went away: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


async def drain(app: Starlette) -> None:
    """Stop admitting, tell every session, let replies finish (``limits.drain_s``), hang up and close them.

    Safe to call more than once (the later calls find nothing left to drain).
    Jobs are no longer taken from the queue; the ones running go on until the
    app shuts down, when they are put back in the queue for another node.
    """
    svc = services(app)
    svc.sessions.draining = True
    if svc.jobs is not None:
        svc.jobs.stop_taking()
    count = svc.sessions.active
    if count:
        logger.info("draining %d session(s) (up to %.0f s)", count, svc.settings.limits.drain_s)
    await svc.sessions.close_all(svc.settings.limits.drain_s)


class GracefulServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM or SIGINT drains the app before uvicorn shuts down.

    uvicorn's own shutdown closes every WebSocket with 1012 first, so nothing
    the app does afterwards can reach its clients. Here the first signal
    starts ``drain``; when it is done, uvicorn shuts down as usual (a
    second signal skips the wait).
    """

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self._app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or one before serving: uvicorn's way
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it after serving, as it does for its own
        logger.info("received %s: draining before shutting down", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self._app)
        except Exception:
            logger.exception("draining failed; shutting down anyway")
        finally:
            self.should_exit = True
