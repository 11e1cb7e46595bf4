"""Runs queued jobs on worker threads, with progress, cancellation and a bounded queue.

Job work is blocking (video decoding, face analysis, rendering), so each job
runs on the runner's own thread pool, never on the event loop or asyncio's
default pool; every store call of a job is made in its worker thread too.
The runner is generic: a handler per job kind does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from avatalk.jobs.files import remove_job_files
from avatalk.jobs.model import CANCELLED_MESSAGE, SHUTDOWN_MESSAGE, Job, JobFailed, JobState, QueueFull
from avatalk.jobs.store import JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """What a handler returns on success: a message for the user and the job's ``result``."""

    message: str
    result: dict[str, Any] = field(default_factory=dict)


class JobContext:
    """What a handler gets in its worker thread: the job, the cancel event, a progress reporter."""

    def __init__(self, job: Job, cancel: threading.Event, store: JobStore, interval_s: float) -> None:
        self.job = job
        self.cancel = cancel
        self._store = store
        self._interval_s = interval_s
        self._last_time = float("-inf")
        self._last: tuple[str, float] | None = None

    def progress(self, stage: str, fraction: float) -> None:
        """Report the overall progress (0..1) and the current stage.

        Written to the store at once when the stage changes, otherwise at
        most once per ``interval_s`` and only after a change of 1 %, so a
        fast loop reporting every frame costs a few writes a second.
        """
        now = time.monotonic()
        last = self._last
        if last is not None and stage == last[0]:
            if now - self._last_time < self._interval_s or abs(fraction - last[1]) < 0.01:
                return
        self._last = (stage, fraction)
        self._last_time = now
        self._store.set_progress(self.job.id, stage, fraction)


#: Runs one job in a worker thread. Returns its outcome; raises ``JobFailed``
#: with a message for the user. It should return soon after ``context.cancel`` is set.
JobHandler = Callable[[JobContext], JobOutcome]


