"""Turn a video or a photo into a prepared avatar folder.

Rendering in real time must not redo any per-frame analysis, so everything
about the avatar's own frames is computed once here (DESIGN.md section 4):
the input is normalised to the output frame rate (25 fps: one frame per
40 ms tick of the media clock), every frame gets the 468 face-mesh landmarks,
smoothed over time so crops do not jitter, a MuseTalk-style crop box and a
feathered lower-face blend mask; the idle loop is the frames forward then
backward (ping-pong) so it never jumps. The result is written as described
in ``store.py``, atomically: built in a hidden temporary folder inside the
avatars root, then renamed into place.

Frames where no face is found keep their index (the cycle never shifts);
their landmarks are interpolated from the nearest frames that have a face.
Too many such frames, or none with a face, fail the preparation.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

import av
import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.landmarks import FaceLandmarker, FaceResult
from avatalk.avatars.store import (
    MANIFEST_NAME,
    MAX_DISPLAY_NAME,
    TEMP_PREFIX,
    TRASH_PREFIX,
    AvatarManifest,
    MaskInfo,
    SourceInfo,
    validate_avatar_id,
)
from avatalk.config import Settings
from avatalk.media.timebase import FPS

logger = logging.getLogger(__name__)

#: ``progress(stage, fraction)``: stage is "analysing", "writing" (only when
#: frames are cropped to a square), "finishing" or "done"; fraction is 0..1
#: within the stage.
ProgressCallback = Callable[[str, float], None]

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


class AvatarPreparationError(Exception):
    """The input cannot be made into an avatar; the message says why, for the user."""


class AvatarPreparationCancelled(AvatarPreparationError):
    """Preparation was stopped through its ``cancel`` event."""


# --- Geometry ----------------------------------------------------------------


def pingpong_cycle(frame_count: int) -> list[int]:
    """Frame order of the idle loop: forward, then backward without repeating the ends.

    ``0, 1, ..., n-1, n-2, ..., 1`` then again from 0: motion reverses
    smoothly at both ends instead of jumping from the last frame to the first.
    """
    return list(range(frame_count)) + list(range(frame_count - 2, 0, -1))


def fill_missing(landmarks: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Landmarks for frames without a face, interpolated from the nearest frames with one.

    Between two frames with a face the points move linearly; before the
    first and after the last they are held. ``found`` is a boolean per
    frame; at least one must be true.
    """
    indices = np.flatnonzero(found)
    if indices.size == len(found):
        return landmarks
    filled = landmarks.copy()
    all_frames = np.arange(len(found))
    flat = landmarks[indices].reshape(indices.size, -1)
    # np.interp holds the end values outside the known range, as wanted.
    for column in range(flat.shape[1]):
        filled.reshape(len(found), -1)[:, column] = np.interp(all_frames, indices, flat[:, column])
    return filled


