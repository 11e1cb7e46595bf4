"""A job as every store and the runner see it: its states, its record and its errors.

A job has a free-form ``kind`` (the runner picks its handler by kind) and
JSON-like ``params`` and ``result``, so any kind of background work fits the
same record. ``avatar_id`` names the avatar a job concerns, if any: it is
what "exclusive" jobs are exclusive on, and what clients filter by.

Life cycle: ``queued`` -> ``running`` -> ``succeeded`` | ``failed`` |
``cancelled``; a clean shutdown puts a running job back to ``queued``. How a
store settles what a dead process left unfinished is described in
``avatalk.jobs.store``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

RESTART_MESSAGE = "interrupted by a server restart; submit it again"
SHUTDOWN_MESSAGE = "interrupted by a server shutdown; it runs again when the server starts"
MISSING_INPUT_MESSAGE = "its input file is gone after a server restart; submit it again"
CANCELLED_MESSAGE = "cancelled"
#: A running job whose node died (a deployment of several nodes sharing PostgreSQL); ``{node}`` is its name.
NODE_LOST_MESSAGE = "interrupted: the node running it ({node}) stopped; submit it again"
#: A claimed job whose ``input`` file this node cannot see; ``{node}`` is the node's name.
INPUT_NOT_SHARED_MESSAGE = (
    "its input file is missing on node {node}; every node must share the same data folder (AVATALK_DATA_DIR)"
)


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
    """An exclusive job could not be created: one of the same kind for the same avatar is queued or running."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class QueueFull(Exception):
    """Too many jobs are waiting; the caller should try again later."""


class JobFailed(Exception):
    """Raised by a job handler: the job failed for a reason the user can act on (the message)."""


@dataclass(frozen=True)
class Job:
    """One job. Timestamps are UTC; ``finished_at`` is set once the job has ended."""

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
