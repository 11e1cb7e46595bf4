"""The built-in avatar: an illustrated presenter drawn in code.

A fresh install must show a face without any user video, and shipping a
photo or a video of a real person would bring a likeness (and its rights)
into the package. So the default avatar is drawn: a stylised, friendly
presenter (face, hair, eyes that blink, brows, nose, closed mouth, neck,
shoulders in a blazer over a shirt collar, soft background), with a few
seconds of idle motion (slight head sway, breathing, a blink).

Because every feature is drawn from known curves, its landmarks are known by
construction: the face contour, nose line, eyes, brows and lips are placed on
their face-mesh indices directly, so the crop box and blend mask never depend
on a detector recognising a cartoon. The remaining mesh points (cheeks,
forehead...) only fill in the layout; they are taken once from the face-mesh
model run on the still drawing, inside the region given by the known points.

Drawing is done once per layer at twice the output size with anti-aliased
polygons, then scaled down; each frame only moves the pre-drawn layers
(head, back hair, body) with an affine warp and composites them, which keeps
generating the default avatar to a couple of seconds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.default_face_canvas import DESIGN, Canvas, Layer
from avatalk.avatars.default_face_drawing import (
    BREATH,
    PIVOT,
    SUPERSAMPLE,
    draw_back_hair,
    draw_background,
    draw_body,
    draw_eye,
    draw_head,
    known_landmarks,
)
from avatalk.avatars.landmarks import FaceLandmarker, FaceResult
from avatalk.avatars.prepare import AvatarPreparationError, write_avatar
from avatalk.avatars.store import AvatarManifest, AvatarNotFound, AvatarStore, SourceInfo
from avatalk.media.timebase import FPS

logger = logging.getLogger(__name__)

#: Bumped whenever the drawing changes, so existing installs regenerate it.
GENERATOR_VERSION = 1
_GENERATOR = "avatalk.avatars.default_face"


# --- Motion ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pose:
    angle_deg: float
    dx: float
    dy: float
    breath: float  # chest rise in design pixels, 0..BREATH
    openness: float


def _poses(count: int) -> list[_Pose]:
    """Idle motion over the clip: sway, a nod, breathing and one blink.

    Every motion is a sum of cos(k * pi * t) terms, which have zero speed at
    both ends of the clip, so the ping-pong loop turns around smoothly.
    """
    poses = []
    blink = [0.55, 0.12, 0.0, 0.3, 0.75]  # eye openness over ~200 ms
    blink_start = int(count * 0.55)
    for i in range(count):
        t = i / max(count - 1, 1)
        offset = i - blink_start
        openness = blink[offset] if 0 <= offset < len(blink) else 1.0
        poses.append(
            _Pose(
                angle_deg=1.6 * math.cos(math.pi * t) + 0.4 * math.cos(3 * math.pi * t),
                dx=-2.5 * math.cos(math.pi * t),
                dy=1.2 * math.cos(2 * math.pi * t),
                breath=BREATH * (1 - math.cos(2 * math.pi * t)) / 2,
                openness=openness,
            )
        )
    return poses


def _head_matrix(pose: _Pose, scale: float) -> np.ndarray:
    """2x3 affine moving the head at rest (design units x scale) to its pose."""
    px, py = PIVOT[0] * scale, PIVOT[1] * scale
    matrix = np.asarray(cv2.getRotationMatrix2D((px, py), pose.angle_deg, 1.0), np.float64)
    matrix[:, 2] += np.array([pose.dx, pose.dy - 0.5 * pose.breath]) * scale
    return matrix


def render_default_avatar(
    size: int = 512, seconds: float = 4.0, fps: int = FPS, landmarker: FaceLandmarker | None = None
) -> tuple[list[np.ndarray], np.ndarray]:
    """Draw the default avatar: ``(frames as RGB uint8, landmarks (N, 468, 2) float32)``."""
    count = max(2, round(seconds * fps))
    poses = _poses(count)
    scale = size / DESIGN
    big = size * SUPERSAMPLE

    back_canvas, body_canvas, head_canvas = Canvas(big), Canvas(big), Canvas(big)
    draw_back_hair(back_canvas)
    draw_body(body_canvas)
    draw_head(head_canvas)
    back, body = back_canvas.layer(size), body_canvas.layer(size)
    # The head once per eye state of the blink, eyes drawn onto the same bare head.
    bare_head = head_canvas.rgba.copy()
    heads: dict[float, Layer] = {}
    for openness in {pose.openness for pose in poses}:
        head_canvas.rgba[:] = bare_head
        for side in (-1, 1):
            draw_eye(head_canvas, side, openness)
        heads[openness] = head_canvas.layer(size)
    background = draw_background(size)
    margin = math.ceil(8 * scale)  # more than the head or body ever moves

    rest = _rest_landmarks(_still(background, back, body, heads[1.0]), scale, landmarker)
    drawn = {openness: known_landmarks(openness) for openness in heads}
    frames: list[np.ndarray] = []
    points = np.empty((count, mesh.NUM_LANDMARKS, 2), np.float32)
    for index, pose in enumerate(poses):
        head_pose = _head_matrix(pose, scale)
        # The body sinks from its drawn (highest) place as the chest falls, so the
        # frame's bottom edge is never uncovered.
        body_pose = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, (BREATH - pose.breath) * scale]])
        image = background.copy()
        back.composite(image, head_pose, margin)
        body.composite(image, body_pose, margin)
        heads[pose.openness].composite(image, head_pose, margin)
        frames.append(_to_uint8(image))
        local = rest.copy()
        for mesh_index, point in drawn[pose.openness].items():
            local[mesh_index] = point * scale
        points[index] = local @ head_pose[:, :2].T + head_pose[:, 2]
    return frames, points


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _still(background: np.ndarray, *layers: Layer) -> np.ndarray:
    """The avatar at rest, eyes open."""
    image = background.copy()
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for layer in layers:
        layer.composite(image, identity, 0)
    return _to_uint8(image)


def _rest_landmarks(still: np.ndarray, scale: float, landmarker: FaceLandmarker | None) -> np.ndarray:
    """All 468 points for the head at rest: drawn features exact, the rest from the mesh model.

    The mesh runs on the still drawing in the region spanned by the known
    points (no detector involved); whatever it returns, the points the crop
    box and mask rely on are then overwritten with their drawn positions.
    """
    known = {index: point * scale for index, point in known_landmarks().items()}
    seed = np.tile(np.mean(list(known.values()), axis=0), (mesh.NUM_LANDMARKS, 1)).astype(np.float32)
    for index, point in known.items():
        seed[index] = point
    runner = landmarker or FaceLandmarker(detector="short", min_presence=0.0)
    found = runner.track(still, FaceResult(box=(0.0, 0.0, 0.0, 0.0), score=1.0, presence=1.0, landmarks=seed))
    points = found.landmarks.copy() if found is not None else seed
    for index, point in known.items():
        points[index] = point
    return points


def ensure_default_avatar(
    out_root: Path,
    avatar_id: str = "ava",
    *,
    display_name: str = "Ava",
    size: int = 512,
    seconds: float = 4.0,
    fps: int = FPS,
) -> AvatarManifest:
    """The default avatar's manifest, generating the avatar first if it is missing or outdated.

    An avatar of that id that was not generated here (a user's own "ava") is
    left alone.
    """
    store = AvatarStore(out_root)
    try:
        manifest = store.get(avatar_id)
        origin = manifest.source.model_extra or {}
        if origin.get("generator") != _GENERATOR or origin.get("generator_version") == GENERATOR_VERSION:
            return manifest
        logger.info("regenerating the default avatar %s (drawing updated)", avatar_id)
    except AvatarNotFound:
        logger.info("generating the default avatar %s", avatar_id)
    frames, points = render_default_avatar(size, seconds, fps)
    source = SourceInfo.model_validate(
        {
            "kind": "generated",
            "width": size,
            "height": size,
            "fps": float(fps),
            "duration_s": len(frames) / fps,
            "generator": _GENERATOR,
            "generator_version": GENERATOR_VERSION,
        }
    )
    try:
        return write_avatar(
            frames, points, avatar_id, display_name, Path(out_root), source=source, fps=fps, overwrite=True
        )
    except (AvatarPreparationError, OSError) as error:
        # Several nodes starting at once on one shared folder: another one put it in place first.
        try:
            manifest = store.get(avatar_id)
        except AvatarNotFound:
            raise error from None
        if (manifest.source.model_extra or {}).get("generator_version") != GENERATOR_VERSION:
            raise
        return manifest
