"""The classic renderer: CPU lip-sync without learned weights (the embedded default).

Each tick's 40 ms of reply audio sets a mouth pose (``MouthDriver``): how far
the mouth is open, from the loudness relative to the voice's running speech
level, and whether the lips are rounder or wider, from the spectrum. The pose
is drawn on the avatar's own frame for that tick (DESIGN.md section 5):

- a smooth displacement field over the lower face moves the lower lip and jaw
  down and the upper lip a little up, and draws the lip corners in or out;
  it is applied with one ``cv2.remap`` of the mouth region only, so the cost
  does not depend on the frame size;
- the gap that opens between the lips is filled with a dark mouth cavity, a
  hint of upper teeth and of the tongue, coloured from the avatar's own lips
  and lighting;
- the result is pasted back through the frame's feathered blend mask, and
  the displacement itself fades out with the mask, so nothing outside the
  mask changes and nothing ghosts inside its feather.

Every quantity is a continuous function of the pose, and the pose is a
smoothed function of the audio, so the mouth never flickers; a silent tick
gives the avatar's frame itself. Lengths are measured in units of the face
(lower-face height, mouth half-width), so the same constants suit any face
size and any output size.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import cv2
import numpy as np

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.renderers.base import (
    RENDER_SAMPLE_RATE,
    AvatarDataCache,
    SAMPLES_PER_TICK,
    Renderer,
    RendererSession,
    check_tick_audio,
    cycle_frame,
    output_shape_for,
)
from avatalk.avatars.store import LoadedAvatar

logger = logging.getLogger(__name__)

# --- Audio -> mouth pose ----------------------------------------------------------

#: Speech level assumed before any audio is heard (TTS voices peak near -10 dBFS).
_NOMINAL_LEVEL_DB = -14.0
#: The speech level never adapts below this, so faint noise is not mistaken for speech.
_MIN_LEVEL_DB = -45.0
#: Ticks quieter than this are silence whatever the level (digital or near silence).
_SILENCE_DB = -55.0
#: Loudness below the speech level that still opens the mouth a little, and where it is fully open.
_CLOSED_BELOW_DB = 26.0
_OPEN_BELOW_DB = 5.0
#: Share of a louder tick's excess taken into the speech level at once, and share of a
#: quieter tick's deficit per tick (about 8 s to follow a voice that got quieter).
_LEVEL_RISE = 0.5
_LEVEL_FALL = 0.005
#: Part of the previous opening kept when the audio gets quieter (release): closing
#: takes two or three ticks, which reads as natural, while opening is immediate.
_RELEASE = 0.45
#: Openings below this are drawn as the closed source mouth (the gap would be under a pixel).
_MIN_OPENING = 0.04
#: Part of the previous lip shape kept each tick; the shape follows vowels, not noise.
_SHAPE_KEEP = 0.5
#: Close vowels ("ee", "oo") open the jaw this much less than open ones ("ah").
_CLOSE_VOWEL_DAMPING = 0.25


@dataclass(frozen=True, slots=True)
class MouthPose:
    """How the mouth looks for one tick.

    ``opening`` is 0 for the closed source mouth up to 1 for the widest
    speaking opening; ``shape`` is -1 for rounded lips ("oh", "oo"), 0 for
    neutral and +1 for spread lips ("ee", "s").
    """

    opening: float
    shape: float


class MouthDriver:
    """Turns each tick's audio into a ``MouthPose`` (the per-session audio state).

    Loudness is measured against a running speech level rather than full
    scale, so quiet and loud voices both use the whole range of openings.
    Two spectral cues shape the mouth, both as dB ratios of band energies
    (figures measured on the embedded piper voice):

    - openness, first-formant region (600-1100 Hz) over the region below it
      (150-500 Hz): about +3 dB for "ah", -29 dB for "ee"; close vowels open
      the jaw less;
    - frontness, front-vowel formants (1800-3600 Hz) over back-vowel ones
      (500-1500 Hz): about +15 dB for "ee" and "s", -19 dB for "oh", -25 dB
      for "ah"; front sounds spread the lips, back vowels that are not open
      round them.

    The opening attacks within the tick it is heard (it never lags the
    audio) and releases over a couple of ticks; the shape is smoothed too.
    """

    _level_db: float
    _opening: float
    _shape: float

    def __init__(self) -> None:
        freqs = np.fft.rfftfreq(SAMPLES_PER_TICK, 1.0 / RENDER_SAMPLE_RATE)
        self._window = np.hanning(SAMPLES_PER_TICK).astype(np.float32)

        def band(low: float, high: float) -> np.ndarray:
            return np.flatnonzero((freqs >= low) & (freqs < high))

        self._bands = (band(150, 500), band(600, 1100), band(500, 1500), band(1800, 3600))
        self.reset()

    def reset(self) -> None:
        """Back to the state of a new session: nominal speech level, mouth closed."""
        self._level_db = _NOMINAL_LEVEL_DB
        self._opening = 0.0
        self._shape = 0.0

    def step(self, audio: np.ndarray) -> MouthPose:
        """The pose for one tick of audio (``SAMPLES_PER_TICK`` float32 samples)."""
        power = float(np.mean(np.square(audio, dtype=np.float64)))
        level = 10.0 * math.log10(power + 1e-12)
        target, shape_target = 0.0, 0.0
        if level > _SILENCE_DB:
            if level > self._level_db:
                self._level_db += _LEVEL_RISE * (level - self._level_db)
            elif level > self._level_db - _CLOSED_BELOW_DB:
                self._level_db = max(_MIN_LEVEL_DB, self._level_db + _LEVEL_FALL * (level - self._level_db))
            relative = level - self._level_db
            target = _clip01((relative + _CLOSED_BELOW_DB) / (_CLOSED_BELOW_DB - _OPEN_BELOW_DB))
        if target > 0.0:
            spectrum = np.abs(np.fft.rfft(audio * self._window)) ** 2
            below_f1, f1, back, front = (float(spectrum[band].sum()) + 1e-12 for band in self._bands)
            openness = 10.0 * math.log10(f1 / below_f1)
            frontness = 10.0 * math.log10(front / back)
            target *= 1.0 - _CLOSE_VOWEL_DAMPING * (1.0 - _clip01((openness + 20.0) / 22.0))
            spread = _clip01((frontness - 2.0) / 10.0)
            rounded = _clip01((-frontness - 8.0) / 10.0) * (1.0 - _clip01((openness + 4.0) / 10.0))
            shape_target = spread - rounded
        if target >= self._opening:
            self._opening = target
        else:
            self._opening = target + _RELEASE * (self._opening - target)
            if self._opening < _MIN_OPENING:
                self._opening = 0.0
        self._shape = shape_target + _SHAPE_KEEP * (self._shape - shape_target)
        return MouthPose(opening=self._opening if self._opening >= _MIN_OPENING else 0.0, shape=self._shape)


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, smooth (zero slope at both ends) in between: seamless fades."""
    t: np.ndarray = np.clip(x, 0.0, 1.0)
    eased: np.ndarray = t * t * (3.0 - 2.0 * t)
    return eased


