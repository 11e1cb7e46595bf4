"""Frame encoding for transports that send pictures (WebSocket JPEG frames, MP4 files)."""

from __future__ import annotations

import cv2
import numpy as np


def encode_jpeg(image_rgb: np.ndarray, quality: int = 80) -> bytes:
    """RGB uint8 -> baseline JPEG bytes (every browser decodes them natively). Blocking."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> RGB uint8."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a decodable JPEG image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