def smooth_tracks(landmarks: np.ndarray, window: int) -> np.ndarray:
    """Centred Gaussian-weighted moving average of each landmark over ``window`` frames.

    Per-frame landmarks jitter by a pixel or two, which would make the crop
    box and mask shimmer. Centred weights add no lag. The ends are padded by
    reflection, which is exactly what the ping-pong cycle shows around them.
    """
    n = landmarks.shape[0]
    half = min(window // 2, n - 1)
    if half <= 0:
        return landmarks
    offsets = np.arange(-half, half + 1)
    weights = np.exp(-0.5 * (offsets / (half / 2.0 + 0.5)) ** 2)
    weights /= weights.sum()
    padded = np.pad(landmarks, [(half, half)] + [(0, 0)] * (landmarks.ndim - 1), mode="reflect")
    smoothed = np.zeros_like(landmarks, dtype=np.float64)
    for weight, offset in zip(weights, offsets, strict=True):
        smoothed += weight * padded[half + offset : half + offset + n]
    return smoothed.astype(np.float32)


def nose_reference_y(landmarks: np.ndarray) -> np.ndarray:
    """Height of the point MuseTalk mirrors the chin about, per frame.

    MuseTalk uses point 29 of the 68-point scheme, two thirds of the way down
    the nose bridge from between the eyes (27) to the tip (30); on the mesh
    that is interpolated between the bridge top (168) and the tip (1).
    """
    top = landmarks[..., mesh.NOSE_BRIDGE_TOP, 1]
    tip = landmarks[..., mesh.NOSE_TIP, 1]
    return top + (tip - top) * (2.0 / 3.0)


def crop_boxes(landmarks: np.ndarray, width: int, height: int, chin_margin: float = 0.05) -> np.ndarray:
    """MuseTalk v1.5 crop boxes ``(x1, y1, x2, y2)`` from (N, 468, 2) landmarks, int32.

    x spans the face contour; the bottom is the chin; the top is the chin
    mirrored about the nose (``y1 = 2 * nose_y - chin_y``), and then the bottom
    is lowered by a margin. MuseTalk v1.5 adds 10 px to frames where that box
    is typically ~200 px tall; ``chin_margin`` is that margin as a fraction of
    the box height, so it scales with the face instead of the resolution.
    """
    oval = landmarks[:, list(mesh.FACE_OVAL)]
    x1 = oval[..., 0].min(axis=1)
    x2 = oval[..., 0].max(axis=1)
    chin = oval[..., 1].max(axis=1)
    nose = nose_reference_y(landmarks)
    y1 = 2.0 * nose - chin
    y2 = chin + chin_margin * (chin - y1)
    boxes = np.stack([np.floor(x1), np.floor(y1), np.ceil(x2), np.ceil(y2)], axis=1)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    # A face running off the frame still needs a box of at least 2x2 pixels.
    boxes[:, 2] = np.maximum(boxes[:, 2], np.minimum(boxes[:, 0] + 2, width))
    boxes[:, 0] = np.minimum(boxes[:, 0], boxes[:, 2] - 2)
    boxes[:, 3] = np.maximum(boxes[:, 3], np.minimum(boxes[:, 1] + 2, height))
    boxes[:, 1] = np.minimum(boxes[:, 1], boxes[:, 3] - 2)
    return boxes.astype(np.int32)


def blend_mask(landmarks: np.ndarray, box: np.ndarray, size: int = 256, feather: float = 0.1) -> np.ndarray:
    """The lower-face blend mask of one frame, ``size`` x ``size`` uint8 in crop-box coordinates.

    Stands in for MuseTalk's face-parsing mask: the face contour, slightly
    widened, below half the box height (the generated mouth region), with a
    Gaussian feather ``feather`` x the width (MuseTalk uses 10 %). The mask
    is zeroed along the box's left, right and bottom edges before feathering,
    so it fades to 0 inside the box and pasting through it leaves no seam.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    scale = np.array([size / max(x2 - x1, 1.0), size / max(y2 - y1, 1.0)])
    contour = (landmarks[list(mesh.FACE_OVAL)] - np.array([x1, y1])) * scale
    mask: np.ndarray = np.zeros((size, size), np.uint8)
    subpixel = 4  # fillPoly's fixed-point bits: sub-pixel accurate contour
    cv2.fillPoly(mask, [np.round(contour * (1 << subpixel)).astype(np.int32)], 255, cv2.LINE_AA, subpixel)
    grow = max(1, round(size * 0.03))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
    mask[: size // 2] = 0
    kernel = int(feather * size) // 2 * 2 + 1
    band = kernel // 2
    if band:
        mask[:, :band] = 0
        mask[:, size - band :] = 0
        mask[size - band :] = 0
        mask = cv2.GaussianBlur(mask, (kernel, kernel), 0)
    return mask


def _square_window(landmarks: np.ndarray, width: int, height: int, face_scale: float) -> tuple[int, int, int]:
    """A fixed square ``(x0, y0, side)`` around the face for the whole clip.

    The side is ``face_scale`` times the face size (a head-and-shoulders
    framing), at most the frame's shorter side; the face sits a little above
    the centre. One window for all frames keeps the subject's own motion.
    """
    oval = landmarks[:, list(mesh.FACE_OVAL)]
    extent = np.maximum(np.ptp(oval[..., 0], axis=1), np.ptp(oval[..., 1], axis=1))
    centre = np.median(oval.mean(axis=1), axis=0)
    side = int(min(width, height, round(face_scale * float(np.median(extent)))))
    cx, cy = float(centre[0]), float(centre[1]) + 0.1 * side
    x0 = int(np.clip(round(cx - side / 2), 0, width - side))
    y0 = int(np.clip(round(cy - side / 2), 0, height - side))
    return x0, y0, side


# --- Reading the input ----------------------------------------------------------


def _sniff_kind(path: Path) -> Literal["image", "video"]:
    """Image or video, by the file's leading bytes (extensions lie)."""
    with path.open("rb") as handle:
        head = handle.read(16)
    if head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    return "video"


def _limit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Dimensions scaled down (never up) so the longer side is at most ``max_side``; even numbers."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _read_image(path: Path) -> np.ndarray:
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
class _VideoInfo:
    format: str
    codec: str
    width: int
    height: int
    fps: float | None
    duration_s: float | None
    rotation: int = 0


class _VideoReader:
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

    def _probe(self, container: av.container.InputContainer) -> _VideoInfo:
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
        return _VideoInfo(
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
                    width, height = _limit_size(frame.width, frame.height, self.max_side)
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


class _Retimer:
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


# --- Writing the folder -----------------------------------------------------------


class _AvatarWriter:
    """Builds an avatar folder in a temporary folder and renames it into place.

    Used as a context manager: leaving it with an exception, or without
    ``commit``, removes the temporary folder.
    """

    def __init__(
        self,
        out_root: Path,
        avatar_id: str,
        *,
        overwrite: bool,
        image_format: Literal["jpg", "png"],
        jpeg_quality: int,
    ) -> None:
        self.avatar_id = validate_avatar_id(avatar_id)
        self.out_root = Path(out_root)
        self.final = self.out_root / avatar_id
        self.overwrite = overwrite
        if self.final.exists() and not overwrite:
            raise AvatarPreparationError(f"an avatar with id {avatar_id!r} already exists")
        self.image_format = image_format
        self.params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpg" else []
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.temp = self.out_root / f"{TEMP_PREFIX}{avatar_id}-{uuid.uuid4().hex}"
        (self.temp / "frames").mkdir(parents=True)
        (self.temp / "masks").mkdir()
        self.frames: list[str] = []
        self.size: tuple[int, int] | None = None

    def __enter__(self) -> _AvatarWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.temp.exists():
            shutil.rmtree(self.temp, ignore_errors=True)

    def add_frame(self, image_rgb: np.ndarray, repeat_of_previous: bool = False) -> None:
        """Append the next frame; a repeat of the previous image shares its file."""
        if repeat_of_previous and self.frames:
            self.frames.append(self.frames[-1])
            return
        height, width = image_rgb.shape[:2]
        if self.size is None:
            self.size = (width, height)
        elif self.size != (width, height):
            raise AvatarPreparationError("the video changes resolution midway, which is not supported")
        name = f"frames/{len(self.frames):06d}.{self.image_format}"
        if not cv2.imwrite(str(self.temp / name), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), self.params):
            raise OSError(f"could not write {self.temp / name}")
        self.frames.append(name)

    def commit(
        self,
        *,
        display_name: str,
        fps: int,
        landmarks: np.ndarray,
        missing: Sequence[int],
        source: SourceInfo,
        chin_margin: float,
        mask_size: int,
        feather: float,
        progress: Callable[[float], None],
        cancel: threading.Event | None,
    ) -> AvatarManifest:
        """Write boxes, masks, arrays and the manifest, then move the folder into place."""
        assert self.size is not None and len(self.frames) == len(landmarks)
        width, height = self.size
        boxes = crop_boxes(landmarks, width, height, chin_margin)
        mask_files: list[str] = []
        written: dict[bytes, str] = {}
        for index, (points, box) in enumerate(zip(landmarks, boxes, strict=True)):
            _check_cancel(cancel)
            ok, png = cv2.imencode(".png", blend_mask(points, box, mask_size, feather))
            if not ok:
                raise OSError("could not encode a blend mask as PNG")
            key = png.tobytes()
            if key not in written:  # identical masks (a photo's still frames) share a file
                name = f"masks/{index:06d}.png"
                (self.temp / name).write_bytes(key)
                written[key] = name
            mask_files.append(written[key])
            progress((index + 1) / len(landmarks))
        np.save(self.temp / "landmarks.npy", landmarks.astype(np.float32))
        np.save(self.temp / "boxes.npy", boxes)
        manifest = AvatarManifest(
            id=self.avatar_id,
            display_name=display_name,
            created_at=datetime.now(UTC),
            fps=fps,
            frame_count=len(self.frames),
            width=width,
            height=height,
            frames=self.frames,
            cycle=pingpong_cycle(len(self.frames)),
            masks=MaskInfo(size=mask_size, files=mask_files, feather_px=int(feather * mask_size) // 2 * 2 + 1),
            source=source,
            missing_faces=list(missing),
        )
        _write_synced(self.temp / MANIFEST_NAME, manifest.to_json().encode())
        _fsync_dir(self.temp)
        _check_cancel(cancel)
        self._move_into_place()
        return manifest

    def _move_into_place(self) -> None:
        trash = None
        if self.overwrite and self.final.exists():
            trash = self.out_root / f"{TRASH_PREFIX}{self.avatar_id}-{uuid.uuid4().hex}"
            self.final.rename(trash)
        try:
            os.rename(self.temp, self.final)
        except OSError as error:
            if self.final.exists():  # another preparation of the same id finished first
                raise AvatarPreparationError(f"an avatar with id {self.avatar_id!r} already exists") from error
            raise
        _fsync_dir(self.out_root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_display_name(name: str) -> None:
    """Fail before any work rather than when the manifest is validated at the end."""
    if not name.strip() or len(name) > MAX_DISPLAY_NAME:
        raise AvatarPreparationError(f"the display name must be 1 to {MAX_DISPLAY_NAME} characters")


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise AvatarPreparationCancelled("avatar preparation was cancelled")


class _Progress:
    """Forwards progress to the caller's callback at most once per percent."""

    def __init__(self, callback: ProgressCallback | None) -> None:
        self.callback = callback
        self.last: tuple[str, int] | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        key = (stage, int(min(max(fraction, 0.0), 1.0) * 100))
        if self.callback is not None and key != self.last:
            self.last = key
            self.callback(stage, key[1] / 100)

    def stage(self, stage: str) -> Callable[[float], None]:
        return lambda fraction: self(stage, fraction)


# --- Public entry points -------------------------------------------------------------


def write_avatar(
    frames: Iterable[np.ndarray],
    landmarks: np.ndarray,
    avatar_id: str,
    display_name: str,
    out_root: Path,
    *,
    source: SourceInfo,
    fps: int = FPS,
    image_format: Literal["jpg", "png"] = "jpg",
    jpeg_quality: int = 90,
    chin_margin: float = 0.05,
    mask_size: int = 256,
    feather: float = 0.1,
    overwrite: bool = False,
) -> AvatarManifest:
    """Write an avatar whose frames and landmarks are already known (e.g. generated ones).

    ``landmarks`` is (N, 468, 2) in frame pixels, one per frame; crop boxes,
    masks, cycle and manifest are derived as for ``prepare_avatar``.
    """
    _check_display_name(display_name)
    with _AvatarWriter(
        out_root, avatar_id, overwrite=overwrite, image_format=image_format, jpeg_quality=jpeg_quality
    ) as writer:
        for image in frames:
            writer.add_frame(image)
        if len(writer.frames) != len(landmarks) or not writer.frames:
            raise ValueError(f"{len(writer.frames)} frames but {len(landmarks)} landmark sets")
        return writer.commit(
            display_name=display_name,
            fps=fps,
            landmarks=np.asarray(landmarks, np.float32),
            missing=[],
            source=source,
            chin_margin=chin_margin,
            mask_size=mask_size,
            feather=feather,
            progress=lambda fraction: None,
            cancel=None,
        )


def prepare_avatar(
    source: Path,
    avatar_id: str,
    display_name: str,
    out_root: Path,
    *,
    kind: Literal["video", "image", "auto"] = "auto",
    max_seconds: float = 20.0,
    fps: int = FPS,
    still_seconds: float = 2.0,
    max_side: int | None = 1280,
    frame_size: int | None = None,
    face_scale: float = 3.0,
    max_missing_fraction: float = 0.2,
    smoothing_window: int = 5,
    chin_margin: float = 0.05,
    mask_size: int = 256,
    feather: float = 0.1,
    image_format: Literal["jpg", "png"] = "jpg",
    jpeg_quality: int = 90,
    overwrite: bool = False,
    landmarker: FaceLandmarker | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AvatarManifest:
    """Prepare ``source`` (a video, or a photo) as avatar ``avatar_id`` under ``out_root``.

    - ``kind``: "auto" tells a photo from a video by the file's content.
    - Videos are re-timed to ``fps`` and cut after ``max_seconds`` (the
      manifest's ``source.truncated`` says so); a photo becomes
      ``still_seconds`` of identical frames.
    - Frames larger than ``max_side`` are scaled down, keeping the aspect.
      With ``frame_size``, frames are instead cut to one fixed square around
      the face (``face_scale`` x the face size, at most the frame) and scaled
      to ``frame_size`` x ``frame_size``, the server's video size.
    - Frames without a face are allowed up to ``max_missing_fraction``.
    - ``smoothing_window`` frames are averaged to steady the landmarks;
      ``chin_margin``, ``mask_size`` and ``feather`` shape boxes and masks
      (see ``crop_boxes`` and ``blend_mask``).
    - ``jpeg_quality`` is high by default because frames are re-encoded for
      streaming later.
    - ``progress(stage, fraction)`` reports progress; setting ``cancel``
      stops the work with ``AvatarPreparationCancelled``.

    Raises ``InvalidAvatarId`` for an unsafe id, and
    ``AvatarPreparationError`` (with a message meant for the user) when the
    input is unreadable, has no usable face or the id is taken; nothing is
    left behind then. Runs for seconds: call it from a worker thread, not
    the event loop.
    """
    validate_avatar_id(avatar_id)
    _check_display_name(display_name)
    source = Path(source)
    if not source.is_file():
        raise AvatarPreparationError(f"{source.name} does not exist or is not a file")
    if kind == "auto":
        kind = _sniff_kind(source)
    report = _Progress(progress)
    landmarker = landmarker or FaceLandmarker()
    crop = None if frame_size is None else (frame_size, face_scale)
    with _AvatarWriter(
        out_root, avatar_id, overwrite=overwrite, image_format=image_format, jpeg_quality=jpeg_quality
    ) as writer:
        if kind == "image":
            landmarks, missing, info = _analyse_image(
                source, writer, landmarker, fps=fps, still_seconds=still_seconds, max_side=max_side, crop=crop
            )
        else:
            landmarks, missing, info = _analyse_video(
                source,
                writer,
                landmarker,
                fps=fps,
                max_seconds=max_seconds,
                max_side=max_side,
                crop=crop,
                max_missing_fraction=max_missing_fraction,
                report=report,
                cancel=cancel,
            )
            landmarks = smooth_tracks(landmarks, smoothing_window)
        manifest = writer.commit(
            display_name=display_name,
            fps=fps,
            landmarks=landmarks,
            missing=missing,
            source=info,
            chin_margin=chin_margin,
            mask_size=mask_size,
            feather=feather,
            progress=report.stage("finishing"),
            cancel=cancel,
        )
    report("done", 1.0)
    logger.info(
        "prepared avatar %s: %d frames of %dx%d, %d without a face",
        avatar_id,
        manifest.frame_count,
        manifest.width,
        manifest.height,
        len(missing),
    )
    return manifest


def _analyse_image(
    path: Path,
    writer: _AvatarWriter,
    landmarker: FaceLandmarker,
    *,
    fps: int,
    still_seconds: float,
    max_side: int | None,
    crop: tuple[int, float] | None,
) -> tuple[np.ndarray, list[int], SourceInfo]:
    """A photo: one landmarked image, written once and repeated as a still sequence."""
    image = _read_image(path)
    height, width = image.shape[:2]
    info = SourceInfo(kind="image", filename=path.name, width=width, height=height)
    size = _limit_size(width, height, max_side)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    face = landmarker.detect(image)
    if face is None:
        raise AvatarPreparationError(f"no face was found in the photo {path.name}")
    points = face.landmarks
    if crop is not None:
        image, points = _crop_image(image, points[None], crop)
        points = points[0]
    count = max(1, round(still_seconds * fps))
    for index in range(count):
        writer.add_frame(image, repeat_of_previous=index > 0)
    return np.repeat(points[None], count, axis=0), [], info


def _analyse_video(
    path: Path,
    writer: _AvatarWriter,
    landmarker: FaceLandmarker,
    *,
    fps: int,
    max_seconds: float,
    max_side: int | None,
    crop: tuple[int, float] | None,
    max_missing_fraction: float,
    report: _Progress,
    cancel: threading.Event | None,
) -> tuple[np.ndarray, list[int], SourceInfo]:
    """A video: re-timed, landmarked frame by frame (tracking between frames), written.

    When frames are cut to a square, the crop is known only once every
    frame has been analysed, so the video is decoded a second time to
    write them (cheaper than holding a whole clip of frames in memory).
    """
    reader = _VideoReader(path, max_side)
    max_frames = max(1, math.floor(max_seconds * fps + 1e-6))
    fallback = 1.0 / reader.info.fps if reader.info.fps else 1.0 / fps
    expected = min(max_frames, round((reader.info.duration_s or max_seconds) * fps)) or max_frames
    retimer = _Retimer(fps, max_frames, fallback)

    faces: list[FaceResult | None] = []
    previous_source = -1
    face: FaceResult | None = None
    frame_shape: tuple[int, int] = (0, 0)
    for index, source_index, image in retimer(reader.frames()):
        _check_cancel(cancel)
        repeat = source_index == previous_source
        if not repeat:
            tracked = landmarker.track(image, face) if face is not None else None
            face = tracked or landmarker.detect(image)
            frame_shape = image.shape[:2]
            if crop is None:
                writer.add_frame(image)
        elif crop is None:
            writer.add_frame(image, repeat_of_previous=True)
        previous_source = source_index
        faces.append(face)
        report("analysing", (index + 1) / expected)
    if not faces:
        raise AvatarPreparationError(f"no video frames could be decoded from {path.name}")

    found = np.array([f is not None for f in faces])
    if not found.any():
        raise AvatarPreparationError(f"no face was found in the video {path.name}")
    missing = [i for i, ok in enumerate(found) if not ok]
    if len(missing) > max_missing_fraction * len(faces):
        raise AvatarPreparationError(
            f"no face was found in {len(missing)} of {len(faces)} frames "
            f"({100 * len(missing) / len(faces):.0f} %, at most {100 * max_missing_fraction:.0f} % is allowed); "
            "use a video where the face is visible throughout"
        )
    placeholder = np.zeros((mesh.NUM_LANDMARKS, 2), np.float32)
    landmarks = fill_missing(np.stack([f.landmarks if f else placeholder for f in faces]), found)

    info = reader.info
    source = SourceInfo(
        kind="video",
        filename=path.name,
        format=info.format,
        codec=info.codec,
        width=info.width,
        height=info.height,
        fps=info.fps,
        duration_s=info.duration_s,
        rotation=info.rotation,
        truncated=retimer.truncated,
    )
    if crop is not None:
        landmarks = _write_cropped_video(reader, writer, landmarks, frame_shape, crop, fps, report, cancel)
    return landmarks, missing, source


def _crop_image(image: np.ndarray, landmarks: np.ndarray, crop: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Cut a photo to the square around its face and scale it; landmarks follow."""
    frame_size, face_scale = crop
    height, width = image.shape[:2]
    x0, y0, side = _square_window(landmarks, width, height, face_scale)
    scale = frame_size / side
    square = image[y0 : y0 + side, x0 : x0 + side]
    resized = cv2.resize(
        square, (frame_size, frame_size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    )
    return resized, ((landmarks - np.array([x0, y0], np.float32)) * scale).astype(np.float32)


def _write_cropped_video(
    reader: _VideoReader,
    writer: _AvatarWriter,
    landmarks: np.ndarray,
    frame_shape: tuple[int, int],
    crop: tuple[int, float],
    fps: int,
    report: _Progress,
    cancel: threading.Event | None,
) -> np.ndarray:
    """Second pass of a cropped video: decode again, cut every frame to the square, write it."""
    frame_size, face_scale = crop
    height, width = frame_shape
    x0, y0, side = _square_window(landmarks, width, height, face_scale)
    scale = frame_size / side
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    retimer = _Retimer(fps, len(landmarks), 1.0 / reader.info.fps if reader.info.fps else 1.0 / fps)
    previous_source = -1
    count = 0
    for index, source_index, image in retimer(reader.frames()):
        _check_cancel(cancel)
        if index >= len(landmarks):
            break
        if source_index == previous_source:
            writer.add_frame(image, repeat_of_previous=True)
        else:
            square = image[y0 : y0 + side, x0 : x0 + side]
            writer.add_frame(cv2.resize(square, (frame_size, frame_size), interpolation=interpolation))
        previous_source = source_index
        count += 1
        report("writing", count / len(landmarks))
    if count != len(landmarks):
        raise AvatarPreparationError(f"{reader.path.name} decoded differently on the second pass")
    return ((landmarks - np.array([x0, y0], np.float32)) * scale).astype(np.float32)


# --- With this installation's settings ------------------------------------------------

#: Share of the overall progress each stage of ``prepare_avatar`` covers. "writing"
#: happens only when frames are cut to a square; a photo goes straight to "finishing".
AVATAR_STAGE_SPANS: Mapping[str, tuple[float, float]] = {
    "analysing": (0.0, 0.6),
    "writing": (0.6, 0.85),
    "finishing": (0.85, 1.0),
    "done": (1.0, 1.0),
}


def avatar_progress(stage: str, fraction: float) -> float:
    """Overall progress (0..1) of an avatar preparation from its stage and the fraction of that stage."""
    start, end = AVATAR_STAGE_SPANS.get(stage, (0.0, 1.0))
    return start + (end - start) * min(max(fraction, 0.0), 1.0)


def avatars_root(settings: Settings) -> Path:
    """Where prepared avatars live."""
    return settings.data_dir / "avatars"


def prepare_with_settings(
    settings: Settings,
    source: Path,
    avatar_id: str,
    display_name: str,
    *,
    kind: Literal["video", "image", "auto"] = "auto",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> AvatarManifest:
    """``prepare_avatar`` with the configured limits and frame size, into ``avatars_root``.

    The CLI and the server's preparation jobs both go through here, so an
    avatar comes out the same whichever way it was made.
    """
    return prepare_avatar(
        source,
        avatar_id,
        display_name,
        avatars_root(settings),
        kind=kind,
        max_seconds=settings.avatars.max_video_seconds,
        frame_size=settings.avatars.output_size,
        progress=progress,
        cancel=cancel,
    )
