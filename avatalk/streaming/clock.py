"""The output timeline of one session (DESIGN §3).

Tick k covers [k*40 ms, (k+1)*40 ms) of output time and carries exactly that
slice of reply audio (or nothing when idle) and, once a renderer is attached,
video frame k. The clock releases ticks at real time from one monotonic start,
so everything a client receives is stamped by tick index and cannot drift.

Reply audio is queued per sentence and cut into tick-sized slices when it is
released; barge-in simply drops the queue, so the avatar goes silent at the
next tick.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

TICK_S = 0.040
FPS = 25


@dataclass(slots=True)
class Tick:
    """One 40 ms step of the session's output."""

    index: int
    audio: np.ndarray | None  # float32 slice at the clock's sample rate; None when idle
    turn_id: int | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)  # (segment id, samples of it in this tick)


@dataclass(slots=True)
class _Segment:
    segment_id: int
    turn_id: int
    samples: np.ndarray
    offset: int = 0


class MediaClock:
    """Releases one tick every 40 ms to a sink, taking reply audio from a bounded queue."""

    def __init__(self, sample_rate: int, max_queued_s: float = 60.0) -> None:
        if sample_rate % FPS:
            raise ValueError(f"output sample rate {sample_rate} is not a multiple of {FPS} Hz")
        self.sample_rate = sample_rate
        self.samples_per_tick = sample_rate // FPS
        self.max_queued_samples = int(max_queued_s * sample_rate)
        self._segments: deque[_Segment] = deque()
        self._queued_samples = 0
        self._space_freed = asyncio.Event()
        self._next_segment_id = 0
        self.index = 0
        self.started_at: float | None = None

    @property
    def queued_seconds(self) -> float:
        return self._queued_samples / self.sample_rate

    @property
    def busy(self) -> bool:
        """True while reply audio is waiting to be played."""
        return bool(self._segments)

    async def enqueue(self, turn_id: int, samples: np.ndarray) -> int:
        """Queue one segment of reply audio, waiting while the queue is full; returns its id."""
        while self._queued_samples and self._queued_samples + len(samples) > self.max_queued_samples:
            self._space_freed.clear()
            await self._space_freed.wait()
        segment_id = self._next_segment_id
        self._next_segment_id += 1
        self._segments.append(_Segment(segment_id, turn_id, samples.astype(np.float32, copy=False)))
        self._queued_samples += len(samples)
        return segment_id

    def clear(self, turn_id: int | None = None) -> int:
        """Drop queued audio (of one turn, or all); returns the number of samples dropped."""
        kept: deque[_Segment] = deque()
        dropped = 0
        for segment in self._segments:
            if turn_id is None or segment.turn_id == turn_id:
                dropped += len(segment.samples) - segment.offset
            else:
                kept.append(segment)
        self._segments = kept
        self._queued_samples -= dropped
        self._space_freed.set()
        return dropped

    def next_tick(self) -> Tick:
        """Take the next tick's audio off the queue (the run loop calls this every 40 ms)."""
        index = self.index
        self.index += 1
        if not self._segments:
            return Tick(index, None)
        out = np.zeros(self.samples_per_tick, dtype=np.float32)
        filled = 0
        turn_id = self._segments[0].turn_id
        spans: list[tuple[int, int]] = []
        # A tick holds audio of one turn; within it, sentences follow each other seamlessly.
        while filled < self.samples_per_tick and self._segments and self._segments[0].turn_id == turn_id:
            segment = self._segments[0]
            take = min(self.samples_per_tick - filled, len(segment.samples) - segment.offset)
            out[filled : filled + take] = segment.samples[segment.offset : segment.offset + take]
            segment.offset += take
            filled += take
            spans.append((segment.segment_id, take))
            if segment.offset >= len(segment.samples):
                self._segments.popleft()
        self._queued_samples -= filled
        self._space_freed.set()
        return Tick(index, out, turn_id, spans)

    async def run(self, sink: Callable[[Tick], Awaitable[None]]) -> None:
        """Release ticks at real time until cancelled.

        A slow sink or a stalled loop makes later ticks go out back to back
        (catching up) rather than being skipped, so audio stays continuous.
        """
        self.started_at = time.monotonic()
        while True:
            due = self.started_at + self.index * TICK_S
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                # More than a second behind (e.g. the machine was suspended): re-anchor.
                logger.warning("media clock %.2f s behind; re-anchoring", -delay)
                self.started_at = time.monotonic() - self.index * TICK_S
            await sink(self.next_tick())
