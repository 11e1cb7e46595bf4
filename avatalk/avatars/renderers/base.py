"""The interface every renderer honours (classic on CPU now, MuseTalk on GPU later).

A renderer turns reply audio into lip-synced frames of a prepared avatar, one
frame per 40 ms tick of the media clock (DESIGN.md sections 3 and 5), so
audio and mouth are aligned by construction. It is split in two because the
costs are split in two:

- ``Renderer`` is shared by the whole server. ``open`` precomputes whatever
  depends only on the avatar and the output size once, caches it (keyed by
  avatar) and hands out sessions; it is safe to call from several threads.
- ``RendererSession`` belongs to one conversation and holds what depends on
  the conversation's audio so far (level tracking, smoothing, audio
  context). Its methods block for a few milliseconds and are meant to be
  called from one worker thread at a time per session.

Tick ``k`` always shows the avatar's own frame ``cycle[k % len(cycle)]``,
whether the avatar is idle or speaking, so switching between ``idle_frame``
and ``render`` never jumps. Frames are RGB ``uint8`` arrays of shape
``(*output_shape, 3)``; they may be shared with other sessions and are
returned read-only.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np

from avatalk.avatars.store import LoadedAvatar
from avatalk.media.timebase import ENGINE_SAMPLE_RATE as RENDER_SAMPLE_RATE
from avatalk.media.timebase import SAMPLES_PER_TICK


class RendererUnavailable(NotImplementedError):
    """The renderer exists in the design but cannot run here (not built yet, or missing weights)."""


#: Why a session is drawn by the fallback renderer instead of the configured one: the avatar has
#: no latents yet, the GPU holds as many sessions as it can, the model did not load, the device failed.
FallbackReason = Literal["no_latents", "gpu_full", "model_unavailable", "device_error"]


class RendererCannotServe(RendererUnavailable):
    """This renderer cannot take this session now (``open`` raises it); another renderer should.

    Carries the ``reason`` the fallback reports, so the user and the metrics
    learn why the mouth is drawn by the classic renderer.
    """

    def __init__(self, reason: FallbackReason, message: str) -> None:
        super().__init__(message)
        self.reason: FallbackReason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class RendererFallback:
    """A session switched to the fallback renderer: why (a fixed code) and a sentence for people."""

    reason: FallbackReason
    message: str


@dataclass(frozen=True, slots=True)
class RendererStatus:
    """Whether a renderer can draw new sessions now, and if not, why (``/readyz``, ``avatalk doctor``)."""

    name: str
    live: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class SpeechSegment:
    """One segment of reply audio as the TTS produced it (a sentence or clause), placed on the tick grid.

    ``start`` is the 16 kHz sample of the session's timeline where its first
    sample plays (tick ``k`` starts at ``k * SAMPLES_PER_TICK``; a segment
    queued right after another may start inside a tick); ``audio`` is all of
    it, 16 kHz float32. Renderers whose frames depend on the whole utterance
    (MuseTalk runs Whisper over each segment as the official pipeline runs
    it over a clip) need the segment, not tick-sized slices. ``continues``
    marks the next piece of an utterance that arrives in pieces (a render
    session's streamed audio): it and the segment before it are one clip.
    """

    start: int
    audio: np.ndarray
    continues: bool = False

    @property
    def stop(self) -> int:
        """The sample after its last one."""
        return self.start + len(self.audio)


def output_shape_for(width: int, height: int, output_size: int) -> tuple[int, int]:
    """``(height, width)`` of a ``width`` x ``height`` frame scaled so its longer side is ``output_size``.

    Both sides are rounded to even numbers because video encoders (H.264 in
    4:2:0) reject odd sizes; ``output_size`` itself must therefore be even.
    """
    if output_size < 2 or output_size % 2:
        raise ValueError(f"output_size must be a positive even number of pixels, not {output_size}")
    scale = output_size / max(width, height)
    out_width = max(2, round(width * scale / 2) * 2)
    out_height = max(2, round(height * scale / 2) * 2)
    return out_height, out_width


def cycle_frame(avatar: LoadedAvatar, tick: int) -> int:
    """Index of the avatar frame shown at ``tick``: the ping-pong cycle, repeated forever."""
    return int(avatar.cycle[tick % len(avatar.cycle)])


def check_tick_audio(audio: np.ndarray) -> np.ndarray:
    """``audio`` as float32, after checking it is exactly one tick (640 samples at 16 kHz).

    A wrong length means the caller's slicing has drifted from the clock,
    which would silently desynchronise mouth and voice; failing loudly is
    the only safe answer.
    """
    samples = np.asarray(audio, dtype=np.float32)
    if samples.shape != (SAMPLES_PER_TICK,):
        raise ValueError(
            f"render() takes exactly one tick of mono audio: {SAMPLES_PER_TICK} samples at "
            f"{RENDER_SAMPLE_RATE} Hz, got an array of shape {samples.shape}"
        )
    return samples


T = TypeVar("T")


class AvatarDataCache(Generic[T]):
    """What a renderer precomputed per avatar and output size, for the most recent few.

    Keyed by the avatar's folder and creation time, so a re-prepared avatar is
    never served from stale data. Safe from several threads; the (slow) build
    runs outside the lock, and if two threads build the same entry the first
    one stored wins.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, avatar: LoadedAvatar, output_size: int, build: Callable[[], T]) -> T:
        key = (avatar.path, avatar.manifest.created_at, output_size)
        with self._lock:
            data = self._entries.get(key)
            if data is not None:
                self._entries.move_to_end(key)
                return data
        built = build()
        with self._lock:
            data = self._entries.setdefault(key, built)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return data


