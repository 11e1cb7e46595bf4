"""Writing a prepared avatar's folder: built in a hidden temporary folder, then renamed into place."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import cv2
import numpy as np

from avatalk.avatars.prepare_errors import AvatarPreparationError, check_cancel
from avatalk.avatars.prepare_geometry import blend_mask, crop_boxes, pingpong_cycle
from avatalk.avatars.store import (
    MANIFEST_NAME,
    TEMP_PREFIX,
    TRASH_PREFIX,
    AvatarManifest,
    MaskInfo,
    SourceInfo,
    validate_avatar_id,
)


class AvatarWriter:
    """Builds an avatar folder in a temporary folder and renames it into place.

    Used as a context manager: leaving it with an exception, or without
    ``commit``, removes the temporary folder.
    """

    def __init__(
        self,
        out_root: Path,
        avatar_id: str,
        *,
        overwrite: bool,
        image_format: Literal["jpg", "png"],
        jpeg_quality: int,
    ) -> None:
        self.avatar_id = validate_avatar_id(avatar_id)
        self.out_root = Path(out_root)
        self.final = self.out_root / avatar_id
        self.overwrite = overwrite
        if self.final.exists() and not overwrite:
            raise AvatarPreparationError(f"an avatar with id {avatar_id!r} already exists")
        self.image_format = image_format
        self.params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpg" else []
        self.out_root.mkdir(parents=True, exist_ok=True)
        self.temp = self.out_root / f"{TEMP_PREFIX}{avatar_id}-{uuid.uuid4().hex}"
        (self.temp / "frames").mkdir(parents=True)
        (self.temp / "masks").mkdir()
        self.frames: list[str] = []
        self.size: tuple[int, int] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.temp.exists():
            shutil.rmtree(self.temp, ignore_errors=True)

    def add_frame(self, image_rgb: np.ndarray, repeat_of_previous: bool = False) -> None:
        """Append the next frame; a repeat of the previous image shares its file."""
        if repeat_of_previous and self.frames:
            self.frames.append(self.frames[-1])
            return
        height, width = image_rgb.shape[:2]
        if self.size is None:
            self.size = (width, height)
        elif self.size != (width, height):
            raise AvatarPreparationError("the video changes resolution midway, which is not supported")
        name = f"frames/{len(self.frames):06d}.{self.image_format}"
        if not cv2.imwrite(str(self.temp / name), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), self.params):
            raise OSError(f"could not write {self.temp / name}")
        self.frames.append(name)

    def commit(
        self,
        *,
        display_name: str,
        fps: int,
        landmarks: np.ndarray,
        missing: Sequence[int],
        source: SourceInfo,
        chin_margin: float,
        mask_size: int,
        feather: float,
        progress: Callable[[float], None],
        cancel: threading.Event | None,
    ) -> AvatarManifest:
        """Write boxes, masks, arrays and the manifest, then move the folder into place."""
        assert self.size is not None and len(self.frames) == len(landmarks)
        width, height = self.size
        boxes = crop_boxes(landmarks, width, height, chin_margin)
        mask_files: list[str] = []
        written: dict[bytes, str] = {}
        for index, (points, box) in enumerate(zip(landmarks, boxes, strict=True)):
            check_cancel(cancel)
            ok, png = cv2.imencode(".png", blend_mask(points, box, mask_size, feather))
            if not ok:
                raise OSError("could not encode a blend mask as PNG")
            key = png.tobytes()
            if key not in written:  # identical masks (a photo's still frames) share a file
                name = f"masks/{index:06d}.png"
                (self.temp / name).write_bytes(key)
                written[key] = name
            mask_files.append(written[key])
            progress((index + 1) / len(landmarks))
        np.save(self.temp / "landmarks.npy", landmarks.astype(np.float32))
        np.save(self.temp / "boxes.npy", boxes)
        manifest = AvatarManifest(
            id=self.avatar_id,
            display_name=display_name,
            created_at=datetime.now(UTC),
            fps=fps,
            frame_count=len(self.frames),
            width=width,
            height=height,
            frames=self.frames,
            cycle=pingpong_cycle(len(self.frames)),
            masks=MaskInfo(size=mask_size, files=mask_files, feather_px=int(feather * mask_size) // 2 * 2 + 1),
            source=source,
            missing_faces=list(missing),
        )
        _write_synced(self.temp / MANIFEST_NAME, manifest.to_json().encode())
        _fsync_dir(self.temp)
        check_cancel(cancel)
        self._move_into_place()
        return manifest

    def _move_into_place(self) -> None:
        trash = None
        if self.overwrite and self.final.exists():
            trash = self.out_root / f"{TRASH_PREFIX}{self.avatar_id}-{uuid.uuid4().hex}"
            self.final.rename(trash)
        try:
            os.rename(self.temp, self.final)
        except OSError as error:
            if self.final.exists():  # another preparation of the same id finished first
                raise AvatarPreparationError(f"an avatar with id {self.avatar_id!r} already exists") from error
            raise
        _fsync_dir(self.out_root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
