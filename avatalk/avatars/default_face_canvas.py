"""Painting primitives of the built-in avatar: a supersampled canvas and movable layers.

Features are filled as anti-aliased polygons in a 512 x 512 design space
(``DESIGN``) on a canvas drawn at a multiple of the output size; a finished
canvas becomes a ``Layer``, which each frame warps and composites cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

DESIGN = 512.0  # all geometry is in a 512 x 512 design space


class Canvas:
    """A premultiplied RGBA float layer drawn at supersampled resolution.

    Coverage masks are full-size, but painting and blurring only touch the
    bounding box of what is covered: most features are small, and whole-layer
    arithmetic for each stroke would make drawing take seconds.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.scale = size / DESIGN
        self.rgba = np.zeros((size, size, 4), np.float32)

    def shape(self, polygon: np.ndarray) -> np.ndarray:
        """Coverage (0..1) of a filled polygon given in design units, anti-aliased."""
        cover = np.zeros((self.size, self.size), np.uint8)
        fixed = np.round(np.asarray(polygon) * self.scale * 16).astype(np.int32)
        cv2.fillPoly(cover, [fixed], 255, cv2.LINE_AA, 4)
        return cover.astype(np.float32) / 255.0

    def stroke(self, polyline: np.ndarray, width: float) -> np.ndarray:
        """Coverage of a thick anti-aliased open polyline."""
        cover = np.zeros((self.size, self.size), np.uint8)
        fixed = np.round(np.asarray(polyline) * self.scale * 16).astype(np.int32)
        cv2.polylines(cover, [fixed], False, 255, max(1, round(width * self.scale)), cv2.LINE_AA, 4)
        return cover.astype(np.float32) / 255.0

    def blur(self, cover: np.ndarray, radius: float) -> np.ndarray:
        """Gaussian-softened coverage (``radius`` is sigma in design units)."""
        sigma = radius * self.scale
        region = _extent(cover, margin=math.ceil(3 * sigma))
        out = np.zeros_like(cover)
        if region is not None:
            out[region] = cv2.GaussianBlur(cover[region], (0, 0), sigma)
        return out

    def paint(self, cover: np.ndarray, color: tuple[int, int, int], alpha: float = 1.0) -> None:
        """Lay ``color`` over the layer where ``cover`` is, with opacity ``alpha``."""
        region = _extent(cover)
        if region is None:
            return
        a = (cover[region] * alpha)[..., None]
        src = np.array([*color, 255.0], np.float32) / 255.0
        target = self.rgba[region]
        target *= 1.0 - a
        target += a * src

    def tint(self, cover: np.ndarray, color: tuple[int, int, int], alpha: float) -> None:
        """Shade already-painted pixels toward ``color`` without changing their coverage."""
        region = _extent(cover)
        if region is None:
            return
        target = self.rgba[region]
        a = (cover[region] * alpha)[..., None] * target[..., 3:4]
        src = np.array(color, np.float32) / 255.0
        target[..., :3] = target[..., :3] * (1.0 - a) + src * a

    def layer(self, size: int) -> Layer:
        """The drawing scaled down to the output size."""
        return Layer.from_rgba(cv2.resize(self.rgba, (size, size), interpolation=cv2.INTER_AREA))


def _extent(cover: np.ndarray, margin: int = 0) -> tuple[slice, slice] | None:
    """Row and column slices around the non-zero part of a 2-D array, grown by ``margin``."""
    rows = np.flatnonzero(cover.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(cover[rows[0] : rows[-1] + 1].any(axis=0))
    height, width = cover.shape
    return (
        slice(max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin)),
        slice(max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin)),
    )


@dataclass(frozen=True)
class Layer:
    """A drawn layer at output size and the region where it is not empty.

    Kept as premultiplied colour plus per-channel transparency (1 - alpha),
    so compositing is one multiply and one add, done by OpenCV.
    """

    color: np.ndarray
    clear: np.ndarray
    region: tuple[slice, slice]

    @classmethod
    def from_rgba(cls, rgba: np.ndarray) -> Layer:
        region = _extent(rgba[..., 3])
        assert region is not None, "empty layer"
        clear = np.repeat(1.0 - rgba[..., 3:4], 3, axis=2)
        return cls(np.ascontiguousarray(rgba[..., :3]), clear, region)

    def composite(self, image: np.ndarray, matrix: np.ndarray, margin: int) -> None:
        """Warp the layer by ``matrix`` and lay it over ``image`` in place.

        Only the layer's own region (grown by ``margin`` pixels, the most it
        moves) is warped and blended, which keeps a frame to a few ms.
        """
        rows, cols = self.region
        size = image.shape[0]
        y0, y1 = max(0, rows.start - margin), min(size, rows.stop + margin)
        x0, x1 = max(0, cols.start - margin), min(size, cols.stop + margin)
        shifted = matrix.copy()
        shifted[:, 2] -= (x0, y0)
        dsize = (x1 - x0, y1 - y0)
        color = cv2.warpAffine(self.color, shifted, dsize, flags=cv2.INTER_LINEAR)
        clear = cv2.warpAffine(self.clear, shifted, dsize, flags=cv2.INTER_LINEAR, borderValue=(1.0, 1.0, 1.0))
        image[y0:y1, x0:x1] = cv2.add(cv2.multiply(image[y0:y1, x0:x1], clear), color)
