"""Runs queued jobs on worker threads, with progress, cancellation and a bounded queue.

Job work is blocking (video decoding, face analysis, rendering), so each job
runs on the runner's own thread pool, never on the event loop or asyncio's
default pool; every store call of a job is made in its worker thread too.
The runner is generic: a handler per job kind does the work.

Workers take their jobs from the store (``JobStore.claim``), not from a
queue in memory: with a store shared by several nodes, a job queued through
any node is run by whichever node has a worker free, and a node that stops
or dies takes no queued job with it. A submit wakes this node's idle workers
at once; jobs queued through other nodes, cancellations asked on other nodes
and jobs of dead nodes are looked for every ``poll_s``.
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

from avatalk.jobs.files import input_present, remove_job_files
from avatalk.jobs.model import (
    CANCELLED_MESSAGE,
    INPUT_NOT_SHARED_MESSAGE,
    SHUTDOWN_MESSAGE,
    Job,
    JobFailed,
    JobState,
    QueueFull,
)
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
    """Runs the store's queued jobs, oldest first, on a pool of ``workers`` threads, off the event loop.

    At most ``max_queued`` jobs may wait in the store (``QueueFull`` past
    that; with a shared store, the deployment's whole queue), so a burst of
    uploads cannot pile up unbounded work and disk use. Handlers are chosen
    by the job's kind; only kinds this runner has a handler for are taken.
    ``node`` names this process in logs and messages. ``start`` and ``stop``
    belong in the app's lifespan; all other methods are called from the
    event loop.
    """

    def __init__(
        self,
        store: JobStore,
        handlers: Mapping[str, JobHandler],
        *,
        workers: int = 1,
        max_queued: int = 32,
        progress_interval_s: float = 0.5,
        poll_s: float = 1.0,
        node: str = "this node",
    ) -> None:
        if workers < 1 or max_queued < 1:
            raise ValueError("workers and max_queued must be at least 1")
        if poll_s <= 0:
            raise ValueError("poll_s must be positive")
        self.store = store
        self.workers = workers
        self.max_queued = max_queued
        self.node = node
        self._handlers = dict(handlers)
        self._progress_interval_s = progress_interval_s
        self._poll_s = poll_s
        self._entries: dict[str, _Entry] = {}  # jobs running in this process
        self._cancel_asked: set[str] = set()  # cancelled here before this process's worker registered them
        self._work_queued = asyncio.Event()  # a submit here: idle workers look at once
        self._ended = asyncio.Event()  # a job of this process ended: waiters look again
        self._reserved = 0  # submissions between the size check and the insert
        self._tasks: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._taking = True

    def stop_taking(self) -> None:
        """Take no more jobs from the queue (a node draining before it stops); running ones go on.

        Other nodes take the queued jobs meanwhile; ``stop`` then puts what is
        still running back in the queue.
        """
        self._taking = False
        self._work_queued.set()

    async def start(self) -> None:
        """Start the workers (they take the jobs already queued, oldest first)."""
        if self._executor is not None:
            raise RuntimeError("the job runner was already started")
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="avatalk-job")
        if not self.store.shared:  # on one node nobody else could run them: say so instead of keeping them queued
            for job in await asyncio.to_thread(self.store.list, limit=None, states=[JobState.QUEUED]):
                if job.kind not in self._handlers:
                    message = f"this server cannot run {job.kind!r} jobs"
                    await asyncio.to_thread(self.store.finish, job.id, JobState.FAILED, message)
        pending = await asyncio.to_thread(self.store.count, [JobState.QUEUED])
        if pending:
            logger.info("%d queued job(s) waiting", pending)
        self._tasks = [asyncio.create_task(self._work(), name=f"avatalk-job-worker-{i}") for i in range(self.workers)]
        if self.store.shared:
            self._watch = asyncio.create_task(self._watch_others(), name="avatalk-job-watch")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop: running jobs are cancelled and put back in the queue, queued jobs stay queued.

        Both run again at the next ``start`` (or on another node). Waits up to
        ``timeout_s`` for the worker threads to notice the cancellation.
        """
        if self._executor is None or self._stopping:
            return
        self._stopping = True
        for entry in self._entries.values():
            entry.cancel.set()
        self._work_queued.set()
        if self._watch is not None:
            self._watch.cancel()
        _, pending = await asyncio.wait(self._tasks, timeout=timeout_s) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("job workers did not stop within %.0f s; leaving them to finish", timeout_s)
        self._executor.shutdown(wait=False, cancel_futures=True)

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
        self._reserved += 1
        try:
            queued = await asyncio.to_thread(self.store.count, [JobState.QUEUED])
            if queued + self._reserved > self.max_queued:
                raise QueueFull(f"too many queued jobs ({self.max_queued} are waiting); try again later")
            job = await asyncio.to_thread(
                self.store.create, kind, avatar_id=avatar_id, params=params, exclusive=exclusive
            )
        finally:
            self._reserved -= 1
        self._work_queued.set()
        logger.info("queued %s job %s%s", kind, job.id, f" for avatar {avatar_id}" if avatar_id else "")
        return job

    async def cancel(self, job_id: str, timeout_s: float = 30.0) -> Job:
        """Cancel a job and return it as it ends up.

        A queued job is cancelled at once; a running one is asked to stop (on
        whichever node runs it) and awaited (up to ``timeout_s``). A job that
        already ended is returned unchanged, and one that finishes before it
        notices the request keeps its result. Raises ``JobNotFound``.
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
        if entry is None:
            # Running on another node, or taken by a worker here that has not registered it yet.
            self._cancel_asked.add(job_id)
            await asyncio.to_thread(self.store.request_cancel, job_id)
        return await self.wait(job_id, timeout_s)

    async def wait(self, job_id: str, timeout_s: float | None = None) -> Job:
        """The job once it has ended (or as it is when ``timeout_s`` runs out); raises ``JobNotFound``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            self._ended.clear()
            job = await asyncio.to_thread(self.store.get, job_id)
            remaining = None if deadline is None else deadline - loop.time()
            if not job.active or (remaining is not None and remaining <= 0):
                return job
            # A job of this process wakes us when it ends; another node's is looked at every poll.
            pause = self._poll_s if remaining is None else min(self._poll_s, remaining)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ended.wait(), pause)

    async def _work(self) -> None:
        """One worker: take the oldest queued job, run it, repeat; idle until a submit or the next poll."""
        loop = asyncio.get_running_loop()
        kinds = tuple(self._handlers)
        while not self._stopping:
            self._work_queued.clear()
            if not self._taking:
                await self._work_queued.wait()  # until stop
                continue
            try:
                job = await loop.run_in_executor(self._executor, self.store.claim, kinds)
            except Exception:  # the database is away for a moment: try again at the next poll
                logger.exception("could not look for queued jobs")
                job = None
            if job is None:
                if not self._work_queued.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._work_queued.wait(), self._poll_s)
                continue
            if self._stopping:  # taken while stopping: back to the queue, untouched
                await loop.run_in_executor(self._executor, self.store.requeue, job.id, SHUTDOWN_MESSAGE)
                return
            entry = _Entry(job.id)
            self._entries[job.id] = entry
            if job.id in self._cancel_asked:
                entry.by_user = True
                entry.cancel.set()
            try:
                await loop.run_in_executor(self._executor, self._run, entry, job)
            except Exception:  # _run handles job errors itself; this is a bug in the runner
                logger.exception("job %s: the runner failed", job.id)
            finally:
                entry.done.set()
                self._entries.pop(job.id, None)
                self._cancel_asked.discard(job.id)
                self._ended.set()

    async def _watch_others(self) -> None:
        """A shared store: every ``poll_s``, cancellations asked on other nodes and jobs of dead nodes."""
        while not self._stopping:
            await asyncio.sleep(self._poll_s)
            try:
                running = list(self._entries)
                for job_id in await asyncio.to_thread(self.store.cancel_requested, running):
                    entry = self._entries.get(job_id)
                    if entry is not None and not entry.cancel.is_set():
                        logger.info("job %s: cancel asked on another node", job_id)
                        entry.by_user = True
                        entry.cancel.set()
                settled = await asyncio.to_thread(self.store.settle_orphans)
                if settled:
                    self._ended.set()
            except Exception:  # the database is away for a moment: the next poll tries again
                logger.exception("could not check the jobs of the other nodes")

    def _run(self, entry: _Entry, job: Job) -> None:
        """One taken job, start to end, in a worker thread (every store call is made here too)."""
        logger.info("running %s job %s on %s", job.kind, job.id, self.node)
        context = JobContext(job, entry.cancel, self.store, self._progress_interval_s)
        try:
            handler = self._handlers.get(job.kind)
            if handler is None:  # e.g. queued by a newer version of the server
                raise JobFailed(f"this server cannot run {job.kind!r} jobs")
            if entry.cancel.is_set():
                raise JobFailed(CANCELLED_MESSAGE)
            if not input_present(job.params):
                raise JobFailed(INPUT_NOT_SHARED_MESSAGE.format(node=self.node))
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