# --- Mouth geometry of one avatar frame ---------------------------------------------

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
#: Below the chin, the motion has faded out after this fraction of the mouth-to-chin distance.
_NECK_REACH = 0.3
#: The jaw's motion spans this many half-widths of the mouth either side of its centre.
_JAW_REACH = 3.0
#: Upper teeth: tallest visible band; a source mouth open this far already shows its own teeth.
_TEETH_HEIGHT = 0.07
_OPEN_SOURCE = 0.08
#: Base of the nose (subnasale), the end of the nose midline.
_NOSE_BASE = mesh.NOSE_MIDLINE[-1]

_TEETH_RGB = np.array([238.0, 232.0, 220.0], np.float32)
_CAVITY_TINT = np.array([0.24, 0.11, 0.11], np.float32)
_TONGUE_TINT = 0.62


@dataclass(frozen=True, slots=True)
class _MouthPlan:
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


def _plan_mouth(frame: np.ndarray, points: np.ndarray, box: np.ndarray, mask: np.ndarray) -> _MouthPlan | None:
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
    return _MouthPlan(
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
        teeth=_clip01(1.0 - source_gap / (_OPEN_SOURCE * face_height)),
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

    The motion is zero beyond ``_JAW_REACH`` half-widths along the mouth and
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
    u = np.array([u_mid - _JAW_REACH * half, u_mid + _JAW_REACH * half])[:, None]
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
    weight: np.ndarray = (np.minimum(alpha * 2.0, 1.0) * _smoothstep(inside / max(fade, 1.0))).astype(np.float32)
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


# --- Drawing -----------------------------------------------------------------------


def _draw_mouth(frame: np.ndarray, plan: _MouthPlan, pose: MouthPose) -> np.ndarray:
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
    profile = xh * (1.0 - _smoothstep((np.abs(xh) - 1.0) / 1.2))
    top, bottom = m0 - 1.2 * plan.upper_lip - rise, m0 + 1.2 * plan.lower_lip + drop
    band = _smoothstep((v - plan.nose) / (top - plan.nose)) * (1.0 - _smoothstep((v - bottom) / (plan.neck - bottom)))
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
    ramp = _smoothstep((v - seam - drop * lens) / (1.5 * plan.lower_lip + 1.6 * drop + 1e-3))
    jaw = np.square(np.maximum(1.0 - xn * xn / (_JAW_REACH * _JAW_REACH), 0.0))
    reach = lens + (1.0 - lens) * jaw * ramp
    t1 = m0 + 1.1 * plan.lower_lip + drop
    t2 = plan.chin + _CHIN_FOLLOW * drop
    follow = (
        1.0
        - (1.0 - _CHIN_FOLLOW) * _smoothstep((v - t1) / (t2 - t1))
        - _CHIN_FOLLOW * _smoothstep((v - t2) / (plan.neck - t2))
    )
    down = drop * reach * follow
    # Above it: the upper lip rises, the skin up to the nose absorbing the motion.
    t0 = m0 - 1.1 * plan.upper_lip - rise
    up = rise * lens * _smoothstep((v - plan.nose) / (t0 - plan.nose))
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
    plan: _MouthPlan, below_seam: np.ndarray, lens: np.ndarray, q: np.ndarray, drop: float, rise: float
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
        shade = (0.62 + 0.38 * q) * (0.8 + 0.2 * _smoothstep(from_top / 2.0))
        inside += (plan.teeth_rgb * shade[..., None] - inside) * teeth[..., None]
    return inside


# --- Renderer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AvatarData:
    """An avatar prepared for one output size: frames at that size and their mouth plans."""

    frames: tuple[np.ndarray, ...]
    plans: tuple[_MouthPlan | None, ...]
    shape: tuple[int, int]


def _prepare_avatar(avatar: LoadedAvatar, output_size: int) -> _AvatarData:
    """Scale every distinct frame and measure its mouth once (repeated frames share the work)."""
    height, width = avatar.frames[0].shape[:2]
    out_h, out_w = output_shape_for(width, height, output_size)
    sx, sy = out_w / width, out_h / height
    scale = np.array([sx, sy], np.float32)
    interpolation = cv2.INTER_AREA if out_w < width else cv2.INTER_LINEAR
    scaled: dict[int, np.ndarray] = {}
    plans: dict[tuple[int, int, bytes, bytes], _MouthPlan | None] = {}
    frames_out: list[np.ndarray] = []
    plans_out: list[_MouthPlan | None] = []
    for index, frame in enumerate(avatar.frames):
        image = scaled.get(id(frame))
        if image is None:
            if (out_h, out_w) == frame.shape[:2]:
                image = frame
            else:
                image = cv2.resize(frame, (out_w, out_h), interpolation=interpolation)
                image.setflags(write=False)
            scaled[id(frame)] = image
        frames_out.append(image)
        points, box, mask = avatar.landmarks[index], avatar.boxes[index], avatar.masks[index]
        key = (id(frame), id(mask), points.tobytes(), box.tobytes())
        if key not in plans:
            # Pixel centres sit at integer coordinates; box edges are pixel boundaries.
            points_out = (points + 0.5) * scale - 0.5
            box_out = np.round(box.astype(np.float64) * np.array([sx, sy, sx, sy])).astype(np.int32)
            plans[key] = _plan_mouth(image, points_out, box_out, mask)
            if plans[key] is None:
                logger.warning(
                    "avatar %s frame %d: no usable mouth region; it is shown unanimated", avatar.manifest.id, index
                )
        plans_out.append(plans[key])
    return _AvatarData(frames=tuple(frames_out), plans=tuple(plans_out), shape=(out_h, out_w))


class ClassicRenderer(Renderer):
    """Audio-driven mouth warp on the avatar's own frames; CPU only, no model weights.

    Per-avatar data (scaled frames, mouth measurements, blend weights) is
    cached for the ``max_avatars`` most recently opened avatar/size pairs,
    keyed by the avatar's folder and creation time so that a re-prepared
    avatar is never served from stale data.
    """

    name = "classic"

    def __init__(self, max_avatars: int = 4) -> None:
        self._cache: AvatarDataCache[_AvatarData] = AvatarDataCache(max_avatars)

    def open(self, avatar: LoadedAvatar, output_size: int) -> ClassicSession:
        def build() -> _AvatarData:
            started = time.perf_counter()
            data = _prepare_avatar(avatar, output_size)
            logger.info(
                "classic renderer: prepared avatar %s at %dx%d in %.0f ms",
                avatar.manifest.id,
                data.shape[1],
                data.shape[0],
                (time.perf_counter() - started) * 1000,
            )
            return data

        data = self._cache.get(avatar, output_size, build)
        return ClassicSession(avatar, data)


class ClassicSession(RendererSession):
    """One conversation with the classic renderer: the audio state lives here.

    Called from one worker thread at a time; each call takes a few
    milliseconds of one core.
    """

    def __init__(self, avatar: LoadedAvatar, data: _AvatarData) -> None:
        self._avatar = avatar
        self._data = data
        self._driver = MouthDriver()

    @property
    def output_shape(self) -> tuple[int, int]:
        return self._data.shape

    def idle_frame(self, tick: int) -> np.ndarray:
        return self._data.frames[cycle_frame(self._avatar, tick)]

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        pose = self._driver.step(check_tick_audio(audio))
        index = cycle_frame(self._avatar, tick)
        frame = self._data.frames[index]
        plan = self._data.plans[index]
        if pose.opening == 0.0 or plan is None:
            return frame
        out = frame.copy()
        out[plan.roi] = _draw_mouth(frame, plan, pose)
        out.setflags(write=False)
        return out

    def reset(self) -> None:
        self._driver.reset()
