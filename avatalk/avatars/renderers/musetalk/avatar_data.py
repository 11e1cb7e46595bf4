"""A MuseTalk avatar prepared for one output size, and the paste of a generated face into its frame."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from avatalk.avatars.renderers.base import output_shape_for
from avatalk.avatars.renderers.musetalk.blending import Paste, jaw_paste
from avatalk.avatars.store import LoadedAvatar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AvatarData:
    """An avatar ready for one output size: scaled frames, paste geometry and latents on the device."""

    frames: tuple[np.ndarray, ...]
    pastes: tuple[Paste | None, ...]
    latents: torch.Tensor  # (N, 8, 32, 32) on the device
    shape: tuple[int, int]


def prepare_avatar(avatar: LoadedAvatar, output_size: int, latents: torch.Tensor) -> AvatarData:
    """Scale the frames and compute each frame's jaw-mode paste once (repeated frames share them)."""
    height, width = avatar.frames[0].shape[:2]
    out_h, out_w = output_shape_for(width, height, output_size)
    scale = np.array([out_w / width, out_h / height])
    interpolation = cv2.INTER_AREA if out_w < width else cv2.INTER_LINEAR
    scaled: dict[int, np.ndarray] = {}
    pastes: dict[tuple[int, bytes], Paste | None] = {}
    frames_out: list[np.ndarray] = []
    pastes_out: list[Paste | None] = []
    for index, frame in enumerate(avatar.frames):
        image = scaled.get(id(frame))
        if image is None:
            image = frame
            if frame.shape[:2] != (out_h, out_w):
                image = cv2.resize(frame, (out_w, out_h), interpolation=interpolation)
            image.setflags(write=False)
            scaled[id(frame)] = image
        frames_out.append(image)
        key = (id(frame), avatar.boxes[index].tobytes())
        if key not in pastes:
            box = np.round(avatar.boxes[index].astype(np.float64) * np.tile(scale, 2)).astype(int)
            pastes[key] = jaw_paste(avatar.landmarks[index] * scale, box, (out_h, out_w))
            if pastes[key] is None:
                logger.warning("avatar %s frame %d: face box too small to paste into", avatar.manifest.id, index)
        pastes_out.append(pastes[key])
    return AvatarData(tuple(frames_out), tuple(pastes_out), latents, (out_h, out_w))


def paste_face(frame: np.ndarray, face: np.ndarray, paste: Paste) -> np.ndarray:
    """``frame`` with the generated 256 x 256 ``face`` resized into the crop box and blended through alpha."""
    height, width = paste.alpha.shape[:2]
    resized = cv2.resize(face, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    region = frame[paste.rows, paste.cols].astype(np.float32)
    out = frame.copy()
    out[paste.rows, paste.cols] = np.clip(region + (resized - region) * paste.alpha + 0.5, 0.0, 255.0).astype(np.uint8)
    out.setflags(write=False)
    return out
