"""The ``avatar`` job kind: prepare an uploaded or imported video or photo in the background.

The REST API queues these jobs (``POST /v1/avatars``); the runner of
``avatalk.jobs`` calls ``AvatarJobHandler`` in a worker thread. Preparation
itself is ``prepare_with_settings``, the same call the CLI makes.
"""

from __future__ import annotations

from pathlib import Path

from avatalk.avatars.prepare_errors import AvatarPreparationError
from avatalk.avatars.prepare_settings import avatar_progress, prepare_with_settings
from avatalk.avatars.store import InvalidAvatarId
from avatalk.config import Settings
from avatalk.jobs import JobContext, JobFailed, JobOutcome

#: The kind of job that prepares an avatar.
AVATAR_JOB = "avatar"


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
