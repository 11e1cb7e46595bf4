"""Offline rendering: a talking-avatar MP4 from a script or an audio file.

The same TTS and renderer as live sessions, driven as fast as the CPU allows
instead of at real time. Used by ``avatalk render`` and by render jobs
(``avatalk.avatars.render_job``, behind ``POST /v1/renders``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from avatalk.avatars.renderers import Renderer
from avatalk.avatars.store import LoadedAvatar
from avatalk.media.audio import resample
from avatalk.media.mp4 import write_mp4
from avatalk.media.timebase import ENGINE_SAMPLE_RATE, FPS, SAMPLES_PER_TICK
from avatalk.tts import TTS

MAX_RENDER_SECONDS = 600.0


class RenderError(Exception):
    """A render that cannot be done (bad audio, empty script); the message says why."""


@dataclass(frozen=True)
class RenderResult:
    path: Path
    frames: int
    seconds: float


def load_audio(path: Path, max_seconds: float = MAX_RENDER_SECONDS) -> tuple[np.ndarray, int]:
    """Decode any audio file PyAV reads into mono float32 at its own rate."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise RenderError(f"{path.name} has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            pieces: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                for converted in resampler.resample(frame):
                    samples = converted.to_ndarray().reshape(-1)
                    pieces.append(samples)
                    total += len(samples)
                if total > max_seconds * rate:
                    raise RenderError(f"{path.name} is longer than the limit of {max_seconds:.0f} s")
    except av.error.FFmpegError as error:
        raise RenderError(f"{path.name} is not a readable audio file: {error}") from error
    if not pieces or total == 0:
        raise RenderError(f"{path.name} contains no audio")
    return np.concatenate(pieces).astype(np.float32), int(rate)


async def synthesize_script(tts: TTS, text: str) -> tuple[np.ndarray, int]:
    """Speak a whole script with the TTS backend (sentence by sentence inside the backend)."""
    if not text.strip():
        raise RenderError("the script is empty")
    pieces = [chunk async for chunk in tts.synthesize(text)]
    if not pieces:
        raise RenderError("the TTS produced no audio for the script")
    return np.concatenate(pieces).astype(np.float32), tts.sample_rate


def render_video(
    renderer: Renderer,
    avatar: LoadedAvatar,
    audio: np.ndarray,
    sample_rate: int,
    out_path: Path,
    output_size: int,
    progress: Callable[[float], None] | None = None,
    cancel: threading.Event | None = None,
) -> RenderResult:
    """Render one frame per 40 ms of ``audio`` and write them with the audio to ``out_path``. Blocking."""
    speech = resample(audio, sample_rate, ENGINE_SAMPLE_RATE)
    ticks = max(1, math.ceil(len(speech) / SAMPLES_PER_TICK))
    speech = np.pad(speech, (0, ticks * SAMPLES_PER_TICK - len(speech)))
    # The sound track covers exactly the rendered ticks, so picture and sound end together.
    track = np.pad(audio, (0, max(0, ticks * sample_rate // FPS - len(audio))))[: ticks * sample_rate // FPS]
    session = renderer.open(avatar, output_size)

    def frames() -> Iterator[np.ndarray]:
        for tick in range(ticks):
            if cancel is not None and cancel.is_set():
                raise RenderError("the render was cancelled")
            yield session.render(tick, speech[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
            if progress is not None and (tick % FPS == 0 or tick == ticks - 1):
                progress((tick + 1) / ticks)

    count = write_mp4(out_path, frames(), track, sample_rate)
    return RenderResult(out_path, count, ticks / FPS)