class RendererSession(ABC):
    """One conversation's view of an avatar: idle frames, speaking frames and audio state.

    ``render``, ``look_ahead`` and ``reset`` are not thread-safe: they block
    and are called from one worker thread at a time (the session's video
    stage, on the ``render`` executor). ``idle_frame`` is the exception: it
    must be a cheap lookup that is safe to call at any time, because a frame
    that is late is replaced by the idle frame on the event loop itself.

    Renderers that need more than a tick's audio to draw it (MuseTalk's
    Whisper features of the whole segment) set ``uses_look_ahead`` and
    implement ``look_ahead``; the video stage then passes them the reply
    segments queued, before each speaking tick.
    """

    #: Whether ``look_ahead`` wants the queued reply segments before each speaking tick.
    uses_look_ahead: bool = False

    @property
    @abstractmethod
    def output_shape(self) -> tuple[int, int]:
        """``(height, width)`` of every frame: the avatar frame scaled to the output size, both even."""

    @abstractmethod
    def idle_frame(self, tick: int) -> np.ndarray:
        """The avatar's own frame for ``tick`` (``cycle[tick % len(cycle)]``), mouth as in the source.

        Does not touch the audio state, and is cheap (a lookup of prepared
        frames): it is shown whenever no reply audio is queued or a frame is late.
        """

    def look_ahead(self, tick: int, segments: Sequence[SpeechSegment]) -> None:
        """The reply segments queued when ``tick`` is about to be drawn (called right before ``render``).

        ``segments`` are those of the current reply still (partly) to be
        played, in order; one that was announced before and is missing now
        was dropped (barge-in, a cleared queue). The default ignores them:
        renderers that draw each frame from its own tick of audio need
        nothing more.
        """

    @abstractmethod
    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        """The frame for ``tick`` with the mouth driven by ``audio``.

        ``audio`` is exactly this tick's 40 ms of reply audio at 16 kHz
        (``SAMPLES_PER_TICK`` float32 samples in [-1, 1]). The frame is built
        on the same cycle frame as ``idle_frame(tick)``, so idle and speaking
        ticks interleave seamlessly; silence gives the idle frame itself.
        """

    @abstractmethod
    def reset(self) -> None:
        """Forget all audio history (barge-in): the mouth is closed again from the next frame on."""

    def take_fallback(self) -> RendererFallback | None:
        """The switch to a fallback renderer this session made since the last call, reported once; else None.

        Safe to call from the event loop while a frame is drawn: the video
        stage polls it to tell the user (a ``warning`` event) and the metrics.
        """
        return None

    def close(self) -> None:
        """The conversation ended: release what the session holds (a GPU slot). Idempotent."""


class Renderer(ABC):
    """A lip-sync method, shared by every session of the server."""

    name: str

    @abstractmethod
    def open(self, avatar: LoadedAvatar, output_size: int) -> RendererSession:
        """A new session rendering ``avatar`` with its longer side scaled to ``output_size`` (even).

        Cheap once the avatar has been seen: per-avatar data is computed on
        the first call for that avatar and size, then cached on the renderer.
        Safe to call from several threads. Raises ``RendererCannotServe``
        when this renderer cannot take the session now.
        """

    def status(self) -> list[RendererStatus]:
        """Each renderer behind this one and whether it is live (a plain renderer: itself, live)."""
        return [RendererStatus(self.name, live=True)]

    def close(self) -> None:
        """Stop background work (worker threads); sessions still open get idle frames."""
