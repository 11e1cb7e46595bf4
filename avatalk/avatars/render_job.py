"""The ``render`` job kind: an offline talking-avatar MP4 rendered in the background.

The REST API queues these jobs (``POST /v1/renders``) and serves the result
from ``render_path``; the runner of ``avatalk.jobs`` calls
``RenderJobHandler`` in a worker thread. The rendering itself is
``avatalk.avatars.offline``, the same code ``avatalk render`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from avatalk.avatars.offline import RenderError, load_audio, render_video
from avatalk.avatars.renderers import Renderer
from avatalk.avatars.store import AvatarNotFound, AvatarStore
from avatalk.config import Settings
from avatalk.jobs import JobContext, JobFailed, JobOutcome

#: The kind of job that renders a video.
RENDER_JOB = "render"


def render_path(settings: Settings, job_id: str) -> Path:
    """Where the MP4 of render job ``job_id`` is written, and served from once it has succeeded."""
    return (settings.data_dir / "renders").absolute() / f"{job_id}.mp4"


class RenderJobHandler:
    """Runs ``render`` jobs: params ``input`` (a WAV or any audio file), ``avatar``, ``size``."""

    def __init__(self, settings: Settings, avatars: AvatarStore, renderer: Callable[[], Renderer | None]) -> None:
        """``renderer`` returns the server's loaded renderer (None while it is still loading)."""
        self.settings = settings
        self.avatars = avatars
        self._server_renderer = renderer

    def _get_renderer(self) -> Renderer:
        # The server's renderer, not a second copy: MuseTalk weights are loaded once per process.
        renderer = self._server_renderer()
        if renderer is None:
            raise JobFailed("the server is still loading its renderer; submit the render again in a moment")
        return renderer

    def __call__(self, context: JobContext) -> JobOutcome:
        params = context.job.params
        try:
            avatar = self.avatars.load(params["avatar"])
        except AvatarNotFound as error:
            raise JobFailed(f"there is no avatar {params['avatar']!r}") from error
        out_path = render_path(self.settings, context.job.id)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            context.progress("decoding", 0.0)
            audio, rate = load_audio(Path(params["input"]))
            result = render_video(
                self._get_renderer(),
                avatar,
                audio,
                rate,
                out_path,
                int(params.get("size") or self.settings.avatars.output_size),
                progress=lambda fraction: context.progress("rendering", 0.05 + 0.95 * fraction),
                cancel=context.cancel,
            )
        except RenderError as error:
            raise JobFailed(str(error)) from error
        return JobOutcome(
            f"rendered {result.frames} frames ({result.seconds:.1f} s)",
            {"frames": result.frames, "seconds": result.seconds, "url": f"/v1/renders/{context.job.id}"},
        )
