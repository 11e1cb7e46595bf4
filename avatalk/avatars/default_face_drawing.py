"""Drawing the built-in avatar: its palette, curves, face-mesh landmarks and layers.

The features are drawn from known curves, so their face-mesh landmarks are
known by construction (``known_landmarks``). Each layer (background, back
hair, body, head) is drawn once at ``SUPERSAMPLE`` times the output size with
anti-aliased polygons and scaled down; ``avatalk.avatars.default_face`` then
only moves and composites the layers to animate it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.default_face_canvas import Canvas

SUPERSAMPLE = 2

# Palette (RGB).
_BG_TOP = (236, 241, 247)
_BG_BOTTOM = (196, 210, 228)
_BG_GLOW = (250, 251, 253)
_SKIN = (241, 200, 170)
_SKIN_SHADE = (221, 169, 139)
_SKIN_DEEP = (196, 140, 112)
_BLUSH = (236, 150, 140)
_HAIR = (62, 42, 34)
_HAIR_SHINE = (112, 78, 60)
_BROW = (74, 50, 40)
_SCLERA = (250, 250, 248)
_IRIS = (92, 62, 44)
_IRIS_RIM = (52, 34, 26)
_PUPIL = (22, 16, 14)
_LASH = (42, 28, 24)
_LIP_UPPER = (192, 110, 112)
_LIP_LOWER = (212, 132, 128)
_LIP_LINE = (140, 70, 74)
_BLAZER = (46, 64, 98)
_BLAZER_SHADE = (34, 48, 76)
_SHIRT = (246, 248, 251)
_SHIRT_SHADE = (214, 221, 231)

BREATH = 1.6  # how far the shoulders rise when breathing in (design pixels)
# Head pose pivot (bottom of the head, where it turns on the neck).
PIVOT = (256.0, 330.0)


# --- Curves --------------------------------------------------------------------


def _catmull_rom(points: np.ndarray, samples: int = 12, closed: bool = False) -> np.ndarray:
    """A smooth curve through control points (uniform Catmull-Rom), as a dense polyline."""
    pts = np.asarray(points, np.float64)
    if closed:
        ext = np.vstack([pts[-1:], pts, pts[:2]])
    else:
        ext = np.vstack([2 * pts[:1] - pts[1:2], pts, 2 * pts[-1:] - pts[-2:-1]])
    t = np.linspace(0.0, 1.0, samples, endpoint=False)[:, None]
    segments = []
    for i in range(len(ext) - 3):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        segments.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    curve = np.vstack(segments)
    return curve if closed else np.vstack([curve, pts[-1:]])


def _resample(polyline: np.ndarray, count: int) -> np.ndarray:
    """``count`` points evenly spaced along a polyline (ends included)."""
    steps = np.linalg.norm(np.diff(polyline, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    targets = np.linspace(0.0, arc[-1], count)
    return np.stack([np.interp(targets, arc, polyline[:, k]) for k in range(2)], axis=1)


def _face_contour(samples: int = 36) -> np.ndarray:
    """The face outline, clockwise in the image from the top of the forehead.

    An ellipse for the cranium and cheeks whose lower half narrows to a soft
    chin, sampled at equal angles so sample ``j`` is ``FACE_OVAL[j]``.
    """
    theta = np.linspace(0.0, 2 * math.pi, samples, endpoint=False)
    s, c = np.sin(theta), np.cos(theta)
    lower = np.clip(-c, 0.0, None)
    width = 95.0 * (1.0 - 0.27 * lower**2.4)
    height = np.where(c > 0, 122.0, 124.0)
    x = 256.0 + width * s
    y = 222.0 - height * c
    return np.stack([x, y], axis=1)


@dataclass(frozen=True)
class _Eye:
    """One eye's lids: upper and lower lid curves from the outer to the inner corner."""

    upper: np.ndarray  # (9, 2)
    lower: np.ndarray  # (9, 2)


def _eye(side: int, openness: float) -> _Eye:
    """Lids of the eye on image side ``side`` (-1 left, +1 right); openness 1 open, 0 shut."""
    cx, cy = 256.0 + side * 42.0, 214.0
    outer = np.array([cx + side * 19.0, cy + 1.0])
    inner = np.array([cx - side * 17.0, cy + 2.0])
    u = np.linspace(0.0, 1.0, 9)[:, None]
    base = outer + (inner - outer) * u
    bump = np.sin(np.pi * u) ** 0.9
    lower = base + np.array([0.0, 7.5]) * bump
    open_upper = base + np.array([0.0, -11.5]) * bump + np.array([side * 1.5, 0.0]) * bump
    closed_upper = lower + np.array([0.0, -0.5]) * bump
    upper = closed_upper + (open_upper - closed_upper) * openness
    return _Eye(upper=upper, lower=lower)


