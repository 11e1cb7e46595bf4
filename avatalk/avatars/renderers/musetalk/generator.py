"""UNet + VAE decode for a batch of frames: the one GPU-heavy step of real-time MuseTalk.

Per frame (musetalk-notes.md, "One frame"): the avatar frame's masked and
reference latents (precomputed, 8 x 32 x 32) and the audio features (50 x
384) go through the UNet once at timestep 0; the output latent is scaled
back and decoded by the VAE to a 256 x 256 face, returned as uint8 RGB. The
decoder is about 78 % of the work, which is why frames of every session are
batched into one call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from avatalk.avatars.renderers.musetalk.loader import MuseTalkModels
from avatalk.config import CompileMode

logger = logging.getLogger(__name__)

#: Batch sizes a compiled generator is specialised for; other sizes are padded up to one of
#: them, so torch.compile (and CUDA graph capture) happens a bounded number of times.
_BUCKETS = (1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class FrameGenerator:
    """Generates mouth crops from latents and audio features, a batch at a time.

    Not thread-safe: one scheduler thread owns it. ``batches`` and
    ``frames`` count the work done (the UNet runs once per batch).
    """

    def __init__(
        self, models: MuseTalkModels, *, compile: CompileMode = "off", channels_last: bool = True, max_batch: int = 16
    ) -> None:
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.max_batch = max_batch
        # Channels-last feeds the tensor cores; on a CPU it mostly makes convolutions slower.
        self.memory_format = (
            torch.channels_last if channels_last and self.device.type == "cuda" else torch.contiguous_format
        )
        networks: tuple[torch.nn.Module, ...] = (models.unet, models.vae)
        for network in networks:
            network.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # missing from torch's stubs
        self._inverse_scale = 1.0 / float(models.vae.config["scaling_factor"])
        self._timestep = torch.zeros((), device=self.device, dtype=torch.long)
        self.compiled = compile != "off"
        self._forward = torch.compile(self._run, mode=compile, dynamic=False) if self.compiled else self._run
        self._buckets = tuple(size for size in _BUCKETS if size < max_batch) + (max_batch,)
        self.batches = 0
        self.frames = 0

    def bucket(self, size: int) -> int:
        """The batch size actually run for ``size`` frames (padded when compiled)."""
        if not self.compiled:
            return size
        return next(bucket for bucket in self._buckets if bucket >= size)

    @torch.inference_mode()
    def generate(self, latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        """Faces ``(B, 256, 256, 3)`` uint8 RGB for ``latents`` ``(B, 8, 32, 32)`` and ``features`` ``(B, T, D)``.

        Both must already be on the device in the model's dtype.
        """
        size = latents.shape[0]
        if size > self.max_batch:
            raise ValueError(f"a batch of {size} frames exceeds max_batch {self.max_batch}")
        run = self.bucket(size)
        if run > size:
            latents = torch.cat([latents, latents[-1:].expand(run - size, -1, -1, -1)])
            features = torch.cat([features, features[-1:].expand(run - size, -1, -1)])
        faces = self._forward(latents.contiguous(memory_format=self.memory_format), features)
        self.batches += 1
        self.frames += size
        result: np.ndarray = faces[:size].cpu().numpy()
        return result

    def batch_sizes(self) -> tuple[int, ...]:
        """Every batch size this generator runs: 1 to ``max_batch`` eagerly, the buckets when compiled."""
        return self._buckets if self.compiled else tuple(range(1, self.max_batch + 1))

    def warmup(self, clock: Callable[[], float] = time.monotonic) -> dict[int, float]:
        """Run every batch size twice; returns the seconds the second run of each took.

        The first run of a shape pays for compilation, CUDA graph capture or
        cuDNN's choice of algorithm; doing it here keeps that cost away from
        the first sessions, and the measured times let the scheduler plan
        the first batch of every size. Call it from the thread that will
        generate: CUDA graphs captured by torch.compile belong to the
        capturing thread. If compilation fails (no compiler toolchain, an
        unsupported op), the generator falls back to eager mode with a
        warning rather than leaving the renderer unusable.
        """
        started = time.perf_counter()
        try:
            costs = self._time_sizes(clock)
        except Exception:
            if not self.compiled:
                raise
            logger.exception("torch.compile of the MuseTalk generator failed; running eagerly")
            self.compiled, self._forward = False, self._run
            costs = self._time_sizes(clock)
        self.batches = self.frames = 0
        logger.info(
            "MuseTalk generator warmed up in %.1f s (%s, batch sizes %s)",
            time.perf_counter() - started,
            "compiled" if self.compiled else "eager",
            ",".join(str(size) for size in costs),
        )
        return costs

    def _time_sizes(self, clock: Callable[[], float]) -> dict[int, float]:
        tokens, width = self.models.audio.tokens, self.models.audio.d_model
        costs: dict[int, float] = {}
        for size in self.batch_sizes():
            latents = torch.zeros(size, 8, 32, 32, device=self.device, dtype=self.dtype)
            features = torch.zeros(size, tokens, width, device=self.device, dtype=self.dtype)
            self.generate(latents, features)
            started = clock()
            self.generate(latents, features)  # ends with a copy to the host: synchronous
            costs[size] = clock() - started
        return costs

    def _run(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        models = self.models
        sample = models.unet(latents, self._timestep, encoder_hidden_states=features).sample
        image = models.vae.decode(sample * self._inverse_scale).sample
        pixels: torch.Tensor = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1)
