"""Geometry of a prepared avatar: idle cycle, landmark tracks, crop boxes, blend masks.

Everything here is a pure function of the landmarks (and, for the square
crop of the output frames, of the frame), shared by ``prepare_avatar`` and
``write_avatar``.
"""

from __future__ import annotations

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh


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


def square_window(landmarks: np.ndarray, width: int, height: int, face_scale: float) -> tuple[int, int, int]:
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

def crop_image(image: np.ndarray, landmarks: np.ndarray, crop: tuple[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """Cut a photo to the square around its face and scale it; landmarks follow."""
    frame_size, face_scale = crop
    height, width = image.shape[:2]
    x0, y0, side = square_window(landmarks, width, height, face_scale)
    scale = frame_size / side
    square = image[y0 : y0 + side, x0 : x0 + side]
    resized = cv2.resize(
        square, (frame_size, frame_size), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    )
    return resized, ((landmarks - np.array([x0, y0], np.float32)) * scale).astype(np.float32)
