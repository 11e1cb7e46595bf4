"""Renderers: reply audio in, lip-synced avatar frames out, one per 40 ms tick.

``create_renderer`` builds one by the name used in the settings
(``avatars.renderer``): "classic" is the CPU default; "musetalk" runs the
official MuseTalk v1.5 weights on a GPU (``avatalk.avatars.renderers.musetalk``,
imported only when chosen, since it needs torch, diffusers and transformers),
behind a ``FallbackRenderer`` that draws with "classic" whatever MuseTalk
cannot serve.
"""

from __future__ import annotations

import logging

from avatalk.avatars.renderers.base import (
    RENDER_SAMPLE_RATE,
    SAMPLES_PER_TICK,
    FallbackReason,
    Renderer,
    RendererCannotServe,
    RendererFallback,
    RendererSession,
    RendererStatus,
    RendererUnavailable,
    SpeechSegment,
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
from avatalk.avatars.renderers.fallback import FallbackRenderer, FallbackSession
from avatalk.config import MuseTalkSettings

__all__ = [
    "RENDERER_NAMES",
    "RENDER_SAMPLE_RATE",
    "SAMPLES_PER_TICK",
    "ClassicRenderer",
    "ClassicSession",
    "FallbackReason",
    "FallbackRenderer",
    "FallbackSession",
    "MouthDriver",
    "MouthPose",
    "Renderer",
    "RendererCannotServe",
    "RendererFallback",
    "RendererSession",
    "RendererStatus",
    "RendererUnavailable",
    "SpeechSegment",
    "check_tick_audio",
    "create_renderer",
    "cycle_frame",
    "output_shape_for",
]

logger = logging.getLogger(__name__)

RENDERER_NAMES = ("classic", "musetalk")


def create_renderer(name: str, musetalk: MuseTalkSettings | None = None) -> Renderer:
    """The renderer called ``name``: "classic" (CPU) or "musetalk" (GPU, settings ``AVATALK_MUSETALK__*``).

    "musetalk" loads its weights here (seconds) and comes wrapped in a
    ``FallbackRenderer``: when its Python packages or weights are missing or
    do not load, the error is logged with how to fix it and every session
    is drawn by "classic" (``status()`` says why), so a GPU problem degrades
    the picture, never the service. An unknown name is a ``ValueError``
    listing the known ones.
    """
    if name == "classic":
        return ClassicRenderer()
    if name == "musetalk":
        try:
            primary = _load_musetalk(musetalk)
        except RendererUnavailable as error:
            logger.error("%s; sessions are drawn by the classic renderer", error)
            return FallbackRenderer(name, None, ClassicRenderer(), unavailable=str(error))
        return FallbackRenderer(name, primary, ClassicRenderer())
    raise ValueError(f"unknown renderer {name!r}; choose one of: {', '.join(RENDERER_NAMES)}")


def _load_musetalk(settings: MuseTalkSettings | None) -> Renderer:
    """The MuseTalk renderer, or ``RendererUnavailable`` saying what is missing and how to fix it."""
    try:
        from avatalk.avatars.renderers.musetalk import MuseTalkRenderer
    except ImportError as error:
        raise RendererUnavailable(
            f"the musetalk renderer is not available: it needs torch, diffusers and transformers ({error}); "
            "install them with `pip install -e '.[gpu]'`, or use AVATALK_AVATARS__RENDERER=classic"
        ) from error
    try:
        return MuseTalkRenderer(settings)
    except RendererUnavailable:
        raise
    except Exception as error:  # a CUDA or library failure while loading must not stop the server
        raise RendererUnavailable(f"the musetalk renderer failed to load: {type(error).__name__}: {error}") from error
