"""Background jobs: one persistent store and one runner for every kind of long work.

Two stores implement one interface (``JobStore``): SQLite for one node and
PostgreSQL for several nodes sharing their jobs (``open_job_store`` picks by
the settings). Avatar preparation (``avatalk.avatars.preparation_job``) and offline renders
(``avatalk.avatars.render_job``) are two job kinds: each is a handler the
runner calls with a ``JobContext``. This package knows nothing about them,
so it imports nothing from ``avatars``, ``streaming`` or ``server``.
"""

from avatalk.jobs.model import (
    ACTIVE_STATES,
    CANCELLED_MESSAGE,
    FINISHED_STATES,
    INPUT_NOT_SHARED_MESSAGE,
    MISSING_INPUT_MESSAGE,
    NODE_LOST_MESSAGE,
    RESTART_MESSAGE,
    SHUTDOWN_MESSAGE,
    Job,
    JobConflict,
    JobFailed,
    JobNotFound,
    JobState,
    QueueFull,
)
from avatalk.jobs.open_store import open_job_store
from avatalk.jobs.runner import JobContext, JobHandler, JobOutcome, JobRunner
from avatalk.jobs.sqlite_store import SQLiteJobStore
from avatalk.jobs.store import JobStore

__all__ = [
    "ACTIVE_STATES",
    "CANCELLED_MESSAGE",
    "FINISHED_STATES",
    "INPUT_NOT_SHARED_MESSAGE",
    "MISSING_INPUT_MESSAGE",
    "NODE_LOST_MESSAGE",
    "RESTART_MESSAGE",
    "SHUTDOWN_MESSAGE",
    "Job",
    "JobConflict",
    "JobContext",
    "JobFailed",
    "JobHandler",
    "JobNotFound",
    "JobOutcome",
    "JobRunner",
    "JobState",
    "JobStore",
    "QueueFull",
    "SQLiteJobStore",
    "open_job_store",
]
