"""The output timeline of one session (DESIGN §3).

Tick k covers [k*40 ms, (k+1)*40 ms) of output time and carries exactly that
slice of reply audio (or nothing when idle) and, once a renderer is attached,
video frame k. The clock releases ticks at real time from one monotonic start,
so everything a client receives is stamped by tick index and cannot drift.

Reply audio is queued per sentence and cut into tick-sized slices when it is
released; barge-in simply drops the queue, so the avatar goes silent at the
next tick. Each queued segment counts how much of it has been released, which
is how the responder knows what the user has heard. Each segment may carry a 16 kHz copy of its audio for the lip-sync
renderer; the tick then also carries exactly its 640 renderer samples.

With a ``prepare`` hook (the session's renderer) the clock takes tick k off
the queue ``lead_s`` early (one tick, or less once the video stage has
measured how long its frames take), lets the hook render its frame, and hands
audio and frame to the sink together at tick k's due time, so they leave as
one unit.

A talk spurt starts at once. When reply audio arrives while the clock is idle
(the last tick carried none), the next tick is taken at once instead of at
its slot and leaves as soon as its frame is drawn, which saves up to a tick
plus the lead (40 ms on average with a one-tick lead). The
timeline's phase then runs up to ``MAX_PULL_S`` ahead of its start and drifts
back by ``PHASE_RELAX_S`` per idle tick: over a session the clock still
releases exactly 25 ticks a second, so a receiver playing by timestamps
(WebRTC) sees one early packet per talk spurt and no accumulating skew, and
reply audio itself is never sped up or slowed down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from avatalk.media.timebase import SAMPLES_PER_TICK as RENDER_SAMPLES_PER_TICK
from avatalk.media.timebase import TICK_S, samples_per_tick

logger = logging.getLogger(__name__)

MAX_PULL_S = 2 * TICK_S  # furthest the timeline may run ahead of its start after talk spurts
PHASE_RELAX_S = 0.008  # an idle tick goes out this much later while the timeline is ahead (a fifth of a tick)


@dataclass(slots=True)
class Tick:
    """One 40 ms step of the session's output."""

    index: int
    audio: np.ndarray | None  # float32 slice at the clock's sample rate; None when idle
    turn_id: int | None = None
    render_audio: np.ndarray | None = None  # the same 40 ms at 16 kHz, for the renderer
    frame: np.ndarray | None = None  # RGB frame, filled by the prepare hook


@dataclass(slots=True, eq=False)
class QueuedAudio:
    """One segment of reply audio in the clock's queue; ``offset`` samples of it have been released."""

    turn_id: int
    samples: np.ndarray
    render_samples: np.ndarray | None = None
    offset: int = 0
    #: More of the utterance the previous segment began (audio streamed in pieces), not a new sentence.
    continues: bool = False

    @property
    def released(self) -> int:
        """Samples taken off the queue into ticks: they reach the client whatever happens next."""
        return self.offset


