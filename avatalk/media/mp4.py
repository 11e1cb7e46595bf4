"""Writing talking-avatar video files (H.264 + AAC in MP4) with PyAV."""

from __future__ import annotations

import os
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avatalk.media.timebase import FPS


def write_mp4(
    path: Path,
    frames: Iterable[np.ndarray],
    audio: np.ndarray,
    sample_rate: int,
    fps: int = FPS,
    crf: int = 23,
) -> int:
    """Encode RGB frames and mono float32 audio into ``path``; returns the number of frames.

    Written to a temporary name in the same folder and renamed at the end, so a
    failure never leaves a truncated file under the final name.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    count = 0
    try:
        with av.open(str(partial), mode="w", format="mp4") as container:
            video = None
            for frame in frames:
                if video is None:
                    height, width = frame.shape[:2]
                    video = container.add_stream("libx264", rate=fps)
                    video.width, video.height = width, height
                    video.pix_fmt = "yuv420p"
                    video.options = {"crf": str(crf), "preset": "veryfast"}
                    sound = container.add_stream("aac", rate=sample_rate)
                    sound.layout = "mono"
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
                picture.pts = count
                picture.time_base = Fraction(1, fps)
                for packet in video.encode(picture):
                    container.mux(packet)
                count += 1
            if video is None:
                raise ValueError("no frames to write")
            for packet in video.encode():
                container.mux(packet)
            pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
            step = 1024
            for offset in range(0, len(pcm), step):
                chunk = av.AudioFrame.from_ndarray(pcm[None, offset : offset + step], format="s16", layout="mono")
                chunk.sample_rate = sample_rate
                chunk.pts = offset
                chunk.time_base = Fraction(1, sample_rate)
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return count
