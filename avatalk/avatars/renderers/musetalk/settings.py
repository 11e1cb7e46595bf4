"""Settings of the MuseTalk renderer (environment variables ``AVATALK_MUSETALK__*``).

They live here rather than in ``avatalk.config`` only until they are folded
into the main ``Settings`` object; every field has a default that suits one
GPU serving a dozen sessions, so a deployment normally sets only
``AVATALK_MUSETALK__MODELS_DIR``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: ``torch.compile`` modes offered; "reduce-overhead" captures CUDA graphs.
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


class MuseTalkSettings(BaseSettings):
    """How the MuseTalk renderer loads its weights and schedules the GPU."""

    model_config = SettingsConfigDict(env_prefix="AVATALK_MUSETALK__", extra="ignore")

    models_dir: Path = Field(
        Path("models"), description="folder with musetalkV15/, sd-vae/ and whisper/ (the official layout)"
    )
    device: str = Field("auto", description="auto (CUDA when available), cuda, cuda:N or cpu")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto = float16 on CUDA, float32 on CPU"
    )
    max_batch: int = Field(16, ge=1, le=256, description="most frames in one UNet + VAE-decode batch")
    batch_window_ms: float = Field(
        2.0, ge=0.0, le=100.0, description="how long a batch that is not full waits for frames of other sessions"
    )
    frame_budget_ms: float = Field(
        34.0,
        gt=0.0,
        le=60000.0,
        description="render() returns the idle frame (a late frame) when its generated frame is not ready this long "
        "after the call; the clock calls it one 40 ms tick ahead, so this must stay below 40 ms",
    )
    look_ahead_ms: int = Field(
        1000, ge=0, le=10000, description="how far ahead of playback frames are generated when upcoming audio is known"
    )
    context_left_ms: int = Field(
        1000, ge=0, le=30000, description="audio before each 40 ms the Whisper encoder attends to"
    )
    context_right_ms: int = Field(
        160, ge=0, le=30000, description="audio after each 40 ms the Whisper encoder attends to (look-ahead)"
    )
    silence_db: float = Field(
        -55.0, le=0.0, description="ticks quieter than this (dBFS) show the idle frame and never reach the UNet"
    )
    compile: CompileMode = Field("off", description="torch.compile mode for UNet + decode; off = eager")
    channels_last: bool = Field(True, description="channels-last memory format for UNet and VAE (faster convolutions)")
    latents_batch: int = Field(16, ge=1, le=256, description="crops per VAE-encode batch when preparing latents")
