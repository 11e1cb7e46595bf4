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
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from avatalk.avatars.renderers.base import AvatarDataCache, Renderer, RendererCannotServe
from avatalk.avatars.renderers.musetalk.avatar_data import AvatarData, prepare_avatar
from avatalk.avatars.renderers.musetalk.generator import FrameGenerator
from avatalk.avatars.renderers.musetalk.latents import compute_latents, load_latents, store_latents
from avatalk.avatars.renderers.musetalk.loader import MuseTalkModels, load_musetalk
from avatalk.avatars.renderers.musetalk.scheduler import RenderScheduler
from avatalk.avatars.renderers.musetalk.session import MuseTalkSession
from avatalk.avatars.store import LoadedAvatar
from avatalk.config import MuseTalkSettings, Settings

logger = logging.getLogger(__name__)


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
        self._cache: AvatarDataCache[AvatarData] = AvatarDataCache(max_avatars)
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
            data = self._cache.get(avatar, output_size, lambda: prepare_avatar(avatar, output_size, latents))
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
