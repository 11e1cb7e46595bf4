"""Drawing the classic renderer's mouth: one displacement-field warp plus the inside of the mouth."""

from __future__ import annotations

import cv2
import numpy as np

from avatalk.avatars.renderers.classic_driver import MouthPose, smoothstep
from avatalk.avatars.renderers.classic_plan import JAW_REACH, MouthPlan

# Lengths across the mouth are fractions of the lower face's height (base of the nose to
# chin), which does not change with a smile; lengths along it are fractions of half the
# distance between the inner lip corners.
#: Widest opening of the lips: the lower lip drops this far, the upper lip rises this far.
_LOWER_DROP = 0.17
_UPPER_RISE = 0.04
#: Lip corners: moved out for spread lips, in for rounded ones, and slightly in as the jaw opens
#: (fractions of the half-width between the corners).
_SPREAD_OUT = 0.12
_ROUND_IN = 0.22
_OPEN_IN = 0.04
#: Part of the lower lip's drop that the chin follows (the rest compresses the skin between).
_CHIN_FOLLOW = 0.35
#: Upper teeth: tallest visible band.
_TEETH_HEIGHT = 0.07


def draw_mouth(frame: np.ndarray, plan: MouthPlan, pose: MouthPose) -> np.ndarray:
    """The plan's region of ``frame`` (uint8 RGB) with the mouth in ``pose``.

    The displacement field is built backwards (for each output pixel, where
    in the source it comes from), in mouth coordinates:

    - along the mouth, lips are stretched out or drawn in around the centre,
      the motion fading out beyond the corners and toward nose and neck;
    - across it, everything below the line between the lips moves down (the
      lower lip fully, the chin partly, the neck not at all) and everything
      above it moves up (the upper lip, fading out at the nose), most in the
      middle and nothing at the corners.

    Output pixels whose source lies on the other side of the lip line form the
    opened gap; their depth into it gives an anti-aliased cavity edge that
    matches the warped lips exactly. The motion also fades with the blend
    mask, so the feathered paste-back never shows a doubled edge.
    """
    spread = min(1.0, 2.5 * pose.opening)
    vertical = pose.opening * (1.0 - 0.2 * max(pose.shape, 0.0))
    corners = (
        spread * (_SPREAD_OUT * max(pose.shape, 0.0) - _ROUND_IN * max(-pose.shape, 0.0)) - _OPEN_IN * pose.opening
    )
    roundness = 0.4 + 0.5 * spread * max(-pose.shape, 0.0)
    drop = vertical * _LOWER_DROP * plan.face_height
    rise = vertical * _UPPER_RISE * plan.face_height
    m0, half = plan.seam_mid, plan.inner_half

    region = frame[plan.roi]
    h, wd = region.shape[:2]
    cos, sin = plan.axis
    xs = np.arange(wd, dtype=np.float32) - np.float32(plan.centre[0])
    ys = (np.arange(h, dtype=np.float32) - np.float32(plan.centre[1]))[:, None]
    u = xs * cos + ys * sin
    v = ys * cos - xs * sin
    weight = plan.weight

    # Along the mouth: the corners move by `corners` x the half-width and the cheeks beside
    # them follow, fading out within 2.2 half-widths; across, the motion spans the lips
    # (and the lower lip's drop) and fades out toward the nose and the neck.
    xh = (u - plan.inner_centre) / half
    profile = xh * (1.0 - smoothstep((np.abs(xh) - 1.0) / 1.2))
    top, bottom = m0 - 1.2 * plan.upper_lip - rise, m0 + 1.2 * plan.lower_lip + drop
    band = smoothstep((v - plan.nose) / (top - plan.nose)) * (1.0 - smoothstep((v - bottom) / (plan.neck - bottom)))
    us = u - (corners * half) * profile * band * weight

    # Across: the lip line at the source position, and the opening profile along it
    # (a lens between parabolic and elliptic, rounder for rounded lips).
    xn = (us - plan.inner_centre) / half
    xc = np.clip(xn, -1.0, 1.0)
    seam = np.full_like(xc, plan.seam[0])
    for coefficient in plan.seam[1:]:
        seam = seam * xc + coefficient
    q = np.clip(1.0 - xn * xn, 0.0, 1.0)
    lens = q + roundness * (np.sqrt(q) - q)
    below = (v >= seam).astype(np.float32)

    # Below the lip line: the lower lip drops by the lens profile; under it the jaw (a
    # broader profile, which also carries the skin below the corners) takes over.
    ramp = smoothstep((v - seam - drop * lens) / (1.5 * plan.lower_lip + 1.6 * drop + 1e-3))
    jaw = np.square(np.maximum(1.0 - xn * xn / (JAW_REACH * JAW_REACH), 0.0))
    reach = lens + (1.0 - lens) * jaw * ramp
    t1 = m0 + 1.1 * plan.lower_lip + drop
    t2 = plan.chin + _CHIN_FOLLOW * drop
    follow = (
        1.0
        - (1.0 - _CHIN_FOLLOW) * smoothstep((v - t1) / (t2 - t1))
        - _CHIN_FOLLOW * smoothstep((v - t2) / (plan.neck - t2))
    )
    down = drop * reach * follow
    # Above it: the upper lip rises, the skin up to the nose absorbing the motion.
    t0 = m0 - 1.1 * plan.upper_lip - rise
    up = rise * lens * smoothstep((v - plan.nose) / (t0 - plan.nose))
    vs = v - (down * below - up * (1.0 - below)) * weight

    du, dv = us - u, vs - v
    x0, y0 = plan.roi[1].start, plan.roi[0].start
    map_x = np.arange(x0, x0 + wd, dtype=np.float32) + (du * cos - dv * sin)
    map_y = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + (du * sin + dv * cos)
    warped = cv2.remap(frame, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE).astype(np.float32)

    # The inside of the mouth, where the lips parted. Coverage is the depth past the lip
    # line (anti-aliasing the lip edges), but never more than the gap is tall, so a gap
    # thinner than a pixel is faint and there is none beyond the corners.
    depth = (seam - vs) * (2.0 * below - 1.0)
    gap = np.clip(np.minimum(depth + 0.5, (drop + rise) * lens), 0.0, 1.0)
    rows, cols = np.flatnonzero(gap.any(axis=1)), np.flatnonzero(gap.any(axis=0))
    if rows.size:
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        inside = _cavity(plan, v[box] - seam[box], lens[box], q[box], drop, rise)
        warped[box] += (inside - warped[box]) * gap[box][..., None]

    source = region.astype(np.float32)
    blended = source + (warped - source) * plan.alpha[..., None]
    result: np.ndarray = np.clip(blended + 0.5, 0.0, 255.0).astype(np.uint8)
    return result


