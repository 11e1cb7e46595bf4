"""Where a generated face goes in an avatar frame and how much of it shows: MuseTalk v1.5 "jaw" blending.

The official real-time pipeline (``get_image_prepare_material`` with the
"jaw" face-parsing mode) pastes the generated face into its crop box and
blends it back through a mask built in a square crop around the box, 1.5
times its larger side:

- the face's skin from face parsing, grown a little downwards by a cone
  kernel (the jaw line) and narrowed at the cheeks (outside a central band
  of 2 x 90 px of the 512 px parsing image), with the lips and **without
  the nose**, so the nose is never regenerated and cannot shimmer;
- only inside the crop box and only from half the square's height down;
- Gaussian-blurred with a kernel of 10 % of the square's width (OpenCV's
  default sigma for that kernel), which puts alpha at about 0.75 on the chin.

avatalk has no face-parsing network; the skin is the landmarks' face oval
and the nose the hull of the mesh's nose points, drawn at the parsing
resolution (512 px) so the official kernels apply unchanged.

One deliberate difference: the official mask does not reach zero at the
crop box's sides and bottom, so the edge of the pasted face shows as a
faint seam. Here alpha is ramped to exactly zero across the chin margin
(the band between the chin and the box's bottom edge, and as wide at the
sides), which leaves the alpha at the chin and above as official.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh

#: Face-mesh points of the nose, bridge to nostrils; their convex hull stands in for face-parsing class 10.
NOSE_REGION: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 19, 45, 48, 49, 51, 59, 60, 64, 75, 79, 94, 97, 98, 99, 102, 115, 126, 129, 131, 134,
    141, 166, 168, 195, 197, 198, 209, 217, 218, 220, 235, 236, 240, 242, 248, 275, 278, 279, 281, 289, 290,
    294, 305, 309, 326, 327, 328, 331, 344, 355, 358, 360, 363, 370, 392, 420, 429, 437, 438, 440, 455, 456,
    460, 462,
)  # fmt: skip
#: The crop around the box that the mask is built in (official ``expand``) and the share of it kept from the top.
EXPAND = 1.5
UPPER_BOUNDARY = 0.5
#: Face parsing runs at 512 x 512; the jaw-mode kernels are sized for that.
PARSING_SIZE = 512
CHEEK_WIDTH = 90  # official default of the v1.5 scripts (left and right)
_CONE_HEIGHT = 21
_TAIL_HEIGHT = 12
_CHEEK_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
#: Blur kernel as a share of the crop's width.
FEATHER = 0.1


def _cone_kernel() -> np.ndarray:
    """The jaw-mode dilation kernel: a downward cone with a vertical tail (grows the skin down at the jaw)."""
    size = _CONE_HEIGHT + _TAIL_HEIGHT
    kernel = np.zeros((size, size), np.uint8)
    centre = size // 2
    for row in range(_CONE_HEIGHT // 2, _CONE_HEIGHT):
        half = row - _CONE_HEIGHT // 2
        kernel[row, centre - half : centre + half + 1] = 1
    half = int(kernel[_CONE_HEIGHT - 1].sum()) // 2
    kernel[_CONE_HEIGHT:, max(0, centre - half) : centre + half + 1] = 1
    return kernel


_CONE = _cone_kernel()
_CHEEKS = np.zeros((PARSING_SIZE, PARSING_SIZE), bool)
_CHEEKS[:, : PARSING_SIZE // 2 - CHEEK_WIDTH] = True
_CHEEKS[:, PARSING_SIZE // 2 + CHEEK_WIDTH :] = True


@dataclass(frozen=True, slots=True)
class Paste:
    """Where a generated face goes in one output frame (the crop box) and its alpha there."""

    rows: slice
    cols: slice
    alpha: np.ndarray  # float32 (h, w, 1), read-only


def crop_square(box: np.ndarray) -> tuple[int, int, int]:
    """The official square around ``box``: ``(left, top, side)``, side 1.5 x the box's larger side (even)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    half = int(max(x2 - x1, y2 - y1) // 2 * EXPAND)
    return (x1 + x2) // 2 - half, (y1 + y2) // 2 - half, 2 * half


