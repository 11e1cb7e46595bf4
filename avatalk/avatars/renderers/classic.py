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
import time
from dataclasses import dataclass

import cv2
import numpy as np

from avatalk.avatars.renderers.base import (
    AvatarDataCache,
    Renderer,
    RendererSession,
    check_tick_audio,
    cycle_frame,
    output_shape_for,
)
from avatalk.avatars.renderers.classic_draw import draw_mouth
from avatalk.avatars.renderers.classic_driver import MouthDriver, MouthPose
from avatalk.avatars.renderers.classic_plan import MouthPlan, plan_mouth
from avatalk.avatars.store import LoadedAvatar

__all__ = ["ClassicRenderer", "ClassicSession", "MouthDriver", "MouthPose"]

logger = logging.getLogger(__name__)

# --- Renderer ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AvatarData:
    """An avatar prepared for one output size: frames at that size and their mouth plans."""

    frames: tuple[np.ndarray, ...]
    plans: tuple[MouthPlan | None, ...]
    shape: tuple[int, int]


def _prepare_avatar(avatar: LoadedAvatar, output_size: int) -> _AvatarData:
    """Scale every distinct frame and measure its mouth once (repeated frames share the work)."""
    height, width = avatar.frames[0].shape[:2]
    out_h, out_w = output_shape_for(width, height, output_size)
    sx, sy = out_w / width, out_h / height
    scale = np.array([sx, sy], np.float32)
    interpolation = cv2.INTER_AREA if out_w < width else cv2.INTER_LINEAR
    scaled: dict[int, np.ndarray] = {}
    plans: dict[tuple[int, int, bytes, bytes], MouthPlan | None] = {}
    frames_out: list[np.ndarray] = []
    plans_out: list[MouthPlan | None] = []
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
            plans[key] = plan_mouth(image, points_out, box_out, mask)
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
        out[plan.roi] = draw_mouth(frame, plan, pose)
        out.setflags(write=False)
        return out

    def reset(self) -> None:
        self._driver.reset()
