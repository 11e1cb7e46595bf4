"""Background jobs with progress, persisted in SQLite: avatar preparation now, renders later.

Preparing an avatar takes seconds to minutes, far longer than an HTTP
request should stay open, so the REST API queues a job and answers at once;
clients poll the job. DESIGN.md section 4 asks that "a restart loses
nothing", hence the jobs live in SQLite (``<data_dir>/jobs.sqlite3``) in WAL
mode, which lets status reads proceed while a worker writes progress.

A job has a free-form ``kind`` and JSON ``params``/``result`` columns, so
other kinds of work (renders) reuse the same table and runner; the runner
understands two params keys: ``input`` (a file the job reads; a queued job
whose input is gone cannot run) and ``cleanup`` (a file or folder the runner
removes when the job has ended, such as an uploaded temporary file).

What happens to unfinished jobs when the store is opened by a new process:

- ``running``: the previous process died during the job (crash, kill -9,
  power loss). The job is marked ``failed`` ("interrupted by a server
  restart; submit it again") rather than run again, because the job itself
  may have killed the process (a huge video exhausting memory, a decoder
  crash); re-running it automatically could take the server down at every
  start.
- ``queued``: it never started, so nothing about it is suspect. It stays
  queued when its input is still on disk, and ``JobRunner.start`` queues it
  again in creation order; without its input it is marked ``failed``.

A clean shutdown (``JobRunner.stop``) cancels running jobs and puts them back
to ``queued``: they were interrupted on purpose, so they run again from the
start after the restart.

One server process is assumed per data folder: a second process opening the
same store would take the first one's running jobs for interrupted ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from avatalk.avatars.prepare import AvatarPreparationError, ProgressCallback, prepare_avatar
from avatalk.avatars.store import AvatarManifest, InvalidAvatarId
from avatalk.config import Settings

log = logging.getLogger(__name__)

#: The kind of job that prepares an avatar.
AVATAR_JOB = "avatar"

RESTART_MESSAGE = "interrupted by a server restart; submit it again"
SHUTDOWN_MESSAGE = "interrupted by a server shutdown; it runs again when the server starts"
MISSING_INPUT_MESSAGE = "its input file is gone after a server restart; submit it again"
CANCELLED_MESSAGE = "cancelled"

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage       TEXT,
    progress    REAL NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    message     TEXT,
    avatar_id   TEXT,
    params      TEXT NOT NULL DEFAULT '{}',
    result      TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_avatar ON jobs (avatar_id, state);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);
"""
_COLUMNS = "id, kind, state, stage, progress, message, avatar_id, params, result, created_at, updated_at, finished_at"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES: frozenset[JobState] = frozenset({JobState.QUEUED, JobState.RUNNING})
FINISHED_STATES: frozenset[JobState] = frozenset(JobState) - ACTIVE_STATES


class JobNotFound(KeyError):
    """No job with that id."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "job not found"


class JobConflict(Exception):
    """An exclusive job could not be created: one for the same avatar is queued or running."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class QueueFull(Exception):
    """Too many jobs are waiting; the caller should try again later."""


class JobFailed(Exception):
    """Raised by a job handler: the job failed for a reason the user can act on (the message)."""


@dataclass(frozen=True)
class Job:
    """One row of the jobs table. Timestamps are UTC; ``finished_at`` is set once the job has ended."""

    id: str
    kind: str
    state: JobState
    stage: str | None
    progress: float
    message: str | None
    avatar_id: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def active(self) -> bool:
        """Queued or running: the job has not ended yet."""
        return self.state in ACTIVE_STATES

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> Job:
        (job_id, kind, state, stage, progress, message, avatar_id, params, result, created, updated, finished) = row
        return cls(
            id=job_id,
            kind=kind,
            state=JobState(state),
            stage=stage,
            progress=float(progress),
            message=message,
            avatar_id=avatar_id,
            params=json.loads(params),
            result=None if result is None else json.loads(result),
            created_at=datetime.fromisoformat(created),
            updated_at=datetime.fromisoformat(updated),
            finished_at=None if finished is None else datetime.fromisoformat(finished),
        )


