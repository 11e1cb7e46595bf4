"""Reading the input of an avatar preparation: photos, and videos re-timed to the output rate."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

from avatalk.avatars.prepare_errors import AvatarPreparationError

# Leading bytes of the still-image formats OpenCV decodes; anything else is
# handed to FFmpeg as a video.
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"BM",  # BMP
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)


# FFmpeg renders text files (ANSI art and kin) as "video": never an avatar.
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


def sniff_kind(path: Path) -> Literal["image", "video"]:
    """Image or video, by the file's leading bytes (extensions lie)."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    return "video"


def limit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Dimensions scaled down (never up) so the longer side is at most ``max_side``; even numbers."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def read_image(path: Path) -> np.ndarray:
    """Decode a photo as RGB (EXIF orientation applied); FFmpeg is the fallback decoder."""
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is not None:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                return frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, IndexError, ValueError):
        pass
    raise AvatarPreparationError(f"{path.name} is not a readable image")


@dataclass
class VideoInfo:
    format: str
    codec: str
    width: int
    height: int
    fps: float | None
    duration_s: float | None
    rotation: int = 0


class VideoReader:
    """Decodes a video's frames as RGB with their times, upright and size-limited."""

    def __init__(self, path: Path, max_side: int | None) -> None:
        self.path = path
        self.max_side = max_side
        try:
            with av.open(str(path)) as container:
                self.info = self._probe(container)
        except av.FFmpegError as error:
            raise AvatarPreparationError(
                f"{path.name} is not a readable video or image ({_ffmpeg_reason(error)})"
            ) from None

    def _probe(self, container: av.container.InputContainer) -> VideoInfo:
        if not container.streams.video:
            raise AvatarPreparationError(f"{self.path.name} has no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.name in _TEXT_CODECS:
            raise AvatarPreparationError(f"{self.path.name} is not a readable video or image (it is a text file)")
        rate = stream.average_rate or stream.guessed_rate
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return VideoInfo(
            format=container.format.name,
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            fps=float(rate) if rate else None,
            duration_s=duration,
        )

    def frames(self) -> Iterator[tuple[float | None, np.ndarray]]:
        """``(time in seconds or None, RGB frame)`` in presentation order."""
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    width, height = limit_size(frame.width, frame.height, self.max_side)
                    image: np.ndarray = frame.to_ndarray(width=width, height=height, format="rgb24")
                    turns = round(frame.rotation / 90) % 4
                    if turns:
                        # The display matrix rotates counter-clockwise, as np.rot90 does.
                        self.info.rotation = frame.rotation
                        image = np.ascontiguousarray(np.rot90(image, turns))
                    yield frame.time, image
        except av.FFmpegError as error:
            raise AvatarPreparationError(f"{self.path.name} could not be decoded ({_ffmpeg_reason(error)})") from None


def _ffmpeg_reason(error: av.FFmpegError) -> str:
    """FFmpeg's own words without the file path it appends (which may be a server path)."""
    return str(getattr(error, "strerror", None) or error.__class__.__name__)


class Retimer:
    """Re-times decoded frames to a constant rate by their timestamps.

    Output frame ``k`` (at ``k / fps`` seconds from the first frame) shows
    the input frame whose timestamp is nearest, so frames are dropped or
    repeated as the rates require and variable frame rates come out even.
    Input beyond ``max_frames`` output frames is not decoded; ``truncated``
    then says so.
    """

    def __init__(self, fps: int, max_frames: int, fallback_interval: float) -> None:
        self.fps = fps
        self.max_frames = max_frames
        self.fallback_interval = fallback_interval
        self.truncated = False

    def __call__(self, frames: Iterable[tuple[float | None, np.ndarray]]) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yields ``(output index, input index, image)``."""
        limit = self.max_frames / self.fps
        k = 0
        first_time: float | None = None
        previous: tuple[float, int, np.ndarray] | None = None
        interval = self.fallback_interval
        for source_index, (time, image) in enumerate(frames):
            if previous is None:
                first_time = time
                previous = (0.0, source_index, image)
                continue
            if time is None or first_time is None:
                relative = previous[0] + interval
            else:
                relative = time - first_time
                if relative <= previous[0]:  # broken or repeated timestamps
                    relative = previous[0] + interval
            if relative >= limit - 1e-6:
                self.truncated = True
                break
            interval = relative - previous[0]
            midpoint = (previous[0] + relative) / 2
            while k / self.fps < midpoint - 1e-9:
                yield k, previous[1], previous[2]
                k += 1
            previous = (relative, source_index, image)
        if previous is None:
            return
        end = limit if self.truncated else previous[0] + interval
        total = max(k, 1, min(self.max_frames, round(end * self.fps)))
        while k < total:
            yield k, previous[1], previous[2]
            k += 1
