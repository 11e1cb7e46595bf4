"""The MuseTalk renderer: official v1.5 weights, one GPU scheduler shared by every session.

Per speaking tick a session takes the official audio features of the reply
segment the tick belongs to (``features.py``: each TTS segment is a clip,
run through Whisper as the official pipeline runs a clip), submits the
frame to the shared scheduler (``scheduler.py``, which batches frames of all
sessions through UNet + VAE decode by deadline) and pastes the generated
256 x 256 face back into the avatar's own frame with the v1.5 "jaw" blend
(``blending.py``), in the session's own worker thread. Silent ticks and
idle ticks show the avatar's frame as it is and never reach the GPU.

Timing. The video stage calls ``look_ahead(tick, segments)`` and then
``render(tick, audio)`` one tick (40 ms) before the tick is due, from a
worker thread, and the frame must be back by then. The segments are whole
sentences queued by the TTS, so:

- the first time a segment comes within ``look_ahead_ms`` of playback its
  features are computed at once (one Whisper pass per 30 s of it: a few
  milliseconds on a GPU), and its frames up to ``look_ahead_ms`` ahead are
  submitted with their own deadlines, batched with every other session's;
- ``render`` collects the frame. The first frame of a reply waits for its
  segment's features only, never for the rest of the reply.

A tick whose segment was never announced (``render`` without
``look_ahead``, as offline renders do) is drawn from the audio rendered so
far as if the clip ended there, the official recipe on the known part.

A frame not back in time is replaced by the idle frame and counted late;
``stats`` (and a warning in the log) tell when a session degrades, so an
overloaded GPU gives closed-mouth frames, never a stalled clock. A batch
that raises (a CUDA error) makes ``render`` raise ``RendererCannotServe``
(``device_error``), which the fallback renderer answers by drawing the
session with the classic renderer from then on.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    RendererCannotServe,
    RendererSession,
    SpeechSegment,
    check_tick_audio,
    cycle_frame,
    output_shape_for,
)
from avatalk.avatars.renderers.musetalk.blending import Paste, jaw_paste
from avatalk.avatars.renderers.musetalk.features import SAMPLES_PER_WHISPER_FRAME, ClipFeatures, WhisperFeatureEncoder
from avatalk.avatars.renderers.musetalk.generator import FrameGenerator
from avatalk.avatars.renderers.musetalk.latents import compute_latents, load_latents, store_latents
from avatalk.avatars.renderers.musetalk.loader import MuseTalkModels, load_musetalk
from avatalk.avatars.renderers.musetalk.scheduler import RenderScheduler
from avatalk.avatars.store import LoadedAvatar
from avatalk.config import MuseTalkSettings, Settings
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


@dataclass(frozen=True)
class _AvatarData:
    """An avatar ready for one output size: scaled frames, paste geometry and latents on the device."""

    frames: tuple[np.ndarray, ...]
    pastes: tuple[Paste | None, ...]
    latents: torch.Tensor  # (N, 8, 32, 32) on the device
    shape: tuple[int, int]


def _prepare_avatar(avatar: LoadedAvatar, output_size: int, latents: torch.Tensor) -> _AvatarData:
    """Scale the frames and compute each frame's jaw-mode paste once (repeated frames share them)."""
    height, width = avatar.frames[0].shape[:2]
    out_h, out_w = output_shape_for(width, height, output_size)
    scale = np.array([out_w / width, out_h / height])
    interpolation = cv2.INTER_AREA if out_w < width else cv2.INTER_LINEAR
    scaled: dict[int, np.ndarray] = {}
    pastes: dict[tuple[int, bytes], Paste | None] = {}
    frames_out: list[np.ndarray] = []
    pastes_out: list[Paste | None] = []
    for index, frame in enumerate(avatar.frames):
        image = scaled.get(id(frame))
        if image is None:
            image = frame
            if frame.shape[:2] != (out_h, out_w):
                image = cv2.resize(frame, (out_w, out_h), interpolation=interpolation)
            image.setflags(write=False)
            scaled[id(frame)] = image
        frames_out.append(image)
        key = (id(frame), avatar.boxes[index].tobytes())
        if key not in pastes:
            box = np.round(avatar.boxes[index].astype(np.float64) * np.tile(scale, 2)).astype(int)
            pastes[key] = jaw_paste(avatar.landmarks[index] * scale, box, (out_h, out_w))
            if pastes[key] is None:
                logger.warning("avatar %s frame %d: face box too small to paste into", avatar.manifest.id, index)
        pastes_out.append(pastes[key])
    return _AvatarData(tuple(frames_out), tuple(pastes_out), latents, (out_h, out_w))


