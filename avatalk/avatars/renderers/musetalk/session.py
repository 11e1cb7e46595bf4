"""A MuseTalk session (``MuseTalkSession``): its reply clips, frames in flight at the scheduler, health.

How a session times its frames is told in ``renderer.py``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from avatalk.avatars.renderers.base import (
    SAMPLES_PER_TICK,
    RendererCannotServe,
    RendererSession,
    SpeechSegment,
    check_tick_audio,
    cycle_frame,
)
from avatalk.avatars.renderers.musetalk.avatar_data import AvatarData, paste_face
from avatalk.avatars.renderers.musetalk.features import SAMPLES_PER_WHISPER_FRAME, ClipFeatures, WhisperFeatureEncoder
from avatalk.avatars.renderers.musetalk.scheduler import RenderScheduler
from avatalk.avatars.store import LoadedAvatar
from avatalk.config import MuseTalkSettings
from avatalk.media.timebase import TICK_MS, TICK_S

logger = logging.getLogger(__name__)


#: Health: a session is degraded after this many late frames among the last ``_HEALTH_WINDOW``
#: generated ones, and recovers after ``_HEALTH_WINDOW`` on-time frames in a row.
_HEALTH_WINDOW = 25
_DEGRADED_AFTER = 3


@dataclass
class RenderStats:
    """Counters of one session; ``degraded`` is set while frames keep coming late."""

    frames: int = 0  # render() calls
    generated: int = 0  # frames with a generated mouth
    silent: int = 0  # ticks quiet enough to show the idle frame
    late: int = 0  # idle frames shown because the generated one was not ready in time
    failed: int = 0  # frames whose batch raised
    degraded: bool = False


class _Clip:
    """One clip the official recipe runs on: a reply segment, or an utterance whose pieces arrive one by one.

    Knows where it plays on the session's timeline, its audio so far, the
    queued pieces it was assembled from (to recognise them when they are
    announced again) and its Whisper states.
    """

    def __init__(self, start: int, audio: np.ndarray, encoder: WhisperFeatureEncoder) -> None:
        self.start = start
        self.pieces: dict[int, np.ndarray] = {start: audio}
        self._audio = np.array(audio, dtype=np.float32)
        self._length = len(audio)
        self._features = ClipFeatures(encoder)

    @property
    def stop(self) -> int:
        return self.start + self._length

    @property
    def audio(self) -> np.ndarray:
        return self._audio[: self._length]

    def append(self, audio: np.ndarray) -> None:
        """The next piece of the utterance, starting where the clip ends (the buffer grows by doubling)."""
        needed = self._length + len(audio)
        if needed > len(self._audio):
            grown = np.zeros(max(needed, 2 * len(self._audio)), np.float32)
            grown[: self._length] = self.audio
            self._audio = grown
        self.pieces[self.stop] = audio
        self._audio[self._length : needed] = audio
        self._length = needed

    def overlap(self, tick: int) -> int:
        """Samples of this clip in ``tick``."""
        first = tick * SAMPLES_PER_TICK
        return max(0, min(self.stop, first + SAMPLES_PER_TICK) - max(self.start, first))

    def tick_audio(self, tick: int, out: np.ndarray) -> None:
        """Write this clip's samples of ``tick`` into ``out`` (one tick long)."""
        first = tick * SAMPLES_PER_TICK
        lo, hi = max(self.start, first), min(self.stop, first + SAMPLES_PER_TICK)
        if lo < hi:
            out[lo - first : hi - first] = self.audio[lo - self.start : hi - self.start]

    def features(self, ticks: list[int]) -> np.ndarray:
        """The UNet's audio features of ``ticks`` from this clip as known now (encoded when it has grown).

        Tick ``t`` takes the ten Whisper frames from the one nearest to where
        it starts in the clip: frame ``i`` of a clip that starts on a tick
        is exactly the official frame ``i`` (``[2i - 4, 2i + 6)``).
        """
        self._features.update(self.audio)
        half = SAMPLES_PER_WHISPER_FRAME // 2
        starts = [(tick * SAMPLES_PER_TICK - self.start + half) // SAMPLES_PER_WHISPER_FRAME for tick in ticks]
        return self._features.windows(starts)


@dataclass(slots=True)
class _Pending:
    future: Future[np.ndarray | None]
    deadline: float
    clip: _Clip


class MuseTalkSession(RendererSession):
    """One conversation rendered with MuseTalk: its reply clips, frames in flight, health.

    Called from one worker thread at a time (the session's video stage).
    """

    uses_look_ahead = True

    def __init__(
        self,
        avatar: LoadedAvatar,
        data: AvatarData,
        scheduler: RenderScheduler,
        encoder: WhisperFeatureEncoder,
        settings: MuseTalkSettings,
    ) -> None:
        self._avatar = avatar
        self._data = data
        self._scheduler = scheduler
        self._encoder = encoder
        self._budget_s = settings.frame_budget_ms / 1000
        self._horizon = settings.look_ahead_ms // TICK_MS
        self._silence_power: float = 10.0 ** (settings.silence_db / 10.0)
        self.stats = RenderStats()
        #: Frees this session's GPU slot (set by the renderer; called by ``close``).
        self.release: Callable[[], object] = lambda: None
        self._clips: list[_Clip] = []  # announced by look_ahead, in order
        self._unannounced: _Clip | None = None  # the audio render() was given without look_ahead
        self._pending: dict[int, _Pending] = {}
        self._anchor = (0, 0.0)  # (tick, time render(tick) is called)
        self._recent: deque[bool] = deque(maxlen=_HEALTH_WINDOW)

    @property
    def output_shape(self) -> tuple[int, int]:
        return self._data.shape

    def idle_frame(self, tick: int) -> np.ndarray:
        return self._data.frames[cycle_frame(self._avatar, tick)]

    def look_ahead(self, tick: int, segments: Sequence[SpeechSegment]) -> None:
        """The queued reply segments: compute the features of those about to play and submit their frames early."""
        self._anchor = (tick, time.monotonic())
        self._update_clips(tick, segments)
        self._submit_ahead(tick)

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        samples = check_tick_audio(audio)
        now = time.monotonic()
        self._anchor = (tick, now)
        self.stats.frames += 1
        for skipped in [t for t in self._pending if t < tick]:  # ticks the caller never asked for
            self._pending.pop(skipped).future.cancel()
        pending = self._pending.pop(tick, None)
        if self._silent(samples):
            if pending is not None:
                pending.future.cancel()
            self._unannounced = None
            self.stats.silent += 1
            return self.idle_frame(tick)
        if pending is None:
            clip = self._owner(tick)
            if clip is None:
                clip = self._unannounced_clip(tick, samples)
            pending = self._submit(tick, clip.features([tick])[0], now + self._budget_s, clip)
        return self._collect(tick, pending)

    def reset(self) -> None:
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        self._clips = []
        self._unannounced = None

    def close(self) -> None:
        self.reset()
        self.release()

    # --- internals ----------------------------------------------------------------

    def _silent(self, samples: np.ndarray) -> bool:
        return float(np.mean(np.square(samples, dtype=np.float64))) < self._silence_power

    def _update_clips(self, tick: int, announced: Sequence[SpeechSegment]) -> None:
        """Take the queued segments as the truth; frames made for clips that are gone are cancelled.

        A segment announced before keeps its clip (and its features); one
        that ``continues`` the segment before it grows that clip. A known clip
        no longer announced is kept only while it still covers this tick (the
        clock took its last audio off the queue); otherwise it was dropped
        (barge-in, a refilled queue).
        """
        known = {start: clip for clip in self._clips for start in clip.pieces}
        clips: list[_Clip] = []
        previous: _Clip | None = None
        for segment in announced:
            if not len(segment.audio):
                continue
            clip = known.get(segment.start)
            if clip is not None and _same(clip.pieces[segment.start], segment.audio):
                pass
            elif segment.continues and (grown := self._continued(segment.start, previous)) is not None:
                grown.append(segment.audio)
                clip = grown
            else:
                clip = _Clip(segment.start, segment.audio, self._encoder)
            if clip not in clips:
                clips.append(clip)
            previous = clip
        clips += [clip for clip in self._clips if clip not in clips and clip.overlap(tick)]
        self._clips = sorted(clips, key=lambda clip: clip.start)
        for ticked, pending in list(self._pending.items()):
            if self._owner(ticked) is not pending.clip:
                pending.future.cancel()
                del self._pending[ticked]

    def _continued(self, start: int, previous: _Clip | None) -> _Clip | None:
        """The clip a continuing segment starting at ``start`` belongs to: the one that ends there."""
        if previous is not None and previous.stop == start:
            return previous
        return next((clip for clip in self._clips if clip.stop == start), None)

    def _owner(self, tick: int) -> _Clip | None:
        """The clip a tick's frame is drawn from: the one with most audio in it (the later one on a tie)."""
        best, most = None, 0
        for clip in self._clips:
            overlap = clip.overlap(tick)
            if overlap and overlap >= most:
                best, most = clip, overlap
        return best

    def _submit_ahead(self, tick: int) -> None:
        """Submit the speaking frames of announced clips from ``tick`` up to the look-ahead horizon."""
        anchor_tick, anchor_time = self._anchor
        by_clip: dict[int, tuple[_Clip, list[int]]] = {}
        for ahead in range(tick, tick + self._horizon + 1):
            if ahead in self._pending:
                continue
            clip = self._owner(ahead)
            if clip is None or self._silent(self._tick_audio(ahead)):
                continue
            by_clip.setdefault(id(clip), (clip, []))[1].append(ahead)
        for clip, ticks in by_clip.values():  # the clip of this tick first: its frame is due soonest
            for ahead, features in zip(ticks, clip.features(ticks), strict=True):
                call_time = anchor_time + (ahead - anchor_tick) * TICK_S
                self._pending[ahead] = self._submit(ahead, features, call_time + self._budget_s, clip)

    def _tick_audio(self, tick: int) -> np.ndarray:
        """The tick's audio as the announced clips place it (what ``render`` will be given)."""
        out = np.zeros(SAMPLES_PER_TICK, np.float32)
        for clip in self._clips:
            clip.tick_audio(tick, out)
        return out

    def _unannounced_clip(self, tick: int, samples: np.ndarray) -> _Clip:
        """The clip of a tick no segment announced: the audio rendered so far, ticks that follow each other."""
        clip = self._unannounced
        if clip is None or clip.stop != tick * SAMPLES_PER_TICK:
            clip = self._unannounced = _Clip(tick * SAMPLES_PER_TICK, samples, self._encoder)
        else:
            clip.append(samples)
        return clip

    def _submit(self, tick: int, features: np.ndarray, deadline: float, clip: _Clip) -> _Pending:
        latents = self._data.latents[cycle_frame(self._avatar, tick)]
        return _Pending(self._scheduler.submit(latents, features, deadline), deadline, clip)

    def _collect(self, tick: int, pending: _Pending) -> np.ndarray:
        """Wait for the generated face until the deadline and paste it; the idle frame if it does not come.

        A batch that raised means the device failed: ``RendererCannotServe``
        (``device_error``), so the session is handed to the fallback renderer.
        """
        face: np.ndarray | None = None
        try:
            face = pending.future.result(timeout=max(0.0, pending.deadline - time.monotonic()))
        except FutureTimeout:
            pending.future.cancel()
        except Exception as error:  # the batch failed on the device; the scheduler logged it
            self.stats.failed += 1
            raise RendererCannotServe("device_error", f"the GPU failed: {type(error).__name__}: {error}") from error
        index = cycle_frame(self._avatar, tick)
        if face is None:
            self.stats.late += 1
            self._record(on_time=False)
            return self.idle_frame(tick)
        self._record(on_time=True)
        self.stats.generated += 1
        paste = self._data.pastes[index]
        if paste is None:
            return self.idle_frame(tick)
        return paste_face(self._data.frames[index], face, paste)

    def _record(self, *, on_time: bool) -> None:
        self._recent.append(on_time)
        late = self._recent.count(False)
        if not self.stats.degraded and late >= _DEGRADED_AFTER:
            self.stats.degraded = True
            logger.warning(
                "musetalk session degraded: %d of the last %d frames were late (GPU overloaded?)",
                late,
                len(self._recent),
            )
        elif self.stats.degraded and late == 0 and len(self._recent) == _HEALTH_WINDOW:
            self.stats.degraded = False
            logger.info("musetalk session recovered: the last %d frames were on time", _HEALTH_WINDOW)


def _same(known: np.ndarray, announced: np.ndarray) -> bool:
    """Whether an announced segment is the one known (the clock passes the same array each time)."""
    return known is announced or (len(known) == len(announced) and np.array_equal(known, announced))
