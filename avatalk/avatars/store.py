"""The avatar folder format and the store that reads it.

An avatar is a folder ``<root>/<id>/`` holding ``manifest.json`` (schema
version 1, ``AvatarManifest``), the frames as image files, ``landmarks.npy``
(N, 468, 2) float32, ``boxes.npy`` (N, 4) int32 crop boxes ``x1, y1, x2, y2``
and the blend masks as PNG files. Folders are only ever created complete:
preparation builds them under a hidden ``.tmp-*`` name and renames them into
place, and deletion renames them to a hidden ``.trash-*`` name before removing
them, so a reader never sees a half-written or half-deleted avatar and a
crash leaves only hidden leftovers, which the store sweeps away when opened.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION: Final = 1
MAX_DISPLAY_NAME = 200
#: Prefix of folders being built (preparation) and of folders being deleted.
TEMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"

_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class InvalidAvatarId(ValueError):
    """An avatar id that is not a safe folder name (``^[a-z0-9][a-z0-9_-]{0,63}$``)."""


class AvatarNotFound(KeyError):
    """No avatar with that id in the store."""

    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0]) if self.args else "avatar not found"


def validate_avatar_id(avatar_id: str) -> str:
    """Return ``avatar_id`` if it is a safe, canonical avatar id, else raise ``InvalidAvatarId``.

    Ids become folder names and URL path segments, so only lower-case
    letters, digits, ``-`` and ``_`` are allowed, starting with a letter or
    digit: that excludes ``.``, ``..``, separators, hidden names and case
    collisions on case-insensitive file systems.
    """
    if not isinstance(avatar_id, str) or not _ID_PATTERN.fullmatch(avatar_id):
        raise InvalidAvatarId(
            f"invalid avatar id {avatar_id!r}: use 1-64 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return avatar_id


def _safe_relative(name: str) -> str:
    """Reject manifest file names that could point outside the avatar folder."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"file name {name!r} must be a relative path inside the avatar folder")
    return name


class MaskInfo(BaseModel):
    """Blend masks: one file per frame (identical masks share a file).

    Each mask is ``size`` x ``size`` 8-bit grey, in the coordinates of that
    frame's crop box (stretch it to the box to use it): 255 where the
    generated lower face replaces the frame, 0 where the frame is kept,
    feathered in between and 0 along the box edges, so pasting through it
    leaves no seam.
    """

    model_config = ConfigDict(extra="allow")

    size: int = Field(gt=0)
    files: list[str]
    feather_px: int = Field(ge=0, description="Gaussian kernel size used to feather, in mask pixels")

    @field_validator("files")
    @classmethod
    def _files_are_relative(cls, files: list[str]) -> list[str]:
        return [_safe_relative(name) for name in files]


