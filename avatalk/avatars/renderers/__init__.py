"""Renderers: reply audio in, lip-synced avatar frames out, one per 40 ms tick.

``create_renderer`` builds one by the name used in the settings
(``avatars.renderer``): "classic" is the CPU default; "musetalk" (GPU) is
designed but not available yet.
"""

from __future__ import annotations

from avatalk.avatars.renderers.base import (
    RENDER_SAMPLE_RATE,
    SAMPLES_PER_TICK,
    Renderer,
    RendererSession,
    RendererUnavailable,
    check_tick_audio,
    cycle_frame,
    output_shape_for,
)
from avatalk.avatars.renderers.classic import ClassicRenderer, ClassicSession, MouthDriver, MouthPose

__all__ = [
    "RENDERER_NAMES",
    "RENDER_SAMPLE_RATE",
    "SAMPLES_PER_TICK",
    "ClassicRenderer",
    "ClassicSession",
    "MouthDriver",
    "MouthPose",
    "Renderer",
    "RendererSession",
    "RendererUnavailable",
    "check_tick_audio",
    "create_renderer",
    "cycle_frame",
    "output_shape_for",
]

RENDERER_NAMES = ("classic", "musetalk")


def create_renderer(name: str) -> Renderer:
    """The renderer called ``name``: "classic" (CPU); "musetalk" raises ``RendererUnavailable`` for now.

    ``RendererUnavailable`` is a ``NotImplementedError``; an unknown name is a
    ``ValueError`` listing the known ones.
    """
    if name == "classic":
        return ClassicRenderer()
    if name == "musetalk":
        raise RendererUnavailable(
            "the musetalk renderer is not available yet in this version of avatalk; "
            "use the 'classic' renderer (AVATALK_AVATARS__RENDERER=classic)"
        )
    raise ValueError(f"unknown renderer {name!r}; choose one of: {', '.join(RENDERER_NAMES)}")
