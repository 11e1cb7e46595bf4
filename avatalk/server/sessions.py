"""The set of live sessions and the concurrency limit."""

from __future__ import annotations

import asyncio
import logging

from avatalk.server.auth import OPEN, Principal
from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)


class SessionRegistry:
    """Admits sessions up to a global capacity and each key's own limit; refuses the rest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sessions: dict[str, ConversationSession] = {}
        self._owners: dict[str, Principal] = {}

    @property
    def active(self) -> int:
        return len(self._sessions)

    def refusal(self, principal: Principal) -> str | None:
        """Why a new session for ``principal`` would be refused, or None."""
        if len(self._sessions) >= self.capacity:
            return f"the server is at its limit of {self.capacity} concurrent sessions; try again later"
        if principal.max_sessions is not None:
            own = sum(1 for owner in self._owners.values() if owner.name == principal.name)
            if own >= principal.max_sessions:
                return f"key {principal.name!r} is at its limit of {principal.max_sessions} concurrent sessions"
        return None

    def try_add(self, session: ConversationSession, principal: Principal = OPEN) -> str | None:
        """Admit ``session``; returns the refusal reason instead when it cannot be admitted."""
        reason = self.refusal(principal)
        if reason is None:
            self._sessions[session.id] = session
            self._owners[session.id] = principal
        return reason

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._owners.pop(session_id, None)

    async def close_all(self, drain_s: float = 0.0) -> None:
        """Shutdown: every session is told and may finish its reply (in parallel), then closed.

        One session failing to drain or close is logged and does not keep the
        others open; a cancellation of the caller still cancels the shutdown.
        """
        sessions = list(self._sessions.values())
        self._sessions.clear()
        self._owners.clear()

        async def finish(session: ConversationSession) -> None:
            try:
                await session.drain(drain_s)
            finally:
                await session.close()

        results = await asyncio.gather(*(finish(session) for session in sessions), return_exceptions=True)
        for session, result in zip(sessions, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("session %s did not close cleanly", session.id, exc_info=result)
