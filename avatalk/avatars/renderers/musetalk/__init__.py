"""MuseTalk v1.5 lip-sync on the GPU, compatible with the official weights (DESIGN.md section 5).

- ``loader``: the official folder layout in, checked models out (``load_musetalk``).
- ``latents``: per-avatar VAE latents, stored in the avatar folder (``ensure_latents``).
- ``features``: Whisper-tiny audio features, the official recipe run on each reply segment.
- ``generator`` and ``scheduler``: UNet + VAE decode batched across all sessions by deadline.
- ``blending``: the v1.5 "jaw" paste of the generated face, from the avatar's landmarks.
- ``renderer``: the ``Renderer`` / ``RendererSession`` implementation.

Importing this package imports torch, diffusers and transformers; the
renderer factory only does so when "musetalk" is configured.
"""

from avatalk.avatars.renderers.musetalk.blending import Paste, jaw_paste
from avatalk.avatars.renderers.musetalk.features import WhisperFeatureEncoder, positional_encoding
from avatalk.avatars.renderers.musetalk.generator import FrameGenerator
from avatalk.avatars.renderers.musetalk.latents import ensure_latents, load_latents
from avatalk.avatars.renderers.musetalk.loader import MuseTalkModels, MuseTalkWeightsError, load_musetalk
from avatalk.avatars.renderers.musetalk.renderer import MuseTalkRenderer
from avatalk.avatars.renderers.musetalk.scheduler import RenderScheduler, SchedulerStats
from avatalk.avatars.renderers.musetalk.session import MuseTalkSession, RenderStats
from avatalk.config import MuseTalkSettings

__all__ = [
    "FrameGenerator",
    "MuseTalkModels",
    "MuseTalkRenderer",
    "MuseTalkSession",
    "MuseTalkSettings",
    "MuseTalkWeightsError",
    "Paste",
    "RenderScheduler",
    "RenderStats",
    "SchedulerStats",
    "WhisperFeatureEncoder",
    "ensure_latents",
    "jaw_paste",
    "load_latents",
    "load_musetalk",
    "positional_encoding",
]