def blur_kernel(side: int) -> int:
    """The official blur kernel for a crop of ``side`` pixels: ``int(0.1 * side // 2 * 2) + 1``."""
    return int(FEATHER * side // 2 * 2) + 1


def parsing_mask(landmarks: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
    """The jaw-mode face-parsing mask of the square crop, ``(side, side)`` uint8 (255 inside).

    Skin (face oval) dilated by the cone kernel, eroded twice by the cheek
    kernel outside the central band, nose removed: the official steps, on
    a landmark polygon instead of a parsing network's classes.
    """
    scale = PARSING_SIZE / side
    origin = np.array([left, top], np.float64)
    subpixel = 4

    def polygon(indices: tuple[int, ...], hull: bool) -> np.ndarray:
        points = (landmarks[list(indices)].astype(np.float64) - origin) * scale
        if hull:
            points = cv2.convexHull(points.astype(np.float32))[:, 0].astype(np.float64)
        return np.round(points * (1 << subpixel)).astype(np.int32)

    skin = np.zeros((PARSING_SIZE, PARSING_SIZE), np.uint8)
    cv2.fillPoly(skin, [polygon(mesh.FACE_OVAL, False)], 255, cv2.LINE_8, subpixel)
    dilated = cv2.dilate(skin, _CONE, iterations=1)
    eroded = cv2.erode(dilated, _CHEEK_KERNEL, iterations=2)
    face = np.where(_CHEEKS, eroded, dilated)
    nose = np.zeros_like(skin)
    cv2.fillPoly(nose, [polygon(NOSE_REGION, True)], 255, cv2.LINE_8, subpixel)
    face[nose > 0] = 0
    resized: np.ndarray = cv2.resize(face, (side, side), interpolation=cv2.INTER_LINEAR)
    return resized


def jaw_paste(landmarks: np.ndarray, box: np.ndarray, shape: tuple[int, int]) -> Paste | None:
    """The paste of one frame: crop ``box`` (x1, y1, x2, y2) and its v1.5 jaw-mode alpha, in output pixels.

    ``landmarks`` are the frame's 468 mesh points in the same pixels;
    ``shape`` is the output frame's ``(height, width)``. None when the box
    is too small to paste into.
    """
    height, width = shape
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2, y1, y2 = max(0, x1), min(width, x2), max(0, y1), min(height, y2)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    left, top, side = crop_square(np.array([x1, y1, x2, y2]))
    parsed = parsing_mask(landmarks, left, top, side)
    mask = np.zeros((side, side), np.uint8)
    rows, cols = slice(y1 - top, y2 - top), slice(x1 - left, x2 - left)
    mask[rows, cols] = parsed[rows, cols]  # only inside the crop box
    mask[: int(side * UPPER_BOUNDARY)] = 0  # only the lower half of the square
    kernel = blur_kernel(side)
    alpha = cv2.GaussianBlur(mask, (kernel, kernel), 0)[rows, cols].astype(np.float32) / 255.0
    alpha = (alpha * _edge_ramp(y2 - y1, x2 - x1, margin=y2 - float(landmarks[mesh.CHIN, 1])))[..., None]
    alpha.setflags(write=False)
    return Paste(slice(y1, y2), slice(x1, x2), alpha)


def _edge_ramp(height: int, width: int, *, margin: float) -> np.ndarray:
    """``(height, width)`` weights: 0 on the box's left, right and bottom edges, 1 from ``margin`` inside.

    A smoothstep, so alpha has no kink where the ramp begins; ``margin`` is
    the chin margin (box bottom minus chin), at least 2 pixels.
    """
    band = max(2.0, margin)
    y = (height - 1 - np.arange(height, dtype=np.float32))[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    distance = np.minimum(np.minimum(x, width - 1 - x), y)
    t = np.clip(distance / band, 0.0, 1.0)
    ramp: np.ndarray = t * t * (3.0 - 2.0 * t)
    return ramp
