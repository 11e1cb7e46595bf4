"""The job store of a deployment of several nodes: one PostgreSQL table they all share.

Taking work is the standard PostgreSQL queue pattern: ``SELECT ... FOR UPDATE
SKIP LOCKED`` picks the oldest queued row no other node is taking at that
instant, so any node can take any job and two nodes never take the same one,
without a lock table or a leader. A node that holds a job keeps a
session-level advisory lock on it on its own connection for as long as the
job runs (the approach of Ruby's que and good_job): PostgreSQL itself drops
the lock when that connection ends, which a dead node's always does, so
``settle_orphans`` finds a dead node's jobs by trying their locks, with no
heartbeat to tune and no clock to trust. Exclusive jobs (one preparation per
avatar) are a partial unique index, checked by the database at insert.

Connections: a small pool (psycopg_pool) for the short statements of every
thread, and one connection per running job holding its lock, kept for the
next claim afterwards. Connect to PostgreSQL directly or through a pooler in
session mode: a pooler in transaction mode would move the lock to whichever
client uses that server connection next.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from avatalk.jobs.model import (
    ACTIVE_STATES,
    FINISHED_STATES,
    NODE_LOST_MESSAGE,
    Job,
    JobConflict,
    JobNotFound,
    JobState,
)
from avatalk.jobs.store import JobStore, list_query

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.types.json import Jsonb
    from psycopg_pool import ConnectionPool
except ImportError as missing:  # pragma: no cover - depends on the install
    raise ImportError(
        "jobs.database_url needs psycopg 3 and psycopg_pool: pip install 'avatalk[postgres]'"
    ) from missing

logger = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
#: First key of every advisory lock avatalk takes ("avat"), so its locks cannot meet another application's.
_LOCK_SPACE = 0x61766174
_SCHEMA = """
CREATE TABLE IF NOT EXISTS avatalk_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS avatalk_jobs (
    seq              BIGSERIAL UNIQUE,
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage            TEXT,
    progress         DOUBLE PRECISION NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 1),
    message          TEXT,
    avatar_id        TEXT,
    params           JSONB NOT NULL DEFAULT '{}',
    result           JSONB,
    exclusive        BOOLEAN NOT NULL DEFAULT FALSE,
    node             TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL,
    finished_at      TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS avatalk_jobs_queue ON avatalk_jobs (created_at, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS avatalk_jobs_running ON avatalk_jobs (id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS avatalk_jobs_by_avatar ON avatalk_jobs (avatar_id, state);
CREATE INDEX IF NOT EXISTS avatalk_jobs_by_created ON avatalk_jobs (created_at, seq);
CREATE UNIQUE INDEX IF NOT EXISTS avatalk_jobs_exclusive ON avatalk_jobs (kind, avatar_id)
    WHERE exclusive AND state IN ('queued', 'running');
"""
_COLUMNS = "id, kind, state, stage, progress, message, avatar_id, params, result, created_at, updated_at, finished_at"


def _lock_key(seq: int) -> int:
    """The second (32-bit) key of a job's advisory lock, from its row number."""
    return seq % 2147483647


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
        params=dict(params),
        result=None if result is None else dict(result),
        created_at=created,
        updated_at=updated,
        finished_at=finished,
    )


def describe_url(url: str) -> str:
    """``host:port/dbname`` of a database URL, for messages: never its password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unreadable URL)"
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


class PostgresJobStore(JobStore):
    """The ``avatalk_jobs`` table of the database at ``url``, shared by every node.

    ``node`` names this process in the table (the node that runs a job) and in
    the message of a job its death interrupted. Opening creates the table if
    needed (one node at a time, under an advisory lock) and fails with a clear
    ``RuntimeError`` when the database cannot be reached within ``connect_timeout_s``.
    """

    shared = True

    def __init__(self, url: str, *, node: str, connect_timeout_s: float = 10.0, pool_size: int = 4) -> None:
        self.node = node
        self._url = url
        self._where = describe_url(url)
        # UTC timestamps; keepalives so a vanished node's lock connection is noticed within about a minute.
        self._connect_args: dict[str, Any] = {
            "autocommit": True,
            "options": "-c TimeZone=UTC",
            "application_name": f"avatalk {node}"[:63],
            "connect_timeout": max(1, int(connect_timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        self._pool = ConnectionPool(
            url, min_size=1, max_size=pool_size, kwargs=self._connect_args, open=False, name=f"avatalk-jobs-{node}"
        )
        self._held: dict[str, tuple[psycopg.Connection[Any], int]] = {}  # job id -> (its lock connection, seq)
        self._spare: list[psycopg.Connection[Any]] = []  # lock connections between jobs
        self._lock = threading.Lock()
        try:
            self._pool.open(wait=True, timeout=connect_timeout_s)
        except Exception as error:  # PoolTimeout: the pool keeps the reason in the log
            self._pool.close()
            raise RuntimeError(
                f"cannot reach the jobs database at {self._where} (jobs.database_url) within {connect_timeout_s:.0f} s"
            ) from error
        try:
            self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _migrate(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            # Nodes starting together would race on CREATE ... IF NOT EXISTS; one at a time instead.
            conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_SPACE,))
            conn.execute(_SCHEMA)
            row = conn.execute("SELECT version FROM avatalk_schema WHERE component = 'jobs'").fetchone()
            if row is not None and row[0] > _SCHEMA_VERSION:
                raise RuntimeError(f"the jobs database at {self._where} was written by a newer avatalk (schema {row[0]})")
            conn.execute(
                "INSERT INTO avatalk_schema (component, version) VALUES ('jobs', %s) ON CONFLICT (component) DO NOTHING",
                (_SCHEMA_VERSION,),
            )

    def close(self) -> None:
        """Close every connection; a job still running here becomes an orphan for the other nodes to settle."""
        with self._lock:
            connections = [conn for conn, _ in self._held.values()] + self._spare
            self._held.clear()
            self._spare.clear()
        for conn in connections:
            conn.close()
        self._pool.close()

    def _fetch(self, sql: str, parameters: Iterable[Any] | Mapping[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn:
            cursor = conn.execute(sql, parameters)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description is not None else []

    # --- reading -------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        rows = self._fetch(f"SELECT {_COLUMNS} FROM avatalk_jobs WHERE id = %s", (job_id,))
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
            f"SELECT {_COLUMNS} FROM avatalk_jobs",
            "%s",
            "seq",
            limit=limit,
            kind=kind,
            avatar_id=avatar_id,
            states=states,
            oldest_first=oldest_first,
        )
        return [_job_from_row(row) for row in self._fetch(sql, parameters)]

    def count(self, states: Iterable[JobState]) -> int:
        rows = self._fetch(
            "SELECT count(*) FROM avatalk_jobs WHERE state = ANY(%s)", ([JobState(s).value for s in states],)
        )
        return int(rows[0][0])

    def cancel_requested(self, job_ids: Collection[str]) -> set[str]:
        if not job_ids:
            return set()
        rows = self._fetch(
            "SELECT id FROM avatalk_jobs WHERE id = ANY(%s) AND cancel_requested AND state = 'running'",
            (list(job_ids),),
        )
        return {row[0] for row in rows}

    # --- writing -------------------------------------------------------------

    def create(
        self,
        kind: str,
        *,
        avatar_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Job:
        exclusive = exclusive and avatar_id is not None
        for _ in range(3):  # the conflicting job may end between the refused insert and the look-up
            try:
                rows = self._fetch(
                    f"INSERT INTO avatalk_jobs (id, kind, state, avatar_id, params, exclusive, created_at, updated_at) "
                    f"VALUES (%s, %s, 'queued', %s, %s, %s, now(), now()) RETURNING {_COLUMNS}",
                    (uuid.uuid4().hex, kind, avatar_id, Jsonb(dict(params or {})), exclusive),
                )
                return _job_from_row(rows[0])
            except pg_errors.UniqueViolation:
                assert avatar_id is not None
                other = self.active_for_avatar(avatar_id, kind)
                if other is not None:
                    raise JobConflict(
                        f"avatar {avatar_id!r} already has a {other.state} {kind} job ({other.id})", other.id
                    ) from None
        raise RuntimeError(f"could not queue a {kind} job for avatar {avatar_id!r}: it kept conflicting")

    def claim(self, kinds: Collection[str]) -> Job | None:
        if not kinds:
            return None
        return self._take("state = 'queued' AND kind = ANY(%s) ORDER BY created_at, seq", [list(kinds)])

    def start(self, job_id: str) -> Job | None:
        return self._take("state = 'queued' AND id = %s", [job_id])

    def _take(self, condition: str, parameters: list[Any]) -> Job | None:
        """Move the first queued row matching ``condition`` to running, holding its lock on a connection of its own.

        The lock is taken before the running state is committed, so no node
        ever sees this job running with its lock free.
        """
        conn = self._lock_connection()
        job = None
        try:
            with conn.transaction():
                row = conn.execute(
                    f"SELECT id, seq FROM avatalk_jobs WHERE {condition} LIMIT 1 FOR UPDATE SKIP LOCKED", parameters
                ).fetchone()
                if row is not None:
                    job_id, seq = row
                    conn.execute("SELECT pg_advisory_lock(%s, %s)", (_LOCK_SPACE, _lock_key(seq)))
                    taken = conn.execute(
                        f"UPDATE avatalk_jobs SET state = 'running', message = NULL, node = %s, "
                        f"cancel_requested = FALSE, updated_at = now() WHERE id = %s RETURNING {_COLUMNS}",
                        (self.node, job_id),
                    ).fetchone()
                    assert taken is not None
                    job = _job_from_row(taken)
        except BaseException:
            conn.close()  # whatever it held goes with it
            raise
        with self._lock:
            if job is None:
                self._spare.append(conn)
            else:
                self._held[job.id] = (conn, seq)
        return job

    def _lock_connection(self) -> psycopg.Connection[Any]:
        with self._lock:
            while self._spare:
                conn = self._spare.pop()
                if not conn.closed and not conn.broken:
                    return conn
        return psycopg.connect(self._url, **self._connect_args)

    def _release(self, job_id: str) -> None:
        """Give back the lock of a job this process held, once its row no longer says running here."""
        with self._lock:
            held = self._held.pop(job_id, None)
        if held is None:
            return
        conn, seq = held
        try:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_SPACE, _lock_key(seq)))
        except psycopg.Error:
            conn.close()  # closing releases the lock too
            return
        with self._lock:
            self._spare.append(conn)

    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
        self._fetch(
            "UPDATE avatalk_jobs SET stage = %s, progress = %s, updated_at = now() WHERE id = %s AND state = 'running'",
            (stage, min(max(progress, 0.0), 1.0), job_id),
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
        done = state is JobState.SUCCEEDED
        rows = self._fetch(
            f"UPDATE avatalk_jobs SET state = %s, message = %s, result = %s, updated_at = now(), finished_at = now(), "
            f"progress = CASE WHEN %s THEN 1.0 ELSE progress END, stage = CASE WHEN %s THEN 'done' ELSE stage END "
            f"WHERE id = %s AND state = ANY(%s) RETURNING {_COLUMNS}",
            (
                state.value,
                message,
                None if result is None else Jsonb(dict(result)),
                done,
                done,
                job_id,
                [JobState(s).value for s in from_states],
            ),
        )
        if rows or self._settled_elsewhere(job_id):
            self._release(job_id)
        return _job_from_row(rows[0]) if rows else None

    def requeue(self, job_id: str, message: str) -> Job | None:
        rows = self._fetch(
            f"UPDATE avatalk_jobs SET state = 'queued', stage = NULL, progress = 0, message = %s, node = NULL, "
            f"updated_at = now() WHERE id = %s AND state = 'running' RETURNING {_COLUMNS}",
            (message, job_id),
        )
        if rows or self._settled_elsewhere(job_id):
            self._release(job_id)
        return _job_from_row(rows[0]) if rows else None

    def _settled_elsewhere(self, job_id: str) -> bool:
        """A job held here that is no longer running (settled by another node when our connection dropped)."""
        with self._lock:
            if job_id not in self._held:
                return False
        rows = self._fetch("SELECT state FROM avatalk_jobs WHERE id = %s", (job_id,))
        return not rows or rows[0][0] != JobState.RUNNING.value

    def request_cancel(self, job_id: str) -> None:
        self._fetch("UPDATE avatalk_jobs SET cancel_requested = TRUE WHERE id = %s AND state = 'running'", (job_id,))

    def settle_orphans(self) -> list[Job]:
        with self._pool.connection() as conn, conn.transaction():
            running = conn.execute(
                "SELECT id, seq, node FROM avatalk_jobs WHERE state = 'running' FOR UPDATE SKIP LOCKED"
            ).fetchall()
            orphans: list[tuple[str, str]] = []
            for job_id, seq, node in running:
                # Free only when the connection of the node that took it is gone; held until this commit.
                free = conn.execute(
                    "SELECT pg_try_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _lock_key(seq))
                ).fetchone()
                if free is not None and free[0]:
                    orphans.append((job_id, node or "unknown"))
            settled = []
            for job_id, node in orphans:
                row = conn.execute(
                    f"UPDATE avatalk_jobs SET state = 'failed', message = %s, updated_at = now(), finished_at = now() "
                    f"WHERE id = %s RETURNING {_COLUMNS}",
                    (NODE_LOST_MESSAGE.format(node=node), job_id),
                ).fetchone()
                if row is not None:
                    settled.append(_job_from_row(row))
        for job in settled:
            logger.warning("job %s was running on a node that stopped; marked failed", job.id)
        return settled
