"""Opening the job store the settings ask for: SQLite for one node, PostgreSQL for several."""

from __future__ import annotations

from pathlib import Path

from avatalk.jobs.sqlite_store import SQLiteJobStore
from avatalk.jobs.store import JobStore


def open_job_store(database_url: str | None, sqlite_path: Path, *, node: str) -> JobStore:
    """The PostgreSQL store at ``database_url`` when there is one (several nodes share it), else SQLite at ``sqlite_path``.

    Blocking (it connects, creates tables and settles what a previous process
    left); PostgreSQL is imported only when it is used, so a single node
    needs no database driver.
    """
    if database_url:
        from avatalk.jobs.postgres_store import PostgresJobStore

        return PostgresJobStore(database_url, node=node)
    return SQLiteJobStore(sqlite_path)
