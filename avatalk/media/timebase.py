"""The one timebase of avatalk (DESIGN §3), defined once for every part.

The engine (VAD, ASR) and the lip-sync renderers work at 16 kHz; the output
timeline is cut into 40 ms ticks, one video frame each, so 25 frames per
second. Every other module imports these names instead of restating them.
"""

from __future__ import annotations

ENGINE_SAMPLE_RATE = 16000
"""VAD, ASR and the renderers consume 16 kHz mono audio (Whisper's rate, which MuseTalk needs)."""

FPS = 25
"""Video frames per second: one per tick."""

TICK_S = 1.0 / FPS
"""Length of one tick of the output timeline: 40 ms."""

TICK_MS = 1000 // FPS

SAMPLES_PER_TICK = ENGINE_SAMPLE_RATE // FPS
"""Engine-rate samples in one tick: 640, one video frame's worth of audio."""

SUPPORTED_SAMPLE_RATES: tuple[int, ...] = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
"""Rates a client may declare; all are whole multiples of 25 Hz so a tick is whole samples."""


def samples_per_tick(sample_rate: int) -> int:
    """Samples of one tick at ``sample_rate`` (which must be a multiple of :data:`FPS`)."""
    if sample_rate % FPS:
        raise ValueError(f"sample rate {sample_rate} is not a multiple of {FPS} Hz")
    return sample_rate // FPS