def _cavity(
    plan: MouthPlan, below_seam: np.ndarray, lens: np.ndarray, q: np.ndarray, drop: float, rise: float
) -> np.ndarray:
    """Colours of the inside of the mouth over the gap's bounding box (float32 RGB).

    ``below_seam`` is each pixel's distance below the source lip line. The
    cavity is darkest in the middle and picks up the lips' colour near their
    inner edges; the tongue shows at the bottom of wide openings; the upper
    teeth hang from the upper lip, shaded by it and fading toward the
    corners, unless the source frame shows its own teeth.
    """
    gap_height = (drop + rise) * lens
    from_top = below_seam + rise * lens
    from_bottom = drop * lens - below_seam
    near_edge = np.exp(-np.maximum(np.minimum(from_top, from_bottom), 0.0) / (0.15 * gap_height + 0.5))
    inside: np.ndarray = plan.cavity_rgb * (0.75 + 0.75 * near_edge)[..., None]
    tongue = np.clip((0.4 * gap_height - from_bottom) / (0.25 * gap_height + 1.0), 0.0, 1.0)
    tongue *= np.clip((gap_height - 0.08 * plan.face_height) / (0.1 * plan.face_height), 0.0, 1.0) * 0.7
    inside += (plan.tongue_rgb - inside) * tongue[..., None]
    if plan.teeth > 0.0:
        teeth_height = plan.teeth * np.minimum(0.3 * gap_height, _TEETH_HEIGHT * plan.face_height)
        teeth = np.clip(teeth_height - from_top + 0.5, 0.0, 1.0) * np.clip(q / 0.7, 0.0, 1.0)
        shade = (0.62 + 0.38 * q) * (0.8 + 0.2 * smoothstep(from_top / 2.0))
        inside += (plan.teeth_rgb * shade[..., None] - inside) * teeth[..., None]
    return inside
