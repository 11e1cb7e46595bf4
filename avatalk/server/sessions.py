"""The set of live sessions and the concurrency limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)


class SessionRegistry:
    """Admits sessions up to a capacity; refuses the rest instead of degrading everyone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._sessions: dict[str, ConversationSession] = {}

    @property
    def active(self) -> int:
        return len(self._sessions)

    def try_add(self, session: ConversationSession) -> bool:
        if len(self._sessions) >= self.capacity:
            return False
        self._sessions[session.id] = session
        return True

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def close_all(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for session in sessions:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await session.close()