def paste_face(frame: np.ndarray, face: np.ndarray, paste: Paste) -> np.ndarray:
    """``frame`` with the generated 256 x 256 ``face`` resized into the crop box and blended through alpha."""
    height, width = paste.alpha.shape[:2]
    resized = cv2.resize(face, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    region = frame[paste.rows, paste.cols].astype(np.float32)
    out = frame.copy()
    out[paste.rows, paste.cols] = np.clip(region + (resized - region) * paste.alpha + 0.5, 0.0, 255.0).astype(np.uint8)
    out.setflags(write=False)
    return out


class MuseTalkRenderer(Renderer):
    """MuseTalk v1.5 on one device; owns the models, the scheduler thread, per-avatar data and GPU slots.

    Loading the weights takes seconds and the scheduler thread runs until
    ``close``. ``models`` may be passed in (benchmarks, tests); otherwise
    they are loaded from ``settings.models_dir``. ``open`` refuses (with
    ``RendererCannotServe``) an avatar whose latents are not ready, starting
    their computation in the background, and a session beyond
    ``settings.max_sessions``: those sessions are the fallback renderer's.
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
        # Warm-up runs every batch size once: compilation and cuDNN's algorithm choice happen now,
        # and the scheduler starts with a measured cost for each size (a CPU learns them as it goes).
        self.scheduler = RenderScheduler(
            self.generator,
            max_batch=self.settings.max_batch,
            batch_window_s=self.settings.batch_window_ms / 1000,
            warmup=self.generator.compiled or self.models.device.type == "cuda",
            urgent_s=self.settings.frame_budget_ms / 1000,
        )
        self._max_avatars = max_avatars
        self._cache: AvatarDataCache[_AvatarData] = AvatarDataCache(max_avatars)
        self._latents: OrderedDict[tuple[Path, datetime], torch.Tensor] = OrderedDict()
        self._preparing: dict[tuple[Path, datetime], Future[torch.Tensor]] = {}
        self._latents_worker = ThreadPoolExecutor(1, thread_name_prefix="musetalk-latents")
        self._lock = threading.Lock()
        self._sessions = 0

    @property
    def sessions(self) -> int:
        """Sessions open now (each holds one of ``settings.max_sessions`` slots)."""
        with self._lock:
            return self._sessions

    def open(self, avatar: LoadedAvatar, output_size: int) -> MuseTalkSession:
        with self._lock:
            if self._sessions >= self.settings.max_sessions:
                raise RendererCannotServe(
                    "gpu_full",
                    f"the GPU already draws {self._sessions} sessions, its limit (AVATALK_MUSETALK__MAX_SESSIONS)",
                )
            self._sessions += 1
        try:
            latents = self._ready_latents(avatar)
            data = self._cache.get(avatar, output_size, lambda: _prepare_avatar(avatar, output_size, latents))
        except BaseException:
            self._release()
            raise
        session = MuseTalkSession(avatar, data, self.scheduler, self.models.audio, self.settings)
        # The slot is freed by close(), or when a session nobody closed is collected (offline renders).
        session.release = weakref.finalize(session, self._release)
        return session

    def prepare(self, avatar: LoadedAvatar) -> None:
        """Compute and store the avatar's latents now if they are missing (blocks; seconds on a GPU)."""
        self._latents_future(avatar).result()

    def close(self) -> None:
        """Stop the scheduler; sessions still rendering get idle frames."""
        self.scheduler.close()
        self._latents_worker.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        with self._lock:
            self._sessions -= 1

    def _ready_latents(self, avatar: LoadedAvatar) -> torch.Tensor:
        """The avatar's latents on the device, or ``RendererCannotServe`` while they are being computed."""
        key = (avatar.path, avatar.manifest.created_at)
        with self._lock:
            cached = self._latents.get(key)
        if cached is not None:
            return cached
        stored = load_latents(avatar, self.models.vae_id)
        if stored is not None:
            return self._keep(key, stored)
        self._latents_future(avatar)
        raise RendererCannotServe(
            "no_latents", f"avatar {avatar.manifest.id!r} has no MuseTalk latents yet; they are being computed"
        )

    def _latents_future(self, avatar: LoadedAvatar) -> Future[torch.Tensor]:
        """The computation of the avatar's latents: the one running, or a new one (a failed one is retried)."""
        key = (avatar.path, avatar.manifest.created_at)
        with self._lock:
            future = self._preparing.get(key)
            if future is None or (future.done() and future.exception() is not None):
                future = self._preparing[key] = self._latents_worker.submit(self._compute_latents, avatar)
                future.add_done_callback(lambda done: self._computed(key, done))
        return future

    def _computed(self, key: tuple[Path, datetime], future: Future[torch.Tensor]) -> None:
        """A finished computation is forgotten (its latents are in the cache and the avatar folder); a failed one
        stays, so the next ``open`` retries it."""
        if not future.cancelled() and future.exception() is None:
            with self._lock:
                if self._preparing.get(key) is future:
                    del self._preparing[key]

    def _compute_latents(self, avatar: LoadedAvatar) -> torch.Tensor:
        key = (avatar.path, avatar.manifest.created_at)
        stored = load_latents(avatar, self.models.vae_id)
        if stored is not None:
            return self._keep(key, stored)
        started = time.perf_counter()
        latents = compute_latents(avatar, self.models.vae, batch_size=self.settings.latents_batch)
        logger.info(
            "computed MuseTalk latents of avatar %s (%d frames) in %.1f s",
            avatar.manifest.id,
            len(latents),
            time.perf_counter() - started,
        )
        try:
            store_latents(avatar, latents, self.models.vae_id)
        except (OSError, RuntimeError) as error:
            logger.warning("could not store the latents of avatar %s (%s); kept in memory", avatar.manifest.id, error)
        return self._keep(key, latents)

    def _keep(self, key: tuple[Path, datetime], latents: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(latents).to(self.models.device, self.models.dtype)
        with self._lock:
            tensor = self._latents.setdefault(key, tensor)
            self._latents.move_to_end(key)
            while len(self._latents) > self._max_avatars:
                self._latents.popitem(last=False)
        return tensor


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
        data: _AvatarData,
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
