"""The MuseTalk renderer: official v1.5 weights, one GPU scheduler shared by every session.

Per speaking tick a session turns the reply audio into MuseTalk's audio
features (``features.py``), submits the frame to the shared scheduler
(``scheduler.py``, which batches frames of all sessions through UNet + VAE
decode) and pastes the generated 256 x 256 face back into the avatar's own
frame through the avatar's feathered blend mask, in the session's own
worker thread. Silent ticks and idle ticks show the avatar's frame as it
is and never reach the GPU.

Timing. The clock calls ``render(tick, audio)`` one tick (40 ms) before the
tick is due, from a worker thread, and the frame must be back by then. A
frame's audio features need 120 ms of audio after it (plus the encoder's
right context), which one tick of audio does not give. Two ways in:

- ``render`` alone (what the clock does today): the frame is computed as if
  the clip ended with the audio known so far, i.e. with a reduced right
  context, and must be generated within ``frame_budget_ms`` of the call.
  No added latency, a less accurate mouth.
- ``look_ahead(tick, audio)`` first, with this tick's audio and the queued
  audio after it (the clock has it: TTS queues whole sentences): frames are
  generated up to ``look_ahead_ms`` ahead with full context, batched across
  sessions, and ``render`` just collects them. Still no added latency; only
  the last few frames before the queue runs dry are computed with the
  reduced context, like a clip end.

A frame not back in time is replaced by the idle frame and counted late;
``stats`` (and a warning in the log) tell when a session degrades, so an overloaded GPU gives closed-mouth frames, never a stalled
clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import torch

from avatalk.avatars.renderers.base import (
    SAMPLES_PER_TICK,
    AvatarDataCache,
    Renderer,
    RendererSession,
    check_tick_audio,
    cycle_frame,
    output_shape_for,
)
from avatalk.avatars.renderers.musetalk.features import (
    BLOCKS_AFTER,
    HOP_LENGTH,
    N_FFT,
    SAMPLES_PER_WHISPER_FRAME,
    AudioFeatureStream,
    WhisperFeatureEncoder,
)
from avatalk.avatars.renderers.musetalk.generator import FrameGenerator
from avatalk.avatars.renderers.musetalk.latents import compute_latents, load_latents, store_latents
from avatalk.avatars.renderers.musetalk.loader import MuseTalkModels, load_musetalk
from avatalk.avatars.renderers.musetalk.scheduler import RenderScheduler
from avatalk.avatars.store import LoadedAvatar
from avatalk.config import MuseTalkSettings, Settings
from avatalk.media.timebase import TICK_S

logger = logging.getLogger(__name__)

#: Whisper frames of context are set in milliseconds; one Whisper frame is 20 ms.
_MS_PER_WHISPER_FRAME = 20
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
    failed: int = 0  # frames whose batch raised (shown idle too)
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class _Paste:
    """Where a generated face goes in one output frame, and how much of it shows."""

    rows: slice
    cols: slice
    alpha: np.ndarray  # float32 (h, w, 1): the blend mask stretched to the box


@dataclass(frozen=True)
class _AvatarData:
    """An avatar ready for one output size: scaled frames, paste geometry and latents on the device."""

    frames: tuple[np.ndarray, ...]
    pastes: tuple[_Paste | None, ...]
    latents: torch.Tensor  # (N, 8, 32, 32) on the device
    shape: tuple[int, int]


def _prepare_avatar(avatar: LoadedAvatar, output_size: int, latents: torch.Tensor) -> _AvatarData:
    """Scale the frames and compute each frame's paste box and mask once (repeated frames share them)."""
    height, width = avatar.frames[0].shape[:2]
    out_h, out_w = output_shape_for(width, height, output_size)
    sx, sy = out_w / width, out_h / height
    interpolation = cv2.INTER_AREA if out_w < width else cv2.INTER_LINEAR
    scaled: dict[int, np.ndarray] = {}
    pastes: dict[tuple[int, bytes], _Paste | None] = {}
    frames_out: list[np.ndarray] = []
    pastes_out: list[_Paste | None] = []
    for index, frame in enumerate(avatar.frames):
        image = scaled.get(id(frame))
        if image is None:
            if frame.shape[:2] == (out_h, out_w):
                image = frame
            else:
                image = cv2.resize(frame, (out_w, out_h), interpolation=interpolation)
            image.setflags(write=False)
            scaled[id(frame)] = image
        frames_out.append(image)
        mask, box = avatar.masks[index], avatar.boxes[index]
        key = (id(mask), box.tobytes())
        if key not in pastes:
            x1, y1, x2, y2 = np.round(box.astype(np.float64) * np.array([sx, sy, sx, sy])).astype(int)
            x1, x2 = max(0, x1), min(out_w, x2)
            y1, y2 = max(0, y1), min(out_h, y2)
            if x2 - x1 < 2 or y2 - y1 < 2:
                pastes[key] = None
                logger.warning("avatar %s frame %d: face box too small to paste into", avatar.manifest.id, index)
            else:
                alpha = cv2.resize(mask, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
                alpha = (alpha.astype(np.float32) / 255.0)[..., None]
                alpha.setflags(write=False)
                pastes[key] = _Paste(slice(y1, y2), slice(x1, x2), alpha)
        pastes_out.append(pastes[key])
    return _AvatarData(tuple(frames_out), tuple(pastes_out), latents, (out_h, out_w))


def paste_face(frame: np.ndarray, face: np.ndarray, paste: _Paste) -> np.ndarray:
    """``frame`` with the generated 256 x 256 ``face`` resized into the box and blended through the mask."""
    height, width = paste.alpha.shape[:2]
    resized = cv2.resize(face, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    region = frame[paste.rows, paste.cols].astype(np.float32)
    out = frame.copy()
    out[paste.rows, paste.cols] = np.clip(region + (resized - region) * paste.alpha + 0.5, 0.0, 255.0).astype(np.uint8)
    out.setflags(write=False)
    return out


class MuseTalkRenderer(Renderer):
    """MuseTalk v1.5 on one device; owns the models, the scheduler thread and per-avatar data.

    Loading the weights takes seconds and the scheduler thread runs until
    ``close``. ``models`` may be passed in (benchmarks, tests); otherwise
    they are loaded from ``settings.models_dir``.
    """

    name = "musetalk"

    def __init__(
        self, settings: MuseTalkSettings | None = None, *, models: MuseTalkModels | None = None, max_avatars: int = 4
    ) -> None:
        self.settings = settings or Settings().musetalk
        self.models = models or load_musetalk(
            self.settings.models_dir, device=self.settings.device, dtype=self.settings.dtype
        )
        self.generator = FrameGenerator(
            self.models,
            compile=self.settings.compile,
            channels_last=self.settings.channels_last,
            max_batch=self.settings.max_batch,
        )
        self.scheduler = RenderScheduler(
            self.generator,
            max_batch=self.settings.max_batch,
            batch_window_s=self.settings.batch_window_ms / 1000,
            warmup=self.generator.compiled,
        )
        self._max_avatars = max_avatars
        self._cache: AvatarDataCache[_AvatarData] = AvatarDataCache(max_avatars)
        self._latents: OrderedDict[tuple[Path, datetime], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, avatar: LoadedAvatar, output_size: int) -> MuseTalkSession:
        data = self._cache.get(
            avatar, output_size, lambda: _prepare_avatar(avatar, output_size, self._avatar_latents(avatar))
        )
        return MuseTalkSession(avatar, data, self.scheduler, self.models.audio, self.settings)

    def close(self) -> None:
        """Stop the scheduler; sessions still rendering get idle frames."""
        self.scheduler.close()

    def _avatar_latents(self, avatar: LoadedAvatar) -> torch.Tensor:
        """The avatar's latents on the device: stored ones, or computed now and stored for next time."""
        key = (avatar.path, avatar.manifest.created_at)
        with self._lock:
            cached = self._latents.get(key)
        if cached is not None:
            return cached
        models = self.models
        latents = load_latents(avatar, models.vae_id)
        if latents is None:
            started = time.perf_counter()
            latents = compute_latents(avatar, models.vae, batch_size=self.settings.latents_batch)
            logger.info(
                "computed MuseTalk latents of avatar %s (%d frames) in %.1f s",
                avatar.manifest.id,
                len(latents),
                time.perf_counter() - started,
            )
            try:
                store_latents(avatar, latents, models.vae_id)
            except (OSError, RuntimeError) as error:
                logger.warning("could not store the latents of avatar %s (%s); kept in memory", avatar.manifest.id, error)
        tensor = torch.from_numpy(latents).to(models.device, models.dtype)
        with self._lock:
            tensor = self._latents.setdefault(key, tensor)
            self._latents.move_to_end(key)
            while len(self._latents) > self._max_avatars:
                self._latents.popitem(last=False)
        return tensor


@dataclass(slots=True)
class _Pending:
    future: Future[np.ndarray | None]
    deadline: float


class MuseTalkSession(RendererSession):
    """One conversation rendered with MuseTalk: the speech segment's audio, frames in flight, health.

    Called from one worker thread at a time (the session's video stage).
    ``look_ahead_ticks`` is how much upcoming audio ``look_ahead`` can use.
    """

    def __init__(
        self,
        avatar: LoadedAvatar,
        data: _AvatarData,
        scheduler: RenderScheduler,
        encoder: WhisperFeatureEncoder,
        settings: MuseTalkSettings,
    ) -> None:
        self._avatar = avatar
        self._data = data
        self._scheduler = scheduler
        self._encoder = encoder
        self._left = settings.context_left_ms // _MS_PER_WHISPER_FRAME
        self._right = settings.context_right_ms // _MS_PER_WHISPER_FRAME
        self._budget_s = settings.frame_budget_ms / 1000
        self._horizon = settings.look_ahead_ms // round(TICK_S * 1000)
        self._silence_power: float = 10.0 ** (settings.silence_db / 10.0)
        # Ticks of audio after a frame's own that make it ready: the blocks of the 2 ticks after
        # it, whose windows reach `right` Whisper frames further, whose last mel frame reads
        # half an STFT window beyond its centre (3 ticks for right = 0).
        context = self._right * SAMPLES_PER_WHISPER_FRAME + N_FFT // 2 - HOP_LENGTH
        self.context_ticks = BLOCKS_AFTER + math.ceil(context / SAMPLES_PER_TICK)
        self.look_ahead_ticks = self._horizon + self.context_ticks
        self.stats = RenderStats()
        self._stream: AudioFeatureStream | None = None
        self._start = 0  # tick of the segment's first audio
        self._next = 0  # first segment frame not yet submitted or skipped
        self._pending: dict[int, _Pending] = {}
        self._anchor = (0, 0.0)  # (tick, time render(tick) is called)
        self._recent: deque[bool] = deque(maxlen=_HEALTH_WINDOW)

    @property
    def output_shape(self) -> tuple[int, int]:
        return self._data.shape

    def idle_frame(self, tick: int) -> np.ndarray:
        return self._data.frames[cycle_frame(self._avatar, tick)]

    def look_ahead(self, tick: int, audio: np.ndarray) -> None:
        """Reply audio from ``tick`` on, known before it is played: generate its frames early.

        Call it right before ``render(tick, ...)`` with that tick's audio
        followed by the queued audio after it (whole ticks; a partial last
        tick is ignored). Audio that differs from what an earlier call said
        (the queue was cleared and refilled) replaces it.
        """
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        ticks = len(samples) // SAMPLES_PER_TICK
        if ticks == 0:
            return
        self._anchor = (tick, time.monotonic())
        self._attach(tick, samples[: ticks * SAMPLES_PER_TICK])
        self._submit_ready()

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        samples = check_tick_audio(audio)
        now = time.monotonic()
        self._anchor = (tick, now)
        self.stats.frames += 1
        self._attach(tick, samples)
        self._submit_ready()
        stream = self._stream
        assert stream is not None
        frame = tick - self._start
        for skipped in [t for t in self._pending if t < tick]:  # ticks the caller never asked for
            self._pending.pop(skipped).future.cancel()
        pending = self._pending.pop(tick, None)
        try:
            if self._silent(samples):
                if pending is not None:
                    pending.future.cancel()
                self.stats.silent += 1
                return self.idle_frame(tick)
            if pending is None:
                features = stream.features([frame], provisional=True)[0]
                pending = self._submit(tick, features, now + self._budget_s)
                self._next = max(self._next, frame + 1)
            return self._collect(tick, pending)
        finally:
            stream.release(frame + 1)

    def reset(self) -> None:
        self._end_segment()

    # --- internals ----------------------------------------------------------------

    def _silent(self, samples: np.ndarray) -> bool:
        return float(np.mean(np.square(samples, dtype=np.float64))) < self._silence_power

    def _end_segment(self) -> None:
        for pending in self._pending.values():
            pending.future.cancel()
        self._pending.clear()
        self._stream = None

    def _attach(self, tick: int, samples: np.ndarray) -> None:
        """Make ``samples`` (whole ticks from ``tick`` on) part of the segment, starting a new one if needed.

        The segment continues while ticks follow each other; a gap (idle
        ticks between sentences), a jump back or audio that contradicts
        what was known starts a new segment, as a new clip.
        """
        stream = self._stream
        ticks = len(samples) // SAMPLES_PER_TICK
        known = 0
        if stream is not None and self._start <= tick <= self._start + stream.known_blocks:
            offset = (tick - self._start) * SAMPLES_PER_TICK
            known = min(ticks, stream.known_blocks - (tick - self._start))
            if known and not np.array_equal(
                stream.samples(offset, offset + known * SAMPLES_PER_TICK), samples[: known * SAMPLES_PER_TICK]
            ):
                stream, known = None, 0
        else:
            stream = None
        if stream is None:
            self._end_segment()
            stream = self._stream = AudioFeatureStream(self._encoder, left=self._left, right=self._right)
            self._start, self._next = tick, 0
        if known < ticks:
            stream.push(samples[known * SAMPLES_PER_TICK :])

    def _submit_ready(self) -> None:
        """Submit the frames whose full audio context is known, up to the look-ahead horizon."""
        stream = self._stream
        if stream is None:
            return
        anchor_tick, anchor_time = self._anchor
        first = max(self._next, anchor_tick - self._start)  # never frames of ticks already played
        stop = min(stream.ready_frames(), anchor_tick + self._horizon + 1 - self._start)
        frames = []
        for frame in range(first, stop):
            audio = stream.samples(frame * SAMPLES_PER_TICK, (frame + 1) * SAMPLES_PER_TICK)
            if not self._silent(audio):
                frames.append(frame)
        self._next = max(self._next, stop)
        if not frames:
            return
        for frame, features in zip(frames, stream.features(frames), strict=True):
            tick = self._start + frame
            call_time = anchor_time + (tick - anchor_tick) * TICK_S
            self._pending[tick] = self._submit(tick, features, call_time + self._budget_s)

    def _submit(self, tick: int, features: np.ndarray, deadline: float) -> _Pending:
        latents = self._data.latents[cycle_frame(self._avatar, tick)]
        return _Pending(self._scheduler.submit(latents, features, deadline), deadline)

    def _collect(self, tick: int, pending: _Pending) -> np.ndarray:
        """Wait for the generated face until the deadline and paste it; the idle frame if it does not come."""
        face: np.ndarray | None = None
        try:
            face = pending.future.result(timeout=max(0.0, pending.deadline - time.monotonic()))
        except FutureTimeout:
            pending.future.cancel()
        except Exception:  # the batch failed; the scheduler logged it
            self.stats.failed += 1
            return self.idle_frame(tick)
        index = cycle_frame(self._avatar, tick)
        paste = self._data.pastes[index]
        if face is None:
            self.stats.late += 1
            self._record(on_time=False)
            return self.idle_frame(tick)
        self._record(on_time=True)
        self.stats.generated += 1
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

