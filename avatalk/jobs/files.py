"""The two ``params`` keys the job system itself understands: ``input`` and ``cleanup``.

``input`` is a file the job reads: a queued job whose input is gone after a
restart can never run, so stores fail it when they settle unfinished jobs.
``cleanup`` is a file or folder (such as an upload's temporary folder) that
the runner removes once the job has ended, whatever the outcome.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from avatalk.jobs.model import Job


def input_present(params: Mapping[str, Any]) -> bool:
    """Whether the job's ``input`` file is still there (true when it names none). Blocking."""
    source = params.get("input")
    return source is None or Path(source).is_file()


def remove_job_files(job: Job) -> None:
    """Remove what the job's ``cleanup`` param names. Blocking."""
    target = job.params.get("cleanup")
    if not target:
        return
    path = Path(target)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
