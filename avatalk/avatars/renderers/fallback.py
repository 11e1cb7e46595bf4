"""The configured renderer where it can serve a session, the classic renderer where it cannot.

A GPU renderer can fail a session for reasons that have nothing to do with
the conversation: its weights did not load, the avatar has no latents yet,
the GPU already holds as many sessions as it can, or the device fails
mid-session (a CUDA error). None of these may end the conversation or leave
it silently frozen, so ``FallbackRenderer`` wraps the configured renderer:
such a session is drawn by the classic renderer instead, and the session
reports the switch once (``RendererSession.take_fallback``), which the video
stage turns into a ``warning`` event that names the reason and that the
metrics count. ``status`` tells ``/readyz`` and ``avatalk doctor`` which
renderers are live.

A device error marks the configured renderer as not live for new sessions
too: a CUDA context that raised once is usually unusable until the process
restarts, and probing it with every new session would give each one a
broken first second.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from avatalk.avatars.renderers.base import (
    FallbackReason,
    Renderer,
    RendererCannotServe,
    RendererFallback,
    RendererSession,
    RendererStatus,
    SpeechSegment,
)
from avatalk.avatars.store import LoadedAvatar

logger = logging.getLogger(__name__)


class FallbackSession(RendererSession):
    """A session of the configured renderer that switches to the fallback for good when it fails.

    ``primary`` is None when the session starts on the fallback (the switch
    is then reported at once). The switch happens inside ``render`` or
    ``look_ahead`` when the configured session raises ``RendererCannotServe``;
    that tick is drawn by the fallback, so no frame is lost.
    """

    def __init__(
        self,
        primary: RendererSession | None,
        open_fallback: Callable[[], RendererSession],
        *,
        notice: RendererFallback | None = None,
        on_failure: Callable[[RendererCannotServe], None] | None = None,
    ) -> None:
        self._open_fallback = open_fallback
        self._on_failure = on_failure
        self._notices: deque[RendererFallback] = deque()
        self._current = primary if primary is not None else open_fallback()
        self.uses_look_ahead = self._current.uses_look_ahead
        if notice is not None:
            self._notices.append(notice)

    @property
    def current(self) -> RendererSession:
        """The session drawing the frames now."""
        return self._current

    @property
    def output_shape(self) -> tuple[int, int]:
        return self._current.output_shape

    def idle_frame(self, tick: int) -> np.ndarray:
        return self._current.idle_frame(tick)

    def look_ahead(self, tick: int, segments: Sequence[SpeechSegment]) -> None:
        try:
            self._current.look_ahead(tick, segments)
        except RendererCannotServe as error:
            self._switch(error)

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        try:
            return self._current.render(tick, audio)
        except RendererCannotServe as error:
            self._switch(error)
            return self._current.render(tick, audio)

    def reset(self) -> None:
        self._current.reset()

    def take_fallback(self) -> RendererFallback | None:
        try:
            return self._notices.popleft()
        except IndexError:
            return None

    def close(self) -> None:
        self._current.close()

    def _switch(self, error: RendererCannotServe) -> None:
        logger.warning("renderer failed mid-session (%s); the classic renderer takes over: %s", error.reason, error)
        failed = self._current
        self._current = self._open_fallback()
        self.uses_look_ahead = self._current.uses_look_ahead
        failed.close()
        self._notices.append(RendererFallback(error.reason, error.message))
        if self._on_failure is not None:
            self._on_failure(error)


class FallbackRenderer(Renderer):
    """``primary`` (the configured renderer) for every session it can serve, ``fallback`` for the others.

    ``primary`` is None when it could not be built; ``unavailable`` then
    says why (the load error), and every session is drawn by the fallback.
    """

    def __init__(
        self, name: str, primary: Renderer | None, fallback: Renderer, *, unavailable: str | None = None
    ) -> None:
        if (primary is None) == (unavailable is None):
            raise ValueError("give either the primary renderer or the reason it is unavailable")
        self.name = name
        self.primary = primary
        self.fallback = fallback
        self._lock = threading.Lock()
        self._down: tuple[FallbackReason, str] | None = (
            None if unavailable is None else ("model_unavailable", unavailable)
        )

    def open(self, avatar: LoadedAvatar, output_size: int) -> FallbackSession:
        def open_fallback() -> RendererSession:
            return self.fallback.open(avatar, output_size)

        with self._lock:
            down = self._down
        if down is not None:
            reason, why = down
            return FallbackSession(
                None, open_fallback, notice=RendererFallback(reason, f"{self.name} is not available ({why})")
            )
        assert self.primary is not None  # only None while down
        try:
            session = self.primary.open(avatar, output_size)
        except RendererCannotServe as error:
            logger.info("avatar %s drawn by %s: %s", avatar.manifest.id, self.fallback.name, error)
            return FallbackSession(None, open_fallback, notice=RendererFallback(error.reason, error.message))
        return FallbackSession(session, open_fallback, on_failure=self._failed)

    def status(self) -> list[RendererStatus]:
        with self._lock:
            down = self._down
        primary = RendererStatus(self.name, live=down is None, reason=None if down is None else down[1])
        return [primary, *self.fallback.status()]

    def close(self) -> None:
        if self.primary is not None:
            self.primary.close()
        self.fallback.close()

    def _failed(self, error: RendererCannotServe) -> None:
        """A session's device failed: new sessions go to the fallback until the server restarts."""
        if error.reason != "device_error":
            return
        with self._lock:
            if self._down is None:
                logger.error("%s is no longer live: %s; new sessions use %s", self.name, error, self.fallback.name)
                self._down = ("device_error", error.message)
