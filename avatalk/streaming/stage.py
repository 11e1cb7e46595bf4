"""Plumbing every stage of a conversation shares: how events leave, the UI state, task lifetimes.

``SessionOutput`` is where a session's events and ticks go (a transport).
A stage emits typed events (``streaming.events``) through an ``Emit``
callable that the session provides; the session hands them to the transport,
which serialises each once. Stage tasks are owned by a ``TaskSet``: cancelled
together, and a failure is logged instead of vanishing with its task.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Protocol

import numpy as np

from avatalk.streaming.events import ServerEvent, State, StateChanged

logger = logging.getLogger(__name__)

Emit = Callable[[ServerEvent], Awaitable[None]]
"""Sends one event to the client (through metrics, in order with every other event of the session)."""


class SessionOutput(Protocol):
    """Where a session's events, audio and video go (WebSocket, WebRTC)."""

    async def send_event(self, event: ServerEvent) -> None: ...

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """One 40 ms tick: its reply audio (None when silent) and its frame (None without video)."""
        ...


class ConversationState:
    """The session's UI state (listening, thinking, speaking); an event only when it changes."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.current: State | None = None

    async def set(self, state: State) -> None:
        if state != self.current:
            self.current = state
            await self._emit(StateChanged(state=state))


async def cancel_and_wait(*tasks: asyncio.Task[object]) -> None:
    """Cancel ``tasks`` and wait until they have finished.

    Unlike ``suppress(CancelledError)`` around ``await task``, this never
    swallows the caller's own cancellation: ``asyncio.wait`` raises it when the
    caller is cancelled, and the tasks' outcomes are only inspected, not raised.
    """
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


class TaskSet:
    """The background tasks of one stage or session, named and labelled with the session's log context."""

    def __init__(self, owner: str, context: contextvars.Context | None = None) -> None:
        self.owner = owner
        self._context = context
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"{self.owner}:{name}", context=self._context)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: task %s failed", self.owner, task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        """Cancel every task and wait for them (except the caller's own, when it is one of them)."""
        current = asyncio.current_task()
        await cancel_and_wait(*(task for task in self._tasks if task is not current))