def _now() -> str:
    # Fixed-width ISO 8601 in UTC, so text order is time order.
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _placeholders(values: Iterable[object]) -> str:
    return ", ".join("?" for _ in values)


class JobStore:
    """The jobs table in ``path`` (SQLite, WAL mode).

    One connection is shared by all threads behind a lock; every call is a
    single short statement or transaction, so async code should run them with
    ``asyncio.to_thread`` and the lock is never held for long. Opening the
    store settles the jobs a previous process left unfinished (see the module
    docstring).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit mode: single statements commit at once; transactions are explicit.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                log.warning("jobs database %s runs in %s mode: this file system does not support WAL", path, mode)
            # With WAL, NORMAL loses at most the last commits on power loss, never consistency.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(f"{path} was written by a newer avatalk (jobs schema {version})")
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            self._recover()
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one atomic step (IMMEDIATE: take the write lock up front)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _execute(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, parameters).fetchall()

    def _recover(self) -> None:
        now = _now()
        with self._transaction() as conn:
            interrupted = conn.execute(
                "UPDATE jobs SET state = 'failed', message = ?, updated_at = ?, finished_at = ? "
                "WHERE state = 'running' RETURNING id",
                (RESTART_MESSAGE, now, now),
            ).fetchall()
            queued = conn.execute("SELECT id, params FROM jobs WHERE state = 'queued'").fetchall()
            lost = [job_id for job_id, params in queued if not _input_present(json.loads(params))]
            conn.executemany(
                "UPDATE jobs SET state = 'failed', message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                [(MISSING_INPUT_MESSAGE, now, now, job_id) for job_id in lost],
            )
        for (job_id,) in interrupted:
            log.warning("job %s was running when the previous server stopped; marked failed", job_id)
        for job_id in lost:
            log.warning("queued job %s lost its input file; marked failed", job_id)

    # --- reading -------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """One job; ``JobNotFound`` if there is none."""
        rows = self._execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r}")
        return Job._from_row(rows[0])

    def list(
        self,
        *,
        limit: int | None = 50,
        kind: str | None = None,
        avatar_id: str | None = None,
        states: Iterable[JobState] | None = None,
        oldest_first: bool = False,
    ) -> list[Job]:
        """Jobs, newest first (or oldest first), optionally filtered; ``limit=None`` for all."""
        where: list[str] = []
        parameters: list[Any] = []
        if kind is not None:
            where.append("kind = ?")
            parameters.append(kind)
        if avatar_id is not None:
            where.append("avatar_id = ?")
            parameters.append(avatar_id)
        if states is not None:
            wanted = [JobState(state).value for state in states]
            where.append(f"state IN ({_placeholders(wanted)})")
            parameters.extend(wanted)
        order = "ASC" if oldest_first else "DESC"
        sql = f"SELECT {_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at {order}, rowid {order}"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(limit)
        return [Job._from_row(row) for row in self._execute(sql, tuple(parameters))]

    def active_for_avatar(self, avatar_id: str, kind: str = AVATAR_JOB) -> Job | None:
        """The queued or running job of ``kind`` for an avatar, if any."""
        jobs = self.list(limit=1, kind=kind, avatar_id=avatar_id, states=ACTIVE_STATES)
        return jobs[0] if jobs else None

    # --- writing -------------------------------------------------------------

    def create(
        self,
        kind: str,
        *,
        avatar_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Job:
        """Insert a queued job. With ``exclusive``, raise ``JobConflict`` instead if a job of
        the same kind for the same avatar is queued or running (checked in the same
        transaction, so two requests cannot both get through)."""
        job_id = uuid.uuid4().hex
        now = _now()
        with self._transaction() as conn:
            if exclusive and avatar_id is not None:
                other = conn.execute(
                    "SELECT id, state FROM jobs WHERE kind = ? AND avatar_id = ? AND state IN ('queued', 'running') "
                    "LIMIT 1",
                    (kind, avatar_id),
                ).fetchone()
                if other is not None:
                    raise JobConflict(
                        f"avatar {avatar_id!r} already has a {other[1]} {kind} job ({other[0]})", other[0]
                    )
            row = conn.execute(
                f"INSERT INTO jobs (id, kind, state, avatar_id, params, created_at, updated_at) "
                f"VALUES (?, ?, 'queued', ?, ?, ?, ?) RETURNING {_COLUMNS}",
                (job_id, kind, avatar_id, json.dumps(dict(params or {})), now, now),
            ).fetchone()
        return Job._from_row(row)

    def start(self, job_id: str) -> Job | None:
        """Move a queued job to running; ``None`` if it is not queued (cancelled meanwhile)."""
        rows = self._execute(
            f"UPDATE jobs SET state = 'running', message = NULL, updated_at = ? "
            f"WHERE id = ? AND state = 'queued' RETURNING {_COLUMNS}",
            (_now(), job_id),
        )
        return Job._from_row(rows[0]) if rows else None

    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
        """Record the progress of a running job (ignored once it has ended)."""
        self._execute(
            "UPDATE jobs SET stage = ?, progress = ?, updated_at = ? WHERE id = ? AND state = 'running'",
            (stage, min(max(progress, 0.0), 1.0), _now(), job_id),
        )

    def finish(
        self,
        job_id: str,
        state: JobState,
        message: str,
        *,
        result: Mapping[str, Any] | None = None,
        from_states: Iterable[JobState] = ACTIVE_STATES,
    ) -> Job | None:
        """End a job in ``state`` if it is in one of ``from_states``; ``None`` if it was not.

        A succeeded job's progress is set to 1 and its stage to "done".
        """
        state = JobState(state)
        if state not in FINISHED_STATES:
            raise ValueError(f"{state} is not a final state")
        allowed = [JobState(s).value for s in from_states]
        now = _now()
        done = state is JobState.SUCCEEDED
        rows = self._execute(
            f"UPDATE jobs SET state = ?, message = ?, result = ?, updated_at = ?, finished_at = ?, "
            f"progress = CASE WHEN ? THEN 1.0 ELSE progress END, stage = CASE WHEN ? THEN 'done' ELSE stage END "
            f"WHERE id = ? AND state IN ({_placeholders(allowed)}) RETURNING {_COLUMNS}",
            (
                state.value,
                message,
                None if result is None else json.dumps(dict(result)),
                now,
                now,
                done,
                done,
                job_id,
                *allowed,
            ),
        )
        return Job._from_row(rows[0]) if rows else None

    def requeue(self, job_id: str, message: str) -> Job | None:
        """Put a running job back in the queue from the start; ``None`` if it was not running."""
        rows = self._execute(
            f"UPDATE jobs SET state = 'queued', stage = NULL, progress = 0, message = ?, updated_at = ? "
            f"WHERE id = ? AND state = 'running' RETURNING {_COLUMNS}",
            (message, _now(), job_id),
        )
        return Job._from_row(rows[0]) if rows else None


def _input_present(params: Mapping[str, Any]) -> bool:
    source = params.get("input")
    return source is None or Path(source).is_file()


def remove_job_files(job: Job) -> None:
    """Remove what the job's ``cleanup`` param names (an upload's temporary file or folder)."""
    target = job.params.get("cleanup")
    if not target:
        return
    path = Path(target)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- Running jobs ------------------------------------------------------------------


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

        Written to the database at once when the stage changes, otherwise at
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
            log.info("resuming %d queued job(s)", len(pending))
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
            log.warning("job workers did not stop within %.0f s; leaving them to finish", timeout_s)

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
        log.info("queued %s job %s%s", kind, job.id, f" for avatar {avatar_id}" if avatar_id else "")
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
            log.info("cancelled queued job %s", job_id)
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
                log.exception("job %s: the runner failed", entry.job_id)
            finally:
                entry.done.set()
                self._entries.pop(entry.job_id, None)

    def _run(self, entry: _Entry) -> None:
        """One job, start to end, in a worker thread (every database call is made here too)."""
        job = self.store.start(entry.job_id)
        if job is None:  # cancelled while it waited
            remove_job_files(self.store.get(entry.job_id))
            return
        log.info("running %s job %s", job.kind, job.id)
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
                log.info("job %s interrupted by shutdown; it stays queued", job.id)
                return  # its input is kept for the next start
            if entry.cancel.is_set():
                self.store.finish(job.id, JobState.CANCELLED, CANCELLED_MESSAGE)
                log.info("job %s cancelled", job.id)
            elif isinstance(error, JobFailed):
                self.store.finish(job.id, JobState.FAILED, str(error))
                log.info("job %s failed: %s", job.id, error)
            else:
                log.exception("job %s failed unexpectedly", job.id)
                self.store.finish(
                    job.id,
                    JobState.FAILED,
                    f"the job failed unexpectedly ({type(error).__name__}); the server log has the details",
                )
        else:
            self.store.finish(job.id, JobState.SUCCEEDED, outcome.message, result=outcome.result)
            log.info("job %s succeeded: %s", job.id, outcome.message)
        remove_job_files(job)


# --- Avatar preparation jobs ----------------------------------------------------------

#: Share of the overall progress each stage of ``prepare_avatar`` covers. "writing"
#: happens only when frames are cut to a square; a photo goes straight to "finishing".
AVATAR_STAGE_SPANS: Mapping[str, tuple[float, float]] = {
    "analysing": (0.0, 0.6),
    "writing": (0.6, 0.85),
    "finishing": (0.85, 1.0),
    "done": (1.0, 1.0),
}


def avatar_progress(stage: str, fraction: float) -> float:
    """Overall progress (0..1) of an avatar preparation from its stage and the fraction of that stage."""
    start, end = AVATAR_STAGE_SPANS.get(stage, (0.0, 1.0))
    return start + (end - start) * min(max(fraction, 0.0), 1.0)


def avatars_root(settings: Settings) -> Path:
    """Where prepared avatars live."""
    return settings.data_dir / "avatars"


def prepare_with_settings(
    settings: Settings,
    source: Path,
    avatar_id: str,
    display_name: str,
    *,
    kind: Literal["video", "image", "auto"] = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AvatarManifest:
    """``prepare_avatar`` with the configured limits and frame size, into ``avatars_root``.

    The CLI and the REST jobs both go through here, so an avatar comes out
    the same whichever way it was made.
    """
    return prepare_avatar(
        source,
        avatar_id,
        display_name,
        avatars_root(settings),
        kind=kind,
        max_seconds=settings.avatars.max_video_seconds,
        frame_size=settings.avatars.output_size,
        progress=progress,
        cancel=cancel,
    )


class AvatarJobHandler:
    """Runs ``avatar`` jobs: params ``input`` (the video or photo) and ``display_name``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, context: JobContext) -> JobOutcome:
        job = context.job
        if job.avatar_id is None:
            raise JobFailed("the job names no avatar id")
        overall = 0.0

        def report(stage: str, fraction: float) -> None:
            nonlocal overall
            overall = max(overall, avatar_progress(stage, fraction))  # never moves backwards
            context.progress(stage, overall)

        try:
            manifest = prepare_with_settings(
                self.settings,
                Path(job.params["input"]),
                job.avatar_id,
                job.params.get("display_name") or job.avatar_id,
                progress=report,
                cancel=context.cancel,
            )
        except (AvatarPreparationError, InvalidAvatarId) as error:
            raise JobFailed(str(error)) from error
        except OSError as error:  # disk full, permissions: worth telling the user as it is
            raise JobFailed(f"the avatar could not be written: {error.strerror or error}") from error
        truncated = " (the video was cut to the length limit)" if manifest.source.truncated else ""
        return JobOutcome(
            message=f"avatar {manifest.id!r} is ready: {manifest.frame_count} frames of "
            f"{manifest.width}x{manifest.height}{truncated}",
            result={
                "avatar_id": manifest.id,
                "frame_count": manifest.frame_count,
                "width": manifest.width,
                "height": manifest.height,
                "missing_faces": len(manifest.missing_faces),
                "truncated": manifest.source.truncated,
            },
        )
