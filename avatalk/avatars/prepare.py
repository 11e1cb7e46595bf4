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
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.landmarks import FaceLandmarker, FaceResult
from avatalk.avatars.prepare_errors import (
    AvatarPreparationCancelled,
    AvatarPreparationError,
    check_cancel,
    check_display_name,
)
from avatalk.avatars.prepare_geometry import (
    blend_mask,
    crop_boxes,
    crop_image,
    fill_missing,
    nose_reference_y,
    pingpong_cycle,
    smooth_tracks,
    square_window,
)
from avatalk.avatars.prepare_input import (
    Retimer,
    VideoReader,
    limit_size,
    read_image,
    sniff_kind,
)
from avatalk.avatars.prepare_writer import AvatarWriter
from avatalk.avatars.store import AvatarManifest, SourceInfo, validate_avatar_id
from avatalk.media.timebase import FPS

__all__ = [
    "AvatarPreparationCancelled",
    "AvatarPreparationError",
    "ProgressCallback",
    "blend_mask",
    "crop_boxes",
    "fill_missing",
    "nose_reference_y",
    "pingpong_cycle",
    "prepare_avatar",
    "smooth_tracks",
    "write_avatar",
]

logger = logging.getLogger(__name__)

#: ``progress(stage, fraction)``: stage is "analysing", "writing" (only when
#: frames are cropped to a square), "finishing" or "done"; fraction is 0..1
#: within the stage.
ProgressCallback = Callable[[str, float], None]


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
    check_display_name(display_name)
    with AvatarWriter(
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
    check_display_name(display_name)
    source = Path(source)
    if not source.is_file():
        raise AvatarPreparationError(f"{source.name} does not exist or is not a file")
    if kind == "auto":
        kind = sniff_kind(source)
    report = _Progress(progress)
    landmarker = landmarker or FaceLandmarker()
    crop = None if frame_size is None else (frame_size, face_scale)
    with AvatarWriter(
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
    writer: AvatarWriter,
    landmarker: FaceLandmarker,
    *,
    fps: int,
    still_seconds: float,
    max_side: int | None,
    crop: tuple[int, float] | None,
) -> tuple[np.ndarray, list[int], SourceInfo]:
    """A photo: one landmarked image, written once and repeated as a still sequence."""
    image = read_image(path)
    height, width = image.shape[:2]
    info = SourceInfo(kind="image", filename=path.name, width=width, height=height)
    size = limit_size(width, height, max_side)
    if size != (width, height):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    face = landmarker.detect(image)
    if face is None:
        raise AvatarPreparationError(f"no face was found in the photo {path.name}")
    points = face.landmarks
    if crop is not None:
        image, points = crop_image(image, points[None], crop)
        points = points[0]
    count = max(1, round(still_seconds * fps))
    for index in range(count):
        writer.add_frame(image, repeat_of_previous=index > 0)
    return np.repeat(points[None], count, axis=0), [], info


def _analyse_video(
    path: Path,
    writer: AvatarWriter,
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
    reader = VideoReader(path, max_side)
    max_frames = max(1, math.floor(max_seconds * fps + 1e-6))
    fallback = 1.0 / reader.info.fps if reader.info.fps else 1.0 / fps
    expected = min(max_frames, round((reader.info.duration_s or max_seconds) * fps)) or max_frames
    retimer = Retimer(fps, max_frames, fallback)

    faces: list[FaceResult | None] = []
    previous_source = -1
    face: FaceResult | None = None
    frame_shape: tuple[int, int] = (0, 0)
    for index, source_index, image in retimer(reader.frames()):
        check_cancel(cancel)
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


def _write_cropped_video(
    reader: VideoReader,
    writer: AvatarWriter,
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
    x0, y0, side = square_window(landmarks, width, height, face_scale)
    scale = frame_size / side
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    retimer = Retimer(fps, len(landmarks), 1.0 / reader.info.fps if reader.info.fps else 1.0 / fps)
    previous_source = -1
    count = 0
    for index, source_index, image in retimer(reader.frames()):
        check_cancel(cancel)
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