def _brow(side: int) -> np.ndarray:
    """Eyebrow control line from the outer end to the inner end."""
    cx = 256.0 + side * 42.0
    return np.array([[cx + side * 28, 193.0], [cx + side * 12, 183.0], [cx - side * 6, 181.0], [cx - side * 21, 187.0]])


def _lips() -> dict[str, np.ndarray]:
    """Closed, gently smiling lips: outer contours and the seam between them, right corner to left."""
    right, left = np.array([229.0, 290.5]), np.array([283.0, 290.5])
    upper_outer = _catmull_rom(
        np.array([right, [242, 288.5], [251, 287], [256, 288.5], [261, 287], [270, 288.5], left]), 8
    )
    lower_outer = _catmull_rom(np.array([right, [243, 300.5], [256, 305], [269, 300.5], left]), 8)
    seam = _catmull_rom(
        np.array([right + np.array([1.5, 0.3]), [243, 296], [256, 298], [269, 296], left + np.array([-1.5, 0.3])]), 8
    )
    return {"upper_outer": upper_outer, "lower_outer": lower_outer, "seam": seam}


def _nose() -> dict[str, np.ndarray]:
    """Nose midline (bridge top between the eyes to the base) and the tip's underside."""
    midline = np.array(
        [
            [256, 212],
            [256, 224],
            [256.5, 236],
            [257, 246],
            [257.5, 254],
            [257.5, 260],
            [257, 266],
            [256.5, 270],
            [256, 273],
            [256, 276],
        ],
        np.float64,
    )
    base = _catmull_rom(np.array([[243, 268], [249, 273], [256, 274.5], [263, 273], [269, 268]]), 8)
    return {"midline": midline, "base": base}


def known_landmarks(openness: float = 1.0) -> dict[int, np.ndarray]:
    """Face-mesh index -> design-space point for every feature drawn, head at rest."""
    points: dict[int, np.ndarray] = {}
    for index, point in zip(mesh.FACE_OVAL, _face_contour(len(mesh.FACE_OVAL)), strict=True):
        points[index] = point
    lips = _lips()
    for indices, curve in (
        (mesh.LIPS_OUTER_UPPER, lips["upper_outer"]),
        (mesh.LIPS_OUTER_LOWER, lips["lower_outer"]),
        (mesh.LIPS_INNER_UPPER, lips["seam"]),
        (mesh.LIPS_INNER_LOWER, lips["seam"]),
    ):
        for index, point in zip(indices, _resample(curve, len(indices)), strict=True):
            points[index] = point
    for side, upper_ids, lower_ids in (
        (-1, mesh.RIGHT_EYE_UPPER, mesh.RIGHT_EYE_LOWER),
        (1, mesh.LEFT_EYE_UPPER, mesh.LEFT_EYE_LOWER),
    ):
        eye = _eye(side, openness)
        for indices, curve in ((upper_ids, eye.upper), (lower_ids, eye.lower)):
            for index, point in zip(indices, curve, strict=True):
                points[index] = point
    for side, indices in ((-1, mesh.RIGHT_EYEBROW), (1, mesh.LEFT_EYEBROW)):
        line = _resample(_catmull_rom(_brow(side), 8), 5)
        for index, point in zip(
            indices, np.vstack([line - np.array([0, 3]), line[::-1] + np.array([0, 3])]), strict=True
        ):
            points[index] = point
    for index, point in zip(mesh.NOSE_MIDLINE, _nose()["midline"], strict=True):
        points[index] = point
    return points


