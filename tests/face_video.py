"""A moving-face test video, made on the fly for the avatar-preparation tests."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
from skimage import data as skimage_data


def write_face_video(path: Path, seconds: float = 6, size: tuple[int, int] = (320, 240)) -> Path:
    """The astronaut photo's face sliding right and growing (a 2 s cycle), as H.264 at 25 fps; returns ``path``."""
    astronaut = skimage_data.astronaut()
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(round(25 * seconds)):
            scale = 1.0 + 0.1 * (i % 50) / 49
            matrix = np.float64([[scale, 0, -150 * scale + (i % 50)], [0, scale, -40 * scale]])
            frame = cv2.warpAffine(astronaut, matrix, size, borderMode=cv2.BORDER_REFLECT)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
