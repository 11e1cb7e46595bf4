"""Avatar preparation with this installation's settings, and its progress across stages."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from avatalk.avatars.prepare import ProgressCallback, prepare_avatar
from avatalk.avatars.store import AvatarManifest
from avatalk.config import Settings

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

    The CLI and the server's preparation jobs both go through here, so an
    avatar comes out the same whichever way it was made.
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