class MediaClock:
    """Releases one tick every 40 ms to a sink, taking reply audio from a bounded queue."""

    def __init__(self, sample_rate: int, max_queued_s: float = 60.0, lead_s: float = TICK_S) -> None:
        self.sample_rate = sample_rate
        self.samples_per_tick = samples_per_tick(sample_rate)
        self.max_queued_samples = int(max_queued_s * sample_rate)
        self._segments: deque[QueuedAudio] = deque()
        self._queued_samples = 0
        self._space_freed = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.index = 0
        self.lead_s = lead_s  # the video stage lowers it for a fast renderer
        self.started_at: float | None = None
        self.phase_s = 0.0  # <= 0: how far ahead of ``started_at + k * TICK_S`` ticks are due (talk spurts)
        self._audio_arrived = asyncio.Event()
        self._last_tick_idle = True

    @property
    def queued_seconds(self) -> float:
        """Reply audio waiting to be played (a render session's client is told when it sends too far ahead)."""
        return self._queued_samples / self.sample_rate

    @property
    def busy(self) -> bool:
        """True while reply audio is waiting to be played."""
        return bool(self._segments)

    async def wait_idle(self) -> None:
        """Return once no reply audio is queued (everything queued has been released)."""
        await self._idle.wait()

    async def enqueue(
        self, turn_id: int, samples: np.ndarray, render_samples: np.ndarray | None = None, *, continues: bool = False
    ) -> QueuedAudio:
        """Queue one segment of reply audio, waiting while the queue is full; returns it.

        ``render_samples`` is the same audio at 16 kHz, for the renderer.
        ``continues``: this is the next piece of the utterance the previous
        segment began (streamed audio), not a new sentence of its own.
        """
        while self._queued_samples and self._queued_samples + len(samples) > self.max_queued_samples:
            self._space_freed.clear()
            await self._space_freed.wait()
        segment = QueuedAudio(turn_id, samples.astype(np.float32, copy=False), render_samples, continues=continues)
        self._segments.append(segment)
        self._queued_samples += len(samples)
        self._idle.clear()
        self._audio_arrived.set()
        return segment

    def clear(self, turn_id: int | None = None) -> int:
        """Drop queued audio (of one turn, or all); returns the number of samples dropped."""
        kept: deque[QueuedAudio] = deque()
        dropped = 0
        for segment in self._segments:
            if turn_id is None or segment.turn_id == turn_id:
                dropped += len(segment.samples) - segment.offset
            else:
                kept.append(segment)
        self._segments = kept
        self._queued_samples -= dropped
        self._space_freed.set()
        if not kept:
            self._idle.set()
        return dropped

    def next_tick(self) -> Tick:
        """Take the next tick's audio off the queue (the run loop calls this every 40 ms)."""
        index = self.index
        self.index += 1
        if not self._segments:
            return Tick(index, None)
        out = np.zeros(self.samples_per_tick, dtype=np.float32)
        render_out = np.zeros(RENDER_SAMPLES_PER_TICK, dtype=np.float32)
        filled = 0
        turn_id = self._segments[0].turn_id
        # A tick holds audio of one turn; within it, sentences follow each other seamlessly.
        while filled < self.samples_per_tick and self._segments and self._segments[0].turn_id == turn_id:
            segment = self._segments[0]
            take = min(self.samples_per_tick - filled, len(segment.samples) - segment.offset)
            out[filled : filled + take] = segment.samples[segment.offset : segment.offset + take]
            if segment.render_samples is not None:
                # Same span of time in the 16 kHz copy (lengths may differ by rounding).
                scale = len(segment.render_samples) / len(segment.samples)
                start, end = round(segment.offset * scale), round((segment.offset + take) * scale)
                piece = segment.render_samples[start:end]
                at = round(filled * RENDER_SAMPLES_PER_TICK / self.samples_per_tick)
                piece = piece[: RENDER_SAMPLES_PER_TICK - at]
                render_out[at : at + len(piece)] = piece
            segment.offset += take
            filled += take
            if segment.offset >= len(segment.samples):
                self._segments.popleft()
        self._queued_samples -= filled
        self._space_freed.set()
        if not self._segments:
            self._idle.set()
        return Tick(index, out, turn_id, render_out)

    def queued_render_audio(self) -> list[tuple[int, np.ndarray, bool]]:
        """Each queued segment of the current turn that has 16 kHz audio: ``(start, audio, continues)``, not consumed.

        ``start`` is the 16 kHz sample of the output timeline where the
        segment's first sample plays (tick k starts at ``k * 640``; the
        first segment may have started already), placed exactly as
        ``next_tick`` will place it; ``audio`` is all of it; ``continues``
        as enqueued. Lets a renderer whose frames depend on a whole
        utterance (MuseTalk's Whisper features of each TTS segment) prepare
        them before they play.
        """
        out: list[tuple[int, np.ndarray, bool]] = []
        if not self._segments:
            return out
        turn_id = self._segments[0].turn_id
        # A segment still queued after a tick was taken filled that tick to its end, so the
        # head began `offset` samples before the next tick; the others follow it seamlessly.
        position = self.index * self.samples_per_tick - self._segments[0].offset
        for segment in self._segments:
            if segment.turn_id != turn_id:
                break
            if segment.render_samples is not None:
                tick, within = divmod(position, self.samples_per_tick)
                at = round(within * RENDER_SAMPLES_PER_TICK / self.samples_per_tick)
                out.append((tick * RENDER_SAMPLES_PER_TICK + at, segment.render_samples, segment.continues))
            position += len(segment.samples)
        return out

    async def run(
        self,
        sink: Callable[[Tick], Awaitable[None]],
        prepare: Callable[[Tick], Awaitable[None]] | None = None,
    ) -> None:
        """Release ticks at real time until cancelled.

        ``prepare`` (e.g. rendering the frame) runs up to ``lead_s`` before a
        tick is due. A slow hook or a stalled loop makes later ticks go out
        back to back (catching up) rather than being skipped, so audio stays
        continuous. Reply audio arriving while idle is taken at once (see the
        module docstring).
        """
        self.started_at = time.monotonic()
        while True:
            lead = self.lead_s if prepare is not None else 0.0
            due = self.started_at + self.index * TICK_S + self.phase_s
            delay = due - lead - time.monotonic()
            if delay > 0:
                if self._last_tick_idle and not self._segments:
                    await self._sleep_unless_audio(delay)
                    if not self._segments:
                        continue
                if self._last_tick_idle:  # audio arrived while waiting, or while the last tick went out
                    self._start_talk_spurt(due)
                    delay = self.started_at + self.index * TICK_S + self.phase_s - lead - time.monotonic()
                if delay > 0:  # not idle, or the timeline is already as far ahead as it may run
                    await asyncio.sleep(delay)
                continue
            if delay < -1.0:
                # More than a second behind (e.g. the machine was suspended): re-anchor.
                logger.warning("media clock %.2f s behind; re-anchoring", -delay)
                self.started_at = time.monotonic() - self.index * TICK_S + lead
                self.phase_s = 0.0
                due = self.started_at + self.index * TICK_S
            tick = self.next_tick()
            self._last_tick_idle = tick.audio is None
            if self._last_tick_idle and self.phase_s < 0:
                self.phase_s = min(0.0, self.phase_s + PHASE_RELAX_S)
            if prepare is not None:
                await prepare(tick)
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await sink(tick)

    async def _sleep_unless_audio(self, delay: float) -> None:
        """Wait ``delay`` or until ``enqueue`` queues audio (called with nothing queued)."""
        self._audio_arrived.clear()
        try:
            async with asyncio.timeout(delay):
                await self._audio_arrived.wait()
        except TimeoutError:
            pass

    def _start_talk_spurt(self, due: float) -> None:
        """Audio arrived while idle: move the timeline so the next tick is due now (within ``MAX_PULL_S``).

        The tick is then taken at once and goes out as soon as its frame is
        drawn: with nothing playing before it, no lead is needed to keep its
        audio seamless, and the ticks after it keep their lead.
        """
        pull = min(due - time.monotonic(), MAX_PULL_S + self.phase_s)
        if pull > 0:
            self.phase_s -= pull
