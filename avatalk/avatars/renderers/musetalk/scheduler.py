"""One GPU worker for every MuseTalk session: frames batched across sessions, earliest deadline first.

Sessions submit frames (latents, audio features, a deadline) from their own
threads and get a ``Future``. The worker thread runs the frames with the
earliest deadlines as one batch and resolves the futures. It is
work-conserving: while frames are queued the GPU is never idle, and frames
that arrive while a batch runs form the next one. A batch that is not full
waits at most ``batch_window_s`` for more frames, and never past the point
where its earliest frame would miss its deadline.

A larger batch makes more frames per second but takes longer, so it grows
only while it still finishes before the deadline of its first (earliest)
frame: the estimate of a batch of ``n + 1`` is checked against that deadline
before each frame is added, and the frames left out stay queued for the
next batch. This is what keeps the first frame of a reply on time while a
queue of look-ahead frames (due later) waits behind it. A batch cannot be
interrupted either, so a frame of a reply that starts while one runs must
wait for it: with ``urgent_s`` (the budget of the most urgent frame a session
submits, the renderer's frame budget) no batch is planned longer than
``urgent_s`` minus the time of a batch of one, so that frame still makes it.
The estimates are
running means of measured batch times; the warm-up (on a GPU) measures
every batch size before the first session, so even the first batch of each
size is planned with a real cost.

When the GPU cannot keep up, a frame that would be late even in a batch of
its own is not run: its future resolves to ``None`` (the session shows the
idle frame) and the time goes to frames that can still be on time, so an
overload degrades every session a little instead of stalling them all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Weight of the newest batch in the running estimate of batch durations.
_COST_SMOOTHING = 0.2


class BatchGenerator(Protocol):
    """What the scheduler runs: ``FrameGenerator``, or a stand-in with the same surface."""

    device: torch.device
    dtype: torch.dtype
    max_batch: int

    def bucket(self, size: int) -> int: ...

    def generate(self, latents: torch.Tensor, features: torch.Tensor) -> np.ndarray: ...

    def warmup(self, clock: Callable[[], float]) -> dict[int, float]: ...


@dataclass(order=True)
class _Job:
    deadline: float
    sequence: int
    latents: torch.Tensor = field(compare=False)
    features: np.ndarray = field(compare=False)
    future: Future[np.ndarray | None] = field(compare=False)
    submitted: float = field(compare=False)


@dataclass
class SchedulerStats:
    """What the worker has done since it started."""

    batches: int = 0
    frames: int = 0
    expired: int = 0  # frames dropped because they could not be ready by their deadline
    failed: int = 0  # frames whose batch raised
    busy_s: float = 0.0  # time spent running batches
    #: Batches that stopped growing because one more frame would have made their first frame late,
    #: or would have run too long for a reply's first frame submitted meanwhile (``urgent_s``).
    capped: int = 0

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class RenderScheduler:
    """Batches frames of all sessions onto one generator in a worker thread."""

    def __init__(
        self,
        generator: BatchGenerator,
        *,
        max_batch: int,
        batch_window_s: float = 0.002,
        warmup: bool = False,
        urgent_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """With ``warmup``, the worker first runs every batch size once (and this waits for it).

        ``urgent_s``: the shortest time between a frame's submission and its
        deadline (None: no such bound, batches are limited by ``max_batch``
        and the deadlines queued). ``clock`` is the time deadlines are given
        in (``time.monotonic``; tests pass their own).
        """
        self.generator = generator
        self.max_batch = min(max_batch, generator.max_batch)
        self.batch_window_s = batch_window_s
        self.urgent_s = urgent_s
        self.stats = SchedulerStats()
        self._clock = clock
        self._queue: list[_Job] = []
        self._sequence = itertools.count()
        self._cost: dict[int, float] = {}
        self._condition = threading.Condition()
        self._closed = False
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(warmup,), name="musetalk-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()

    def submit(self, latents: torch.Tensor, features: np.ndarray, deadline: float) -> Future[np.ndarray | None]:
        """Queue one frame; the future gives its 256 x 256 RGB face, or None if it could not be on time.

        ``latents`` is the frame's ``(8, 32, 32)`` tensor on the device,
        ``features`` its ``(T, D)`` float32 audio features, ``deadline`` the
        time (of ``clock``) by which the face is needed. Cancelling the
        future before its batch starts takes the frame out.
        """
        future: Future[np.ndarray | None] = Future()
        with self._condition:
            if self._closed:  # shutting down: the session shows idle frames
                future.set_result(None)
                return future
            job = _Job(deadline, next(self._sequence), latents, features, future, self._clock())
            heapq.heappush(self._queue, job)
            self._condition.notify()
        return future

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the worker; frames still queued resolve to None."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout_s)

    # --- the worker ----------------------------------------------------------------

    def _estimate(self, size: int) -> float:
        """Running estimate of how long a batch of ``size`` frames takes (0 before any has run)."""
        if not self._cost:
            return 0.0
        size = self.generator.bucket(size)
        known = [s for s in self._cost if s >= size]
        if known:
            return self._cost[min(known)]
        largest = max(self._cost)
        return self._cost[largest] * size / largest

    def _loop(self, warmup: bool) -> None:
        try:
            if warmup:
                costs = self.generator.warmup(self._clock)
                with self._condition:
                    self._cost.update(costs)
        finally:
            self._ready.set()
        while True:
            batch = self._take_batch()
            if batch is None:
                break
            if batch:
                self._run(batch)
        with self._condition:
            leftover, self._queue = self._queue, []
        for job in leftover:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(None)

    def _drop_hopeless(self, now: float) -> None:
        """Take cancelled frames, and frames that would be late even alone, off the front of the queue."""
        alone = self._estimate(1)
        while self._queue:
            job = self._queue[0]
            if job.future.cancelled():
                heapq.heappop(self._queue)
            elif job.deadline < now + alone:
                heapq.heappop(self._queue)
                if job.future.set_running_or_notify_cancel():
                    self.stats.expired += 1
                    job.future.set_result(None)
            else:
                return

    def _take_batch(self) -> list[_Job] | None:
        """The next batch (possibly empty after dropping), or None once closed."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            self._drop_hopeless(self._clock())
            # A batch that is not full waits briefly for frames of other sessions, unless that would make it late.
            while self._queue and len(self._queue) < self.max_batch and not self._closed:
                now = self._clock()
                oldest = min(job.submitted for job in self._queue)
                slack = self._queue[0].deadline - self._estimate(len(self._queue) + 1) - now
                wait = min(oldest + self.batch_window_s - now, slack)
                if wait <= 0:
                    break
                self._condition.wait(wait)
            now = self._clock()
            self._drop_hopeless(now)
            longest = float("inf") if self.urgent_s is None else self.urgent_s - self._estimate(1)
            batch: list[_Job] = []
            while self._queue and len(batch) < self.max_batch:
                job = self._queue[0]
                grown = self._estimate(len(batch) + 1)
                if batch and (batch[0].deadline < now + grown or grown > longest):
                    self.stats.capped += 1
                    break  # one more frame would make a first frame late: the rest waits for the next batch
                heapq.heappop(self._queue)
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
            return batch

    def _run(self, batch: list[_Job]) -> None:
        generator = self.generator
        started = self._clock()
        try:
            latents = torch.stack([job.latents for job in batch])
            features = torch.from_numpy(np.stack([job.features for job in batch]))
            features = features.to(generator.device, generator.dtype, non_blocking=True)
            faces = generator.generate(latents, features)
        except Exception as error:  # a failed batch must not kill the worker that every session shares
            logger.exception("MuseTalk batch of %d frames failed", len(batch))
            with self._condition:
                self.stats.failed += len(batch)
            for job in batch:
                job.future.set_exception(error)
            return
        elapsed = self._clock() - started
        with self._condition:
            size = generator.bucket(len(batch))
            previous = self._cost.get(size)
            self._cost[size] = elapsed if previous is None else previous + _COST_SMOOTHING * (elapsed - previous)
            self.stats.batches += 1
            self.stats.frames += len(batch)
            self.stats.busy_s += elapsed
        for job, face in zip(batch, faces, strict=True):
            job.future.set_result(face)
