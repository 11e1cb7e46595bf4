"""The set of live sessions, the concurrency limit, and draining them on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Literal

from avatalk.server.auth import OPEN, Principal
from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)

Transport = Literal["ws", "webrtc"]

#: How a transport ends its connection when the server shuts down (WebSocket close 1012, a hung-up call).
HangUp = Callable[[], Awaitable[None]]


class SessionRegistry:
    """Admits sessions up to a global capacity and each key's own limit; refuses the rest.

    On shutdown it stops admitting (``draining``) and ``close_all`` drains
    every session: each is told (``server_shutdown``), its reply in progress
    may finish, then its transport hangs up the way the transport registered
    with ``set_hang_up`` and the session is closed.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.draining = False
        self._sessions: dict[str, ConversationSession] = {}
        self._owners: dict[str, Principal] = {}
        self._transports: dict[str, Transport] = {}
        self._hang_ups: dict[str, HangUp] = {}

    @property
    def active(self) -> int:
        return len(self._sessions)

    def over(self, transport: Transport) -> int:
        """Sessions over one transport (a balancer counts WebSocket connections itself, not WebRTC calls)."""
        return sum(1 for used in self._transports.values() if used == transport)

    def refusal(self, principal: Principal) -> str | None:
        """Why a new session for ``principal`` would be refused for lack of room, or None."""
        if len(self._sessions) >= self.capacity:
            return f"the server is at its limit of {self.capacity} concurrent sessions; try again later"
        if principal.max_sessions is not None:
            own = sum(1 for owner in self._owners.values() if owner.name == principal.name)
            if own >= principal.max_sessions:
                return f"key {principal.name!r} is at its limit of {principal.max_sessions} concurrent sessions"
        return None

    def try_add(
        self, session: ConversationSession, principal: Principal = OPEN, transport: Transport = "ws"
    ) -> str | None:
        """Admit ``session``; returns the refusal reason instead when it cannot be admitted."""
        reason = self.refusal(principal)
        if reason is None:
            self._sessions[session.id] = session
            self._owners[session.id] = principal
            self._transports[session.id] = transport
        return reason

    def get(self, session_id: str) -> ConversationSession | None:
        """The live session ``session_id`` on this node, or None."""
        return self._sessions.get(session_id)

    def owner(self, session_id: str) -> Principal | None:
        """Who opened the live session ``session_id`` (None when there is none)."""
        return self._owners.get(session_id)

    def set_hang_up(self, session_id: str, hang_up: HangUp) -> None:
        """How the transport of ``session_id`` ends its connection at shutdown, after the drain."""
        if session_id in self._sessions:
            self._hang_ups[session_id] = hang_up

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._owners.pop(session_id, None)
        self._transports.pop(session_id, None)
        self._hang_ups.pop(session_id, None)

    async def close_all(self, drain_s: float = 0.0) -> None:
        """Shutdown: stop admitting; every session is told and may finish its reply (in parallel), then hung up and closed.

        One session failing to drain or close is logged and does not keep the
        others open; a cancellation of the caller still cancels the shutdown.
        """
        self.draining = True
        entries = [(session, self._hang_ups.get(session_id)) for session_id, session in self._sessions.items()]

        async def finish(session: ConversationSession, hang_up: HangUp | None) -> None:
            try:
                await session.drain(drain_s)
            finally:
                try:
                    if hang_up is not None:
                        await hang_up()
                finally:
                    await session.close()

        results = await asyncio.gather(*(finish(session, hang_up) for session, hang_up in entries), return_exceptions=True)
        for (session, _), result in zip(entries, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("session %s did not close cleanly", session.id, exc_info=result)
        self._sessions.clear()
        self._owners.clear()
        self._transports.clear()
        self._hang_ups.clear()
