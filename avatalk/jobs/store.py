"""Where jobs persist: the interface every job store implements.

Preparing an avatar or rendering a video takes far longer than an HTTP
request should stay open, so the REST API queues a job and answers at once,
and clients poll it. DESIGN.md section 4 asks that a crash loses no job,
hence jobs live in a database rather than in memory: ``SQLiteJobStore`` for
one node; a PostgreSQL store for several nodes implements this same class.

What happens to unfinished jobs when a store is opened by a new process:

- ``running``: the previous process died during the job (crash, kill -9,
  power loss). The job is marked ``failed`` (``RESTART_MESSAGE``) rather
  than run again, because the job itself may have killed the process (a
  huge video exhausting memory, a decoder crash); re-running it
  automatically could take the server down at every start.
- ``queued``: it never started, so nothing about it is suspect. It stays
  queued when its ``input`` is still on disk (``JobRunner.start`` queues it
  again in creation order); without its input it is marked ``failed``
  (``MISSING_INPUT_MESSAGE``).

A clean shutdown (``JobRunner.stop``) puts running jobs back to ``queued``:
they were interrupted on purpose, so they run again after the restart.

A store that several processes share at once (``shared``: the PostgreSQL
store of a deployment of several nodes) cannot settle at open, since the
other nodes' running jobs are alive. It knows a job's node is alive by a lock
that node's database connection holds while the job runs: ``claim`` takes it,
``finish`` and ``requeue`` give it back, and when a node dies its connection
and its locks go with it. ``settle_orphans``, which every node calls now and
then, marks the running jobs whose lock is free ``failed``, for the same
reason as above: a job that killed one node must not go on to kill the next.
Queued jobs belong to no node, so any node takes them (``claim``) and none is
lost with a node.

Every method is a short blocking call; async code runs them with
``asyncio.to_thread`` (the runner calls them from its worker threads), so
implementations must be safe to call from several threads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar

from avatalk.jobs.model import ACTIVE_STATES, Job, JobState


class JobStore(ABC):
    """The jobs of this server: read, create and move through their states atomically."""

    #: Other processes (the other nodes of a deployment) use the same jobs at the same time.
    shared: ClassVar[bool] = False

    @abstractmethod
    def close(self) -> None:
        """Release the database; the store is not used afterwards."""

    # --- reading -------------------------------------------------------------

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """One job; ``JobNotFound`` if there is none."""

    @abstractmethod
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

    def count(self, states: Iterable[JobState]) -> int:
        """How many jobs are in one of ``states`` (the runner bounds the queue with it)."""
        return len(self.list(limit=None, states=states))

    def active_for_avatar(self, avatar_id: str, kind: str) -> Job | None:
        """The queued or running job of ``kind`` for an avatar, if any."""
        jobs = self.list(limit=1, kind=kind, avatar_id=avatar_id, states=ACTIVE_STATES)
        return jobs[0] if jobs else None

    # --- writing -------------------------------------------------------------

    @abstractmethod
    def create(
        self,
        kind: str,
        *,
        avatar_id: str | None = None,
        params: Mapping[str, Any] | None = None,
        exclusive: bool = False,
    ) -> Job:
        """Insert a queued job. With ``exclusive``, raise ``JobConflict`` instead if a job of
        the same kind for the same avatar is queued or running (checked atomically with the
        insert, so two requests cannot both get through)."""

    @abstractmethod
    def start(self, job_id: str) -> Job | None:
        """Move a queued job to running; ``None`` if it is not queued (cancelled meanwhile)."""

    @abstractmethod
    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
        """Record the progress (clamped to 0..1) of a running job; ignored once it has ended."""

    @abstractmethod
    def finish(
        self,
        job_id: str,
        state: JobState,
        message: str,
        *,
        result: Mapping[str, Any] | None = None,
        from_states: Iterable[JobState] = ACTIVE_STATES,
    ) -> Job | None:
        """End a job in the final ``state`` if it is in one of ``from_states``; ``None`` if it was not.

        A succeeded job's progress is set to 1 and its stage to "done";
        ``ValueError`` if ``state`` is not a final state.
        """

    @abstractmethod
    def requeue(self, job_id: str, message: str) -> Job | None:
        """Put a running job back in the queue from the start; ``None`` if it was not running."""

    def claim(self, kinds: Collection[str]) -> Job | None:
        """Start the oldest queued job of one of ``kinds`` for this process; ``None`` when there is none.

        This is how a runner takes work: a job queued by any process sharing
        the store is run by exactly one of them. The default takes the queued
        jobs in creation order and keeps the first that ``start`` moves (an
        atomic compare-and-set, so two claimers never get the same job);
        stores override it with one statement.
        """
        wanted = set(kinds)
        for job in self.list(limit=None, states=[JobState.QUEUED], oldest_first=True):
            if job.kind in wanted:
                started = self.start(job.id)
                if started is not None:
                    return started
        return None

    def request_cancel(self, job_id: str) -> None:
        """Ask whichever process runs ``job_id`` to cancel it (see ``cancel_requested``).

        A store only one process uses needs nothing here: that process's
        runner cancels its own jobs in memory.
        """

    def cancel_requested(self, job_ids: Collection[str]) -> set[str]:
        """Which of these running jobs another process asked to cancel (``request_cancel``)."""
        return set()

    def settle_orphans(self) -> list[Job]:
        """Fail the running jobs whose process died (a shared store; see the module doc).

        Returns the jobs it failed. A store only one process uses settles them
        when it is opened instead, so the default does nothing.
        """
        return []


def list_query(
    select: str,
    placeholder: str,
    tiebreak: str,
    *,
    limit: int | None,
    kind: str | None,
    avatar_id: str | None,
    states: Iterable[JobState] | None,
    oldest_first: bool,
) -> tuple[str, list[Any]]:
    """The SQL and parameters of ``JobStore.list`` for a store whose driver uses ``placeholder``.

    ``select`` is the ``SELECT ... FROM table`` part; ``tiebreak`` orders jobs created
    in the same instant (the table's insertion order).
    """
    where: list[str] = []
    parameters: list[Any] = []
    if kind is not None:
        where.append(f"kind = {placeholder}")
        parameters.append(kind)
    if avatar_id is not None:
        where.append(f"avatar_id = {placeholder}")
        parameters.append(avatar_id)
    if states is not None:
        wanted = [JobState(state).value for state in states]
        where.append(f"state IN ({', '.join([placeholder] * len(wanted))})" if wanted else "FALSE")
        parameters.extend(wanted)
    order = "ASC" if oldest_first else "DESC"
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY created_at {order}, {tiebreak} {order}"
    if limit is not None:
        sql += f" LIMIT {placeholder}"
        parameters.append(limit)
    return sql, parameters
