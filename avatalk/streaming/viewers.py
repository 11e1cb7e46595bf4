"""Extra outputs that get every tick of a session too: the WebRTC viewers of a render session.

A render session's agent gets its ticks (and all events) over its own
WebSocket while people watch the same ticks elsewhere. A viewer that fails
loses its picture and is hung up; the session's own clock never waits on it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine

from avatalk.streaming.clock import Tick
from avatalk.streaming.stage import SessionOutput

logger = logging.getLogger(__name__)

HangUp = Callable[[], Awaitable[None]]


class Viewers:
    """The viewers of one session, each with the call that hangs it up."""

    def __init__(self, owner: str, spawn: Callable[[Coroutine[object, object, None], str], object]) -> None:
        self._owner = owner
        self._spawn = spawn  # the session's task spawner, for hang-ups that must not hold the clock
        self._viewers: dict[SessionOutput, HangUp] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._viewers)

    def add(self, viewer: SessionOutput, hang_up: HangUp) -> None:
        """Send every tick to ``viewer`` too, until removed or closed (then ``hang_up``); ``RuntimeError`` once closed."""
        if self._closed:
            raise RuntimeError(f"session {self._owner} is closed")
        self._viewers[viewer] = hang_up

    def remove(self, viewer: SessionOutput) -> None:
        """Stop sending ticks to ``viewer`` (a no-op when it is not one)."""
        self._viewers.pop(viewer, None)

    async def send_tick(self, tick: Tick) -> None:
        for viewer in tuple(self._viewers):
            try:
                await viewer.send_tick(tick.index, tick.audio, tick.frame)
            except Exception:  # a broken viewer loses its picture; the session's own clock goes on
                logger.exception("session %s: a viewer failed on tick %d and was hung up", self._owner, tick.index)
                hang_up = self._viewers.pop(viewer, None)
                if hang_up is not None:
                    self._spawn(hang_up(), "viewer hang-up")

    async def close(self) -> None:
        """Hang every viewer up; no viewer can be added afterwards."""
        self._closed = True
        hang_ups, self._viewers = list(self._viewers.values()), {}
        for hang_up in hang_ups:
            try:
                await hang_up()
            except Exception:  # one viewer failing to hang up must not keep the session open
                logger.exception("session %s: a viewer did not hang up cleanly", self._owner)
