"""Renderers: reply audio in, lip-synced avatar frames out, one per 40 ms tick.

``create_renderer`` builds one by the name used in the settings
(``avatars.renderer``): "classic" is the CPU default; "musetalk" runs the
official MuseTalk v1.5 weights on a GPU (``avatalk.avatars.renderers.musetalk``,
imported only when chosen, since it needs torch, diffusers and transformers).
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
from avatalk.avatars.renderers.classic import (
    ClassicRenderer,
    ClassicSession,
    MouthDriver,
    MouthPose,
)
from avatalk.config import MuseTalkSettings

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


def create_renderer(name: str, musetalk: MuseTalkSettings | None = None) -> Renderer:
    """The renderer called ``name``: "classic" (CPU) or "musetalk" (GPU, settings ``AVATALK_MUSETALK__*``).

    "musetalk" loads its weights here (seconds). It raises
    ``RendererUnavailable`` (a ``NotImplementedError``) when its Python
    packages or its weights are missing, with a message saying how to fix
    it; an unknown name is a ``ValueError`` listing the known ones.
    """
    if name == "classic":
        return ClassicRenderer()
    if name == "musetalk":
        try:
            from avatalk.avatars.renderers.musetalk import MuseTalkRenderer
        except ImportError as error:
            raise RendererUnavailable(
                f"the musetalk renderer is not available: it needs torch, diffusers and transformers ({error}); "
                "install them with `pip install -e '.[gpu]'`, or use AVATALK_AVATARS__RENDERER=classic"
            ) from error
        return MuseTalkRenderer(musetalk)
    raise ValueError(f"unknown renderer {name!r}; choose one of: {', '.join(RENDERER_NAMES)}")
