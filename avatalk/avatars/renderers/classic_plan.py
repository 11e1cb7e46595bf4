"""Mouth geometry of one avatar frame for the classic renderer, measured once per frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.renderers.classic_driver import clip01, smoothstep

# Lengths across the mouth are fractions of the lower face's height (base of the nose to
# chin), which does not change with a smile; lengths along it are fractions of half the
# distance between the inner lip corners.
#: Below the chin, the motion has faded out after this fraction of the mouth-to-chin distance.
_NECK_REACH = 0.3
#: The jaw's motion spans this many half-widths of the mouth either side of its centre.
JAW_REACH = 3.0
#: A source mouth open this far already shows its own upper teeth (none are drawn then).
_OPEN_SOURCE = 0.08
#: Base of the nose (subnasale), the end of the nose midline.
_NOSE_BASE = mesh.NOSE_MIDLINE[-1]

_TEETH_RGB = np.array([238.0, 232.0, 220.0], np.float32)
_CAVITY_TINT = np.array([0.24, 0.11, 0.11], np.float32)
_TONGUE_TINT = 0.62


@dataclass(frozen=True, slots=True)
class MouthPlan:
    """Everything about one avatar frame that the mouth drawing needs, at output scale.

    ``roi`` is the part of the frame the mouth motion can reach (within the
    blend mask); coordinates are relative to it. ``u`` runs along the mouth
    from the person's right corner to the left one, ``v`` across it,
    downwards, both from the mouth centre.
    """

    roi: tuple[slice, slice]
    alpha: np.ndarray  # float32 blend weights in [0, 1] over the region
    weight: np.ndarray  # float32 share of the motion each pixel takes (0 at the mask's edge and the face's outline)
    centre: tuple[float, float]
    axis: tuple[float, float]  # cos and sin of the mouth's tilt
    face_height: float  # base of the nose to chin
    inner_centre: float  # u of the midpoint between the inner corners
    inner_half: float  # half the distance between the inner corners
    seam: tuple[float, ...]  # line between the lips: v as a polynomial of (u - inner_centre) / inner_half
    seam_mid: float  # v of the seam at the centre
    upper_lip: float  # thickness of the upper lip at the centre
    lower_lip: float  # thickness of the lower lip at the centre
    nose: float  # v of the base of the nose: the upper lip's motion ends here
    chin: float  # v of the chin
    neck: float  # v below the chin where the jaw's motion ends
    teeth: float  # 0..1: how much synthetic upper teeth to show (0 when the source shows its own)
    cavity_rgb: np.ndarray
    tongue_rgb: np.ndarray
    teeth_rgb: np.ndarray


def _local(points: np.ndarray, centre: np.ndarray, cos: float, sin: float) -> np.ndarray:
    """Image points -> (u, v) mouth coordinates."""
    d = points - centre
    return np.stack([d[..., 0] * cos + d[..., 1] * sin, d[..., 1] * cos - d[..., 0] * sin], axis=-1)


def plan_mouth(frame: np.ndarray, points: np.ndarray, box: np.ndarray, mask: np.ndarray) -> MouthPlan | None:
    """Measure one frame's mouth (``points`` and ``box`` already at the frame's scale).

    Returns None when the mask or the mouth is degenerate (a face at the
    frame edge, or hardly a face at all), in which case that frame is only
    ever shown as it is.
    """
    right, left = points[mesh.MOUTH_RIGHT_CORNER], points[mesh.MOUTH_LEFT_CORNER]
    mouth_width = float(np.linalg.norm(left - right))
    if mouth_width < 4.0:
        return None
    cos, sin = (float(c) for c in (left - right) / mouth_width)
    centre = (right + left) / 2.0
    inner_upper = _local(points[list(mesh.LIPS_INNER_UPPER)], centre, cos, sin)
    inner_lower = _local(points[list(mesh.LIPS_INNER_LOWER)], centre, cos, sin)
    seam_points = (inner_upper + inner_lower) / 2.0
    u_right, u_left = float(seam_points[0, 0]), float(seam_points[-1, 0])
    inner_half = (u_left - u_right) / 2.0
    if inner_half < 2.0:
        return None
    inner_centre = (u_left + u_right) / 2.0
    seam = np.polyfit((seam_points[:, 0] - inner_centre) / inner_half, seam_points[:, 1], 4)
    seam_mid = float(seam[-1])
    outer_upper = _local(points[list(mesh.LIPS_OUTER_UPPER)], centre, cos, sin)
    outer_lower = _local(points[list(mesh.LIPS_OUTER_LOWER)], centre, cos, sin)
    mid = len(mesh.LIPS_OUTER_UPPER) // 2  # the centre of each lip contour
    nose_v, chin_v = (float(v) for v in _local(points[[_NOSE_BASE, mesh.CHIN]], centre, cos, sin)[:, 1])
    face_height = chin_v - nose_v
    if face_height < 4.0:
        return None
    upper_lip = max(seam_mid - float(outer_upper[mid, 1]), 0.1 * face_height)
    lower_lip = max(float(outer_lower[mid, 1]) - seam_mid, 0.1 * face_height)
    # Keep room for the skin between lips, nose and chin even when landmarks crowd them, so
    # every fade below spans a positive distance.
    nose = min(nose_v, seam_mid - 1.3 * upper_lip - 0.1 * face_height)
    chin = max(chin_v, seam_mid + 1.3 * lower_lip + 0.3 * face_height)
    neck = chin + _NECK_REACH * (chin - seam_mid)
    source_gap = float(inner_lower[mid, 1] - inner_upper[mid, 1])

    roi = _region(frame.shape, box, mask, centre, (cos, sin), (inner_centre, inner_half), (nose, neck))
    if roi is None:
        return None
    (ry0, ry1, rx0, rx1), alpha = roi
    local_points = points - np.array([rx0, ry0], np.float32)
    lips_rgb, skin_rgb = _colours(frame[ry0:ry1, rx0:rx1], local_points, alpha)
    light = float(np.clip(np.dot(skin_rgb, [0.299, 0.587, 0.114]) / 175.0, 0.5, 1.0))
    return MouthPlan(
        roi=(slice(ry0, ry1), slice(rx0, rx1)),
        alpha=alpha,
        weight=_motion_weight(alpha, local_points, 0.12 * face_height),
        centre=(float(centre[0]) - rx0, float(centre[1]) - ry0),
        axis=(cos, sin),
        face_height=face_height,
        inner_centre=inner_centre,
        inner_half=inner_half,
        seam=tuple(float(c) for c in seam),
        seam_mid=seam_mid,
        upper_lip=upper_lip,
        lower_lip=lower_lip,
        nose=nose,
        chin=chin,
        neck=neck,
        teeth=clip01(1.0 - source_gap / (_OPEN_SOURCE * face_height)),
        cavity_rgb=lips_rgb * _CAVITY_TINT,
        tongue_rgb=lips_rgb * _TONGUE_TINT,
        teeth_rgb=_TEETH_RGB * light,
    )


def _region(
    shape: tuple[int, ...],
    box: np.ndarray,
    mask: np.ndarray,
    centre: np.ndarray,
    axis: tuple[float, float],
    across: tuple[float, float],
    span: tuple[float, float],
) -> tuple[tuple[int, int, int, int], np.ndarray] | None:
    """The frame region the mouth motion can reach, and the blend mask's weights over it.

    The motion is zero beyond ``JAW_REACH`` half-widths along the mouth and
    outside ``span`` (nose to neck) across it, and the output is the source
    wherever the mask is zero, so only the intersection of that rectangle
    (rotated with the mouth) and the mask's extent is ever drawn.
    Returns ``(y0, y1, x0, x1)`` and the mask over it (float32 in [0, 1]),
    or None if they do not meet.
    """
    height, width = shape[:2]
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = max(0, min(x1, width)), max(0, min(x2, width))
    y1, y2 = max(0, min(y1, height)), max(0, min(y2, height))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    stretched = cv2.resize(mask, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    rows, cols = np.flatnonzero(stretched.any(axis=1)), np.flatnonzero(stretched.any(axis=0))
    if rows.size == 0:
        return None
    (cos, sin), (u_mid, half), (v_top, v_bottom) = axis, across, span
    u = np.array([u_mid - JAW_REACH * half, u_mid + JAW_REACH * half])[:, None]
    v = np.array([v_top, v_bottom])[None, :]
    xs = (centre[0] + u * cos - v * sin).ravel()
    ys = (centre[1] + u * sin + v * cos).ravel()
    x0 = max(x1 + int(cols[0]), math.floor(xs.min()))
    x3 = min(x1 + int(cols[-1]) + 1, math.ceil(xs.max()) + 1)
    y0 = max(y1 + int(rows[0]), math.floor(ys.min()))
    y3 = min(y1 + int(rows[-1]) + 1, math.ceil(ys.max()) + 1)
    if x3 - x0 < 2 or y3 - y0 < 2:
        return None
    alpha = stretched[y0 - y1 : y3 - y1, x0 - x1 : x3 - x1].astype(np.float32) / 255.0
    alpha.setflags(write=False)
    return (y0, y3, x0, x3), alpha


def _motion_weight(alpha: np.ndarray, points: np.ndarray, fade: float) -> np.ndarray:
    """How much of the mouth motion each pixel of the region takes.

    The motion fades out where the blend mask fades (so the feathered paste
    never shows a doubled edge) and toward the face's outline, which must
    not move: the mask reaches past the outline, and a jaw line or cheek
    dragged against the hair or background behind it would smear.
    ``points`` are relative to the region; ``fade`` is in pixels.
    """
    face = np.zeros(alpha.shape, np.uint8)
    cv2.fillPoly(face, [np.round(points[list(mesh.FACE_OVAL)]).astype(np.int32)], 255)
    inside = cv2.distanceTransform(face, cv2.DIST_L2, 3)
    weight: np.ndarray = (np.minimum(alpha * 2.0, 1.0) * smoothstep(inside / max(fade, 1.0))).astype(np.float32)
    weight.setflags(write=False)
    return weight


def _colours(region: np.ndarray, points: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean lip colour and mean skin colour around the mouth, so the inside of the mouth matches the light.

    ``points`` are relative to ``region``.
    """
    pixels = region.reshape(-1, 3).astype(np.float32)
    lips = np.zeros(alpha.shape, np.uint8)
    outline = np.vstack([points[list(mesh.LIPS_OUTER_UPPER)], points[list(mesh.LIPS_OUTER_LOWER)][::-1]])
    inside = np.vstack([points[list(mesh.LIPS_INNER_UPPER)], points[list(mesh.LIPS_INNER_LOWER)][::-1]])
    cv2.fillPoly(lips, [np.round(outline).astype(np.int32)], 1)
    cv2.fillPoly(lips, [np.round(inside).astype(np.int32)], 0)
    on_lips = lips.reshape(-1).astype(bool)
    skin = (alpha.reshape(-1) > 0.8) & ~on_lips
    lips_rgb = pixels[on_lips].mean(axis=0) if on_lips.any() else np.array([170.0, 90.0, 90.0], np.float32)
    skin_rgb = pixels[skin].mean(axis=0) if skin.any() else pixels.mean(axis=0)
    return lips_rgb.astype(np.float32), skin_rgb.astype(np.float32)
