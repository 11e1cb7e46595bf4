"""The video stage: one frame per tick from the session's renderer, never late.

The clock takes tick k off its queue one tick early and hands it here
(``prepare``); the frame is drawn on the ``render`` executor and put on the
tick. A renderer that falls behind never stalls the clock: when the frame is
not ready within ``RENDER_BUDGET_S``, the avatar's idle frame (a lookup, on
the event loop, touching no pool) goes out instead, audio continues, the late
frame is counted, and no new render starts until the slow one has finished.

How early the clock takes a tick (its lead) follows the renderer: the
slowest of the last ``LEAD_WINDOW`` speaking frames (queueing for the pool
included) plus ``LEAD_MARGIN_S``, between ``MIN_LEAD_S`` and a tick. The
classic renderer draws a frame in about a millisecond, so its ticks leave
~30 ms sooner than with a fixed one-tick lead. A look-ahead renderer
(MuseTalk) keeps the full tick: its GPU scheduler plans batches against it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import Executor

import numpy as np

from avatalk.avatars.renderers.base import RendererFallback, RendererSession, SpeechSegment
from avatalk.executors import run_in
from avatalk.media.timebase import TICK_S
from avatalk.streaming.clock import MediaClock, Tick
from avatalk.streaming.events import WarningEvent
from avatalk.streaming.stage import Emit

logger = logging.getLogger(__name__)

RENDER_BUDGET_S = 0.060  # a frame later than this (the longest lead, 40 ms, + slack) is replaced by an idle frame
LATE_WARNING_EVERY_S = 5.0
LEAD_WINDOW = 50  # speaking frames (2 s) whose draw times set the clock's lead
LEAD_MIN_FRAMES = 5  # the lead stays one tick until this many frames were measured
LEAD_MARGIN_S = 0.005
MIN_LEAD_S = 0.006


class VideoStage:
    """A renderer session driven tick by tick, with look-ahead and idle fallback."""

    def __init__(self, renderer: RendererSession, clock: MediaClock, executor: Executor, emit: Emit) -> None:
        self.renderer = renderer
        self._clock = clock
        self._executor = executor
        self._emit = emit
        self._job: asyncio.Future[np.ndarray] | None = None
        self._reset_pending = False
        self.late_frames = 0
        self._late_warned_at = float("-inf")
        self._draw_seconds: deque[float] = deque(maxlen=LEAD_WINDOW)

    def reset(self) -> None:
        """Barge-in: the mouth closes and the renderer forgets its audio before the next speaking frame."""
        self._reset_pending = True

    async def prepare(self, tick: Tick) -> None:
        """The clock's prepare hook: put this tick's frame on it."""
        fallback = self.renderer.take_fallback()
        if fallback is not None:
            await self._fell_back(fallback)
        if self._job is not None and not self._job.done():
            await self._late(tick)
            return
        speaking = tick.audio is not None and tick.render_audio is not None
        if not speaking and not self._reset_pending:
            tick.frame = self.renderer.idle_frame(tick.index)
            return
        upcoming = None
        if speaking and self.renderer.uses_look_ahead:
            upcoming = [SpeechSegment(*queued) for queued in self._clock.queued_render_audio()]
        reset, self._reset_pending = self._reset_pending, False
        self._job = asyncio.ensure_future(run_in(self._executor, self._draw, tick, speaking, reset, upcoming))
        if speaking and not self.renderer.uses_look_ahead:
            submitted = time.monotonic()
            self._job.add_done_callback(lambda _job: self._note_draw(time.monotonic() - submitted))
        done, _ = await asyncio.wait({self._job}, timeout=RENDER_BUDGET_S)
        if done:
            tick.frame = self._job.result()
        else:
            await self._late(tick)

    def _draw(self, tick: Tick, speaking: bool, reset: bool, upcoming: list[SpeechSegment] | None) -> np.ndarray:
        """Blocking: runs on the render executor, one call at a time per session."""
        renderer = self.renderer
        if reset:
            renderer.reset()
        if not speaking or tick.render_audio is None:
            return renderer.idle_frame(tick.index)
        if upcoming is not None:
            renderer.look_ahead(tick.index, upcoming)
        return renderer.render(tick.index, tick.render_audio)

    def _note_draw(self, seconds: float) -> None:
        """A speaking frame took ``seconds`` from submission to result: the clock's lead follows."""
        self._draw_seconds.append(seconds)
        if len(self._draw_seconds) >= LEAD_MIN_FRAMES:
            self._clock.lead_s = min(TICK_S, max(MIN_LEAD_S, max(self._draw_seconds) + LEAD_MARGIN_S))

    async def _late(self, tick: Tick) -> None:
        tick.frame = self.renderer.idle_frame(tick.index)
        self.late_frames += 1
        now = time.monotonic()
        if now - self._late_warned_at >= LATE_WARNING_EVERY_S:
            self._late_warned_at = now
            logger.warning("renderer behind at tick %d (%d late frames)", tick.index, self.late_frames)
            await self._emit(
                WarningEvent(
                    code="renderer_behind",
                    message="the renderer is behind; showing idle frames",
                    late_frames=self.late_frames,
                )
            )

    async def _fell_back(self, fallback: RendererFallback) -> None:
        """The renderer session switched to the fallback renderer: say so, with the reason."""
        logger.warning("frames drawn by the fallback renderer (%s): %s", fallback.reason, fallback.message)
        await self._emit(
            WarningEvent(
                code="renderer_fallback",
                message=f"lip sync falls back to the classic renderer: {fallback.message}",
                reason=fallback.reason,
            )
        )

    async def close(self) -> None:
        """Wait for a render in flight (it cannot be stopped mid-frame), then release the renderer session."""
        if self._job is not None and not self._job.done():
            await asyncio.wait({self._job})
        self.renderer.close()
