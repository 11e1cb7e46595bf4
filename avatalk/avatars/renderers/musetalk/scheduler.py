"""One GPU worker for every MuseTalk session: frames batched across sessions, earliest deadline first.

Sessions submit frames (latents, audio features, a deadline) from their own
threads and get a ``Future``. The worker thread takes the frames with the
earliest deadlines, up to ``max_batch``, runs them as one batch and resolves
the futures. It is work-conserving: while frames are queued the GPU is never
idle, and frames that arrive while a batch runs form the next one. A batch
that is not full waits at most ``batch_window_s`` for more frames, and never
past the point where its earliest frame would miss its deadline.

When the GPU cannot keep up, frames that would finish after their deadline
are not run at all: their future resolves to ``None`` (the session shows the
idle frame) and the time goes to frames that can still be on time, so an
overload degrades every session a little instead of stalling them all.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from avatalk.avatars.renderers.musetalk.generator import FrameGenerator

logger = logging.getLogger(__name__)

#: Weight of the newest batch in the running estimate of batch durations.
_COST_SMOOTHING = 0.2


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

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0


class RenderScheduler:
    """Batches frames of all sessions onto one ``FrameGenerator`` in a worker thread."""

    def __init__(
        self,
        generator: FrameGenerator,
        *,
        max_batch: int,
        batch_window_s: float = 0.002,
        warmup: bool = False,
    ) -> None:
        """With ``warmup``, the worker first runs ``generator.warmup()`` (compilation) and this waits for it."""
        self.generator = generator
        self.max_batch = min(max_batch, generator.max_batch)
        self.batch_window_s = batch_window_s
        self.stats = SchedulerStats()
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
        ``time.monotonic()`` by which the face is needed. Cancelling the
        future before its batch starts takes the frame out.
        """
        future: Future[np.ndarray | None] = Future()
        with self._condition:
            if self._closed:  # shutting down: the session shows idle frames
                future.set_result(None)
                return future
            job = _Job(deadline, next(self._sequence), latents, features, future, time.monotonic())
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
        known = [s for s in self._cost if s >= size]
        if known:
            return self._cost[min(known)]
        largest = max(self._cost)
        return self._cost[largest] * size / largest

    def _loop(self, warmup: bool) -> None:
        try:
            if warmup:
                self.generator.warmup()
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

    def _take_batch(self) -> list[_Job] | None:
        """The next batch (possibly empty after dropping), or None once closed."""
        with self._condition:
            while not self._queue and not self._closed:
                self._condition.wait()
            if self._closed:
                return None
            # A lone frame waits briefly for frames of other sessions, unless that would make it late.
            while len(self._queue) < self.max_batch and not self._closed:
                now = time.monotonic()
                oldest = min(job.submitted for job in self._queue)
                slack = self._queue[0].deadline - self._estimate(len(self._queue) + 1) - now
                wait = min(oldest + self.batch_window_s - now, slack)
                if wait <= 0:
                    break
                self._condition.wait(wait)
            batch: list[_Job] = []
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch:
                job = heapq.heappop(self._queue)
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled by its session
                if job.deadline < now + self._estimate(len(batch) + 1):
                    self.stats.expired += 1
                    job.future.set_result(None)
                    continue
                batch.append(job)
            return batch

    def _run(self, batch: list[_Job]) -> None:
        generator = self.generator
        started = time.perf_counter()
        try:
            latents = torch.stack([job.latents for job in batch])
            features = torch.from_numpy(np.stack([job.features for job in batch]))
            features = features.to(generator.device, generator.dtype, non_blocking=True)
            faces = generator.generate(latents, features)
        except Exception as error:  # a failed batch must not kill the worker that every session shares
            logger.exception("MuseTalk batch of %d frames failed", len(batch))
            self.stats.failed += len(batch)
            for job in batch:
                job.future.set_exception(error)
            return
        elapsed = time.perf_counter() - started
        with self._condition:
            size = generator.bucket(len(batch))
            previous = self._cost.get(size)
            self._cost[size] = elapsed if previous is None else previous + _COST_SMOOTHING * (elapsed - previous)
            self.stats.batches += 1
            self.stats.frames += len(batch)
            self.stats.busy_s += elapsed
        for job, face in zip(batch, faces, strict=True):
            job.future.set_result(face)
