"""The job store of a single node: one SQLite file in WAL mode.

WAL lets status reads proceed while a worker writes progress. One server
process is assumed per data folder: a second process opening the same file
would take the first one's running jobs for interrupted ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from avatalk.jobs.files import input_present
from avatalk.jobs.model import (
    ACTIVE_STATES,
    FINISHED_STATES,
    MISSING_INPUT_MESSAGE,
    RESTART_MESSAGE,
    Job,
    JobConflict,
    JobNotFound,
    JobState,
)
from avatalk.jobs.store import JobStore, list_query

logger = logging.getLogger(__name__)

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


def _now() -> str:
    # Fixed-width ISO 8601 in UTC, so text order is time order.
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _placeholders(values: Iterable[object]) -> str:
    return ", ".join("?" for _ in values)


def _job_from_row(row: tuple[Any, ...]) -> Job:
    (job_id, kind, state, stage, progress, message, avatar_id, params, result, created, updated, finished) = row
    return Job(
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


class SQLiteJobStore(JobStore):
    """The jobs table in ``path`` (SQLite, WAL mode).

    One connection is shared by all threads behind a lock; every call is a
    single short statement or transaction, so the lock is never held for
    long. Opening the store settles the jobs a previous process left
    unfinished (see ``avatalk.jobs.store``).
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
                logger.warning("jobs database %s runs in %s mode: this file system does not support WAL", path, mode)
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
            lost = [job_id for job_id, params in queued if not input_present(json.loads(params))]
            conn.executemany(
                "UPDATE jobs SET state = 'failed', message = ?, updated_at = ?, finished_at = ? WHERE id = ?",
                [(MISSING_INPUT_MESSAGE, now, now, job_id) for job_id in lost],
            )
        for (job_id,) in interrupted:
            logger.warning("job %s was running when the previous server stopped; marked failed", job_id)
        for job_id in lost:
            logger.warning("queued job %s lost its input file; marked failed", job_id)

    # --- reading -------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        rows = self._execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobNotFound(f"no job {job_id!r}")
        return _job_from_row(rows[0])

    def list(
        self,
        *,
        limit: int | None = 50,
        kind: str | None = None,
        avatar_id: str | None = None,
        states: Iterable[JobState] | None = None,
        oldest_first: bool = False,
    ) -> list[Job]:
        sql, parameters = list_query(
            f"SELECT {_COLUMNS} FROM jobs",
            "?",
            "rowid",
            limit=limit,
            kind=kind,
            avatar_id=avatar_id,
            states=states,
            oldest_first=oldest_first,
        )
        return [_job_from_row(row) for row in self._execute(sql, tuple(parameters))]

    # --- writing -------------------------------------------------------------

    def create(
        self,
        kind: str,
        *,
        avatar_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Job:
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
        return _job_from_row(row)

    def count(self, states: Iterable[JobState]) -> int:
        wanted = [JobState(state).value for state in states]
        rows = self._execute(f"SELECT count(*) FROM jobs WHERE state IN ({_placeholders(wanted)})", tuple(wanted))
        return int(rows[0][0])

    def claim(self, kinds: Collection[str]) -> Job | None:
        wanted = list(kinds)
        if not wanted:
            return None
        rows = self._execute(
            f"UPDATE jobs SET state = 'running', message = NULL, updated_at = ? WHERE id = ("
            f"SELECT id FROM jobs WHERE state = 'queued' AND kind IN ({_placeholders(wanted)}) "
            f"ORDER BY created_at, rowid LIMIT 1) RETURNING {_COLUMNS}",
            (_now(), *wanted),
        )
        return _job_from_row(rows[0]) if rows else None

    def start(self, job_id: str) -> Job | None:
        rows = self._execute(
            f"UPDATE jobs SET state = 'running', message = NULL, updated_at = ? "
            f"WHERE id = ? AND state = 'queued' RETURNING {_COLUMNS}",
            (_now(), job_id),
        )
        return _job_from_row(rows[0]) if rows else None

    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
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
        return _job_from_row(rows[0]) if rows else None

    def requeue(self, job_id: str, message: str) -> Job | None:
        rows = self._execute(
            f"UPDATE jobs SET state = 'queued', stage = NULL, progress = 0, message = ?, updated_at = ? "
            f"WHERE id = ? AND state = 'running' RETURNING {_COLUMNS}",
            (message, _now(), job_id),
        )
        return _job_from_row(rows[0]) if rows else None