@dataclass(eq=False)
class _Entry:
    job_id: str
    cancel: threading.Event = field(default_factory=threading.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    by_user: bool = False  # cancel was asked for by a user, not by shutdown


class JobRunner:
    """Runs queued jobs in order on a pool of ``workers`` threads, off the event loop.

    At most ``max_queued`` jobs may wait (``QueueFull`` past that), so a
    burst of uploads cannot pile up unbounded work and disk use. Handlers are
    chosen by the job's kind. ``start`` and ``stop`` belong in the app's
    lifespan; all other methods are called from the event loop.
    """

    def __init__(
        self,
        store: JobStore,
        handlers: Mapping[str, JobHandler],
        *,
        workers: int = 1,
        max_queued: int = 32,
        progress_interval_s: float = 0.5,
    ) -> None:
        if workers < 1 or max_queued < 1:
            raise ValueError("workers and max_queued must be at least 1")
        self.store = store
        self.workers = workers
        self.max_queued = max_queued
        self._handlers = dict(handlers)
        self._progress_interval_s = progress_interval_s
        self._queue: asyncio.Queue[_Entry] = asyncio.Queue()
        self._entries: dict[str, _Entry] = {}
        self._reserved = 0  # submissions between the size check and the queue
        self._tasks: list[asyncio.Task[None]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False

    async def start(self) -> None:
        """Start the workers and queue the jobs a previous process left queued, oldest first."""
        if self._executor is not None:
            raise RuntimeError("the job runner was already started")
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="avatalk-job")
        pending = await asyncio.to_thread(self.store.list, limit=None, states=[JobState.QUEUED], oldest_first=True)
        for job in pending:
            self._enqueue(job.id)
        if pending:
            logger.info("resuming %d queued job(s)", len(pending))
        self._tasks = [asyncio.create_task(self._work(), name=f"avatalk-job-worker-{i}") for i in range(self.workers)]

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop: running jobs are cancelled and put back in the queue, queued jobs stay queued.

        Both run again at the next ``start``. Waits up to ``timeout_s`` for the
        worker threads to notice the cancellation.
        """
        if self._executor is None or self._stopping:
            return
        self._stopping = True
        for entry in self._entries.values():
            entry.cancel.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        executor = self._executor
        try:
            await asyncio.wait_for(asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True), timeout_s)
        except TimeoutError:
            logger.warning("job workers did not stop within %.0f s; leaving them to finish", timeout_s)

    async def submit(
        self,
        kind: str,
        *,
        avatar_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Job:
        """Create a job and queue it. Raises ``QueueFull``, ``JobConflict`` (``exclusive``, see
        ``JobStore.create``), or ``RuntimeError`` when the runner is not running."""
        if self._executor is None or self._stopping:
            raise RuntimeError("the job runner is not running")
        if kind not in self._handlers:
            raise ValueError(f"no handler for jobs of kind {kind!r}")
        if self._queue.qsize() + self._reserved >= self.max_queued:
            raise QueueFull(f"too many queued jobs ({self.max_queued} are waiting); try again later")
        self._reserved += 1
        try:
            job = await asyncio.to_thread(
                self.store.create, kind, avatar_id=avatar_id, params=params, exclusive=exclusive
            )
        finally:
            self._reserved -= 1
        self._enqueue(job.id)
        logger.info("queued %s job %s%s", kind, job.id, f" for avatar {avatar_id}" if avatar_id else "")
        return job

    async def cancel(self, job_id: str, timeout_s: float = 30.0) -> Job:
        """Cancel a job and return it as it ends up.

        A queued job is cancelled at once; a running one is asked to stop and
        awaited (up to ``timeout_s``). A job that already ended is returned
        unchanged, and one that finishes before it notices the request keeps
        its result. Raises ``JobNotFound``.
        """
        entry = self._entries.get(job_id)
        if entry is not None:
            entry.by_user = True
            entry.cancel.set()
        cancelled = await asyncio.to_thread(
            self.store.finish, job_id, JobState.CANCELLED, CANCELLED_MESSAGE, from_states=[JobState.QUEUED]
        )
        if cancelled is not None:
            await asyncio.to_thread(remove_job_files, cancelled)
            logger.info("cancelled queued job %s", job_id)
            return cancelled
        if entry is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.done.wait(), timeout_s)
        return await asyncio.to_thread(self.store.get, job_id)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """The job once it has ended (or as it is when ``timeout_s`` runs out)."""
        entry = self._entries.get(job_id)
        if entry is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.done.wait(), timeout_s)
        return await asyncio.to_thread(self.store.get, job_id)

    def _enqueue(self, job_id: str) -> None:
        entry = _Entry(job_id)
        self._entries[job_id] = entry
        self._queue.put_nowait(entry)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            entry = await self._queue.get()
            try:
                await loop.run_in_executor(self._executor, self._run, entry)
            except Exception:  # _run handles job errors itself; this is a bug in the runner
                logger.exception("job %s: the runner failed", entry.job_id)
            finally:
                entry.done.set()
                self._entries.pop(entry.job_id, None)

    def _run(self, entry: _Entry) -> None:
        """One job, start to end, in a worker thread (every store call is made here too)."""
        job = self.store.start(entry.job_id)
        if job is None:  # cancelled while it waited
            remove_job_files(self.store.get(entry.job_id))
            return
        logger.info("running %s job %s", job.kind, job.id)
        context = JobContext(job, entry.cancel, self.store, self._progress_interval_s)
        try:
            handler = self._handlers.get(job.kind)
            if handler is None:  # e.g. queued by a newer version of the server
                raise JobFailed(f"this server cannot run {job.kind!r} jobs")
            if entry.cancel.is_set():
                raise JobFailed(CANCELLED_MESSAGE)
            outcome = handler(context)
        except Exception as error:
            if entry.cancel.is_set() and not entry.by_user:
                self.store.requeue(job.id, SHUTDOWN_MESSAGE)
                logger.info("job %s interrupted by shutdown; it stays queued", job.id)
                return  # its input is kept for the next start
            if entry.cancel.is_set():
                self.store.finish(job.id, JobState.CANCELLED, CANCELLED_MESSAGE)
                logger.info("job %s cancelled", job.id)
            elif isinstance(error, JobFailed):
                self.store.finish(job.id, JobState.FAILED, str(error))
                logger.info("job %s failed: %s", job.id, error)
            else:
                logger.exception("job %s failed unexpectedly", job.id)
                self.store.finish(
                    job.id,
                    JobState.FAILED,
                    f"the job failed unexpectedly ({type(error).__name__}); the server log has the details",
                )
        else:
            self.store.finish(job.id, JobState.SUCCEEDED, outcome.message, result=outcome.result)
            logger.info("job %s succeeded: %s", job.id, outcome.message)
        remove_job_files(job)