class SourceInfo(BaseModel):
    """Where the avatar came from (informational; nothing reads it back to render)."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["video", "image", "generated"]
    filename: str | None = None
    format: str | None = None
    codec: str | None = None
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    duration_s: float | None = None
    rotation: int = 0
    truncated: bool = Field(default=False, description="the input was longer than the preparation limit and was cut")


class AvatarManifest(BaseModel):
    """``manifest.json`` of a prepared avatar (schema version 1).

    ``frames[i]`` is the image file of frame ``i`` (repeated frames, such as
    a photo's still sequence, share one file); ``cycle`` is the order in
    which idle frames are shown (forward then backward, ping-pong), repeated
    forever; ``missing_faces`` lists the frames whose landmarks were filled
    in from their neighbours because no face was found. ``latents`` is
    reserved for renderers' precomputed data (MuseTalk VAE latents), keyed
    by renderer, e.g. ``{"musetalk": {"vae": "sd-vae-ft-mse", "file": ...}}``,
    so they can be added to an existing avatar without a schema change.
    Unknown fields are kept, so older code rewriting a newer manifest does
    not drop them.
    """

    model_config = ConfigDict(extra="allow")

    version: Literal[1] = MANIFEST_VERSION
    id: str
    display_name: str = Field(min_length=1, max_length=MAX_DISPLAY_NAME)
    created_at: datetime
    fps: int = Field(gt=0)
    frame_count: int = Field(gt=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    frames: list[str]
    cycle: list[int]
    landmarks: str = "landmarks.npy"
    boxes: str = "boxes.npy"
    masks: MaskInfo
    source: SourceInfo
    missing_faces: list[int] = Field(default_factory=list)
    latents: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str) -> str:
        return validate_avatar_id(value)

    @field_validator("frames")
    @classmethod
    def _frames_are_relative(cls, frames: list[str]) -> list[str]:
        return [_safe_relative(name) for name in frames]

    @field_validator("landmarks", "boxes")
    @classmethod
    def _array_is_relative(cls, name: str) -> str:
        return _safe_relative(name)

    @model_validator(mode="after")
    def _consistent(self) -> AvatarManifest:
        n = self.frame_count
        if len(self.frames) != n or len(self.masks.files) != n:
            raise ValueError(
                f"frame_count is {n} but {len(self.frames)} frames and {len(self.masks.files)} masks are listed"
            )
        if not self.cycle or any(not 0 <= i < n for i in self.cycle):
            raise ValueError("cycle must be a non-empty list of frame indices")
        if any(not 0 <= i < n for i in self.missing_faces):
            raise ValueError("missing_faces must hold frame indices")
        return self

    @classmethod
    def from_file(cls, path: Path) -> AvatarManifest:
        """Read and validate a ``manifest.json``."""
        return cls.model_validate_json(Path(path).read_bytes())

    def to_json(self) -> str:
        """The manifest as the JSON text that is written to ``manifest.json``."""
        return self.model_dump_json(indent=2)


@dataclass(frozen=True)
class LoadedAvatar:
    """An avatar in memory, ready to render from.

    Arrays are read-only because one loaded avatar is shared by every
    session that uses it. ``frames`` and ``masks`` are indexed by frame
    (entries for repeated frames are the same array object); ``cycle`` is
    the idle frame order.
    """

    manifest: AvatarManifest
    path: Path
    frames: tuple[np.ndarray, ...]
    landmarks: np.ndarray
    boxes: np.ndarray
    masks: tuple[np.ndarray, ...]
    cycle: np.ndarray


class AvatarStore:
    """The avatars under one root folder.

    Reading is safe from several threads; loaded avatars are cached (least
    recently used first out, ``cache_size`` of them) and a cached avatar is
    reloaded when its folder was replaced. Opening the store removes
    leftovers of interrupted preparations and deletions that are older than
    ``stale_after_s`` (younger ones may belong to a preparation running in
    another process right now).
    """

    def __init__(self, root: Path, *, cache_size: int = 4, stale_after_s: float = 600.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, LoadedAvatar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._remove_stale(stale_after_s)

    def path(self, avatar_id: str) -> Path:
        """Folder of an avatar (whether or not it exists); validates the id."""
        return self.root / validate_avatar_id(avatar_id)

    def exists(self, avatar_id: str) -> bool:
        return (self.path(avatar_id) / MANIFEST_NAME).is_file()

    def list(self) -> list[AvatarManifest]:
        """Every readable avatar, sorted by id; unreadable folders are logged and skipped."""
        manifests = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or not _ID_PATTERN.fullmatch(folder.name):
                continue
            try:
                manifests.append(AvatarManifest.from_file(folder / MANIFEST_NAME))
            except (OSError, ValueError) as error:
                logger.warning("skipping avatar folder %s: %s", folder, error)
        return manifests

    def get(self, avatar_id: str) -> AvatarManifest:
        """The manifest of one avatar; ``AvatarNotFound`` if there is none."""
        manifest_path = self.path(avatar_id) / MANIFEST_NAME
        try:
            return AvatarManifest.from_file(manifest_path)
        except FileNotFoundError:
            raise AvatarNotFound(f"no avatar {avatar_id!r}") from None
        except ValidationError as error:
            raise ValueError(f"avatar {avatar_id!r} has an invalid manifest: {error}") from error

    def delete(self, avatar_id: str) -> None:
        """Remove an avatar: renamed out of sight at once, then its files removed."""
        folder = self.path(avatar_id)
        trash = self.root / f"{TRASH_PREFIX}{avatar_id}-{uuid.uuid4().hex}"
        try:
            folder.rename(trash)
        except FileNotFoundError:
            raise AvatarNotFound(f"no avatar {avatar_id!r}") from None
        with self._lock:
            self._cache.pop(avatar_id, None)
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted avatar %s", avatar_id)

    def load(self, avatar_id: str) -> LoadedAvatar:
        """Frames, landmarks, boxes, masks and cycle of an avatar, decoded (cached)."""
        manifest = self.get(avatar_id)
        with self._lock:
            cached = self._cache.get(avatar_id)
            if cached is not None and cached.manifest.created_at == manifest.created_at:
                self._cache.move_to_end(avatar_id)
                return cached
        loaded = _load_folder(self.path(avatar_id), manifest)
        with self._lock:
            self._cache[avatar_id] = loaded
            self._cache.move_to_end(avatar_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return loaded

    def _remove_stale(self, stale_after_s: float) -> None:
        now = time.time()
        for folder in self.root.iterdir():
            if not folder.name.startswith((TEMP_PREFIX, TRASH_PREFIX)) or not folder.is_dir():
                continue
            # A preparation in progress keeps writing into its subfolders.
            try:
                newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir() if p.is_dir()])
            except FileNotFoundError:  # finished or removed meanwhile
                continue
            if now - newest >= stale_after_s:
                logger.info("removing leftover folder %s", folder)
                shutil.rmtree(folder, ignore_errors=True)


def _load_folder(folder: Path, manifest: AvatarManifest) -> LoadedAvatar:
    """Decode an avatar folder, reading each distinct file once."""
    frames = tuple(_read_images(folder, manifest.frames, cv2.IMREAD_COLOR, rgb=True))
    masks = tuple(_read_images(folder, manifest.masks.files, cv2.IMREAD_GRAYSCALE, rgb=False))
    landmarks = np.load(folder / manifest.landmarks, allow_pickle=False).astype(np.float32, copy=False)
    boxes = np.load(folder / manifest.boxes, allow_pickle=False).astype(np.int32, copy=False)
    n = manifest.frame_count
    if landmarks.shape[0] != n or boxes.shape != (n, 4):
        raise ValueError(
            f"avatar {manifest.id!r}: landmarks {landmarks.shape} / boxes {boxes.shape} do not match {n} frames"
        )
    cycle = np.asarray(manifest.cycle, dtype=np.int32)
    for array in (landmarks, boxes, cycle):
        array.setflags(write=False)
    return LoadedAvatar(manifest, folder, frames, landmarks, boxes, masks, cycle)


def _read_images(folder: Path, names: list[str], flags: int, *, rgb: bool) -> list[np.ndarray]:
    decoded: dict[str, np.ndarray] = {}
    images = []
    for name in names:
        image = decoded.get(name)
        if image is None:
            image = cv2.imread(str(folder / name), flags)
            if image is None:
                raise ValueError(f"cannot read {folder / name}")
            if rgb:
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            image.setflags(write=False)
            decoded[name] = image
        images.append(image)
    return images