def draw_background(size: int) -> np.ndarray:
    """Soft vertical gradient with a faint glow behind the head; RGB float 0..1."""
    y = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    top, bottom = np.array(_BG_TOP, np.float32) / 255, np.array(_BG_BOTTOM, np.float32) / 255
    image = np.broadcast_to(top + (bottom - top) * y, (size, size, 3)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    glow = np.exp(-(((xx - 0.5) / 0.32) ** 2 + ((yy - 0.40) / 0.36) ** 2))[..., None]
    return image + (np.array(_BG_GLOW, np.float32) / 255 - image) * glow * 0.55


def draw_back_hair(canvas: Canvas) -> None:
    """Hair behind the head and neck: a shoulder-length bob."""
    outline = _catmull_rom(
        np.array(
            [
                [256, 82],
                [330, 96],
                [372, 160],
                [378, 250],
                [372, 330],
                [348, 372],
                [300, 378],
                [256, 360],
                [212, 378],
                [164, 372],
                [140, 330],
                [134, 250],
                [140, 160],
                [182, 96],
            ]
        ),
        10,
        closed=True,
    )
    canvas.paint(canvas.shape(outline), _HAIR)


def draw_body(canvas: Canvas) -> None:
    """Neck, shirt collar and blazer shoulders."""
    neck = _catmull_rom(
        np.array([[208, 300], [212, 350], [204, 392], [192, 420], [320, 420], [308, 392], [300, 350], [304, 300]]), 8
    )
    canvas.paint(canvas.shape(neck), _SKIN)
    # Shadow cast by the jaw onto the neck.
    jaw_shadow = _catmull_rom(np.array([[200, 318], [256, 376], [312, 318], [312, 296], [200, 296]]), 8, closed=True)
    canvas.tint(canvas.blur(canvas.shape(jaw_shadow), 7) * canvas.shape(neck), _SKIN_DEEP, 0.5)
    shoulders = _catmull_rom(
        np.array(
            [
                [-20, 530],
                [-12, 470],
                [30, 432],
                [110, 408],
                [184, 392],
                [256, 404],
                [328, 392],
                [402, 408],
                [482, 432],
                [524, 470],
                [532, 530],
            ]
        ),
        10,
    )
    canvas.paint(canvas.shape(shoulders), _BLAZER)
    # Shirt: a V opening, shaded under the chin.
    shirt = np.array([[196, 392], [256, 402], [316, 392], [300, 452], [256, 530], [212, 452]])
    canvas.paint(canvas.shape(shirt), _SHIRT)
    fold = canvas.blur(canvas.shape(np.array([[214, 396], [298, 396], [256, 436]])), 7)
    canvas.tint(fold * canvas.shape(shirt), _SHIRT_SHADE, 0.9)
    for side in (-1, 1):
        collar = np.array(
            [[256 + side * 58, 386], [256 + side * 4, 408], [256 + side * 30, 440], [256 + side * 62, 406]]
        )
        canvas.paint(canvas.shape(collar), _SHIRT)
        canvas.paint(canvas.stroke(np.vstack([collar, collar[:1]]), 1.4), _SHIRT_SHADE)
        lapel = np.array(
            [
                [256 + side * 66, 404],
                [256 + side * 32, 446],
                [256 + side * 10, 530],
                [256 + side * 96, 530],
                [256 + side * 104, 470],
                [256 + side * 92, 452],
                [256 + side * 100, 420],
            ]
        )
        canvas.paint(canvas.shape(lapel), _BLAZER_SHADE)
        canvas.paint(canvas.stroke(lapel[:3], 1.8), (28, 40, 62))
    # Shading toward the outer shoulders gives the jacket some volume.
    centre = canvas.blur(canvas.shape(np.array([[150, 380], [362, 380], [400, 530], [112, 530]])), 40)
    canvas.tint(canvas.shape(shoulders) * (1 - centre), _BLAZER_SHADE, 0.7)


def draw_head(canvas: Canvas) -> None:
    """Face, brows, nose, mouth and the front hair, head at rest (eyes are drawn per blink state)."""
    contour = _catmull_rom(_face_contour(), 6, closed=True)
    face = canvas.shape(contour)
    canvas.paint(face, _SKIN)
    # Form shading: darker toward the contour, lighter in the centre.
    inner = canvas.blur(
        canvas.shape(_catmull_rom(_face_contour() * 0.84 + np.array([256, 224]) * 0.16, 6, closed=True)), 14
    )
    canvas.tint(face * (1 - inner), _SKIN_SHADE, 0.55)
    for side in (-1, 1):
        blush = canvas.shape(_ellipse(256 + side * 58, 262, 20, 11))
        canvas.tint(canvas.blur(blush, 9) * face, _BLUSH, 0.32)

    for side in (-1, 1):
        canvas.paint(canvas.shape(_tapered(_catmull_rom(_brow(side)[::-1], 10), 7.0, 1.8)), _BROW)

    nose = _nose()
    shade = canvas.stroke(_catmull_rom(np.array([[248, 222], [246, 244], [244, 262]]), 8), 3.0)
    canvas.tint(canvas.blur(shade, 2.5), _SKIN_SHADE, 0.5)
    canvas.paint(canvas.stroke(nose["base"], 2.2), _SKIN_DEEP, 0.75)
    canvas.tint(canvas.blur(canvas.shape(_ellipse(256, 262, 7, 5)), 3), (250, 222, 200), 0.6)

    lips = _lips()
    upper = np.vstack([lips["upper_outer"], lips["seam"][::-1]])
    lower = np.vstack([lips["seam"], lips["lower_outer"][::-1]])
    canvas.paint(canvas.shape(upper), _LIP_UPPER)
    canvas.paint(canvas.shape(lower), _LIP_LOWER)
    canvas.tint(canvas.blur(canvas.shape(_ellipse(258, 301.5, 8, 2)), 1.5), (238, 176, 168), 0.6)
    canvas.paint(canvas.stroke(lips["seam"], 1.8), _LIP_LINE)

    _draw_front_hair(canvas)


def _tapered(centre: np.ndarray, start_width: float, end_width: float) -> np.ndarray:
    """Outline of a stroke whose width changes linearly along ``centre`` (brows, lash flicks)."""
    tangent = np.gradient(centre, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    half = np.linspace(start_width, end_width, len(centre))[:, None] / 2
    return np.vstack([centre + normal * half, (centre - normal * half)[::-1]])


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def draw_eye(canvas: Canvas, side: int, openness: float) -> None:
    eye = _eye(side, openness)
    opening = np.vstack([eye.upper, eye.lower[::-1]])
    lid_line = _catmull_rom(eye.upper, 4)
    if openness > 0.08:
        white = canvas.shape(opening)
        canvas.paint(white, _SCLERA)
        cx, cy = 256.0 + side * 41.0, 213.5
        iris = canvas.shape(_ellipse(cx, cy, 9.4, 9.4)) * white
        canvas.paint(iris, _IRIS)
        canvas.tint(canvas.stroke(_ellipse(cx, cy, 8.8, 8.8), 1.6) * white, _IRIS_RIM, 0.8)
        canvas.paint(canvas.shape(_ellipse(cx, cy, 4.2, 4.2)) * white, _PUPIL)
        canvas.paint(canvas.shape(_ellipse(cx + 3.0, cy - 3.2, 2.0, 2.0)) * white, (255, 255, 255), 0.95)
        # The upper lid shades the top of the eye.
        canvas.tint(canvas.blur(canvas.stroke(lid_line, 3.0), 2.5) * white, (120, 90, 80), 0.35)
    else:
        canvas.paint(canvas.shape(opening), _SKIN)
    # Lash line: thick along the upper lid, thinning into a short flick at the outer corner.
    canvas.paint(canvas.stroke(lid_line, 2.6), _LASH)
    flick = np.array([eye.upper[2], eye.upper[0], eye.upper[0] + np.array([side * 3.5, -2.5])])
    canvas.paint(canvas.shape(_tapered(_catmull_rom(flick[::-1], 4)[::-1], 2.6, 0.6)), _LASH)
    # Crease above the lid.
    crease = _catmull_rom(eye.upper[1:-1] + np.array([0.0, -5.0]) - np.array([0.0, 2.0]) * (1 - openness), 4)
    canvas.paint(canvas.stroke(crease, 1.4), _SKIN_DEEP, 0.35)
    canvas.paint(canvas.stroke(_catmull_rom(eye.lower[2:-2], 4), 1.0), _SKIN_DEEP, 0.25)


def _draw_front_hair(canvas: Canvas) -> None:
    """The hair framing the face: crown and a side-swept fringe, with a soft shine."""
    outline = _catmull_rom(
        np.array(
            [
                [146, 268],
                [136, 200],
                [150, 130],
                [196, 88],
                [256, 76],
                [318, 86],
                [364, 128],
                [378, 200],
                [368, 268],
                [354, 230],
                [348, 176],
                [326, 138],
                [292, 130],
                [250, 136],
                [214, 152],
                [186, 178],
                [170, 214],
                [162, 262],
            ]
        ),
        10,
        closed=True,
    )
    hair = canvas.shape(outline)
    # Soft shadow the hair casts on the forehead.
    canvas.tint(canvas.blur(hair, 6) * (1 - hair), _SKIN_DEEP, 0.35)
    canvas.paint(hair, _HAIR)
    shine = _catmull_rom(np.array([[196, 112], [236, 96], [286, 98], [324, 114]]), 10)
    canvas.tint(canvas.blur(canvas.stroke(shine, 8), 5) * hair, _HAIR_SHINE, 0.8)
