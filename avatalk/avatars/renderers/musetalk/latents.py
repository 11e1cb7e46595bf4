"""The VAE latents MuseTalk needs for every avatar frame, computed once and kept in the avatar folder.

In real time only the UNet and the VAE decoder run; the encoder's part (the
masked and the reference latent of each frame's face crop) depends only on
the avatar, so it is computed at preparation (DESIGN.md section 4) or, for
an avatar prepared before MuseTalk was configured, the first time it is
needed, and stored as ``musetalk-latents.npy``: ``(N, 8, 32, 32)`` float16,
frame ``i``'s masked latent (4 channels) then its reference latent (4), the
UNet's first input exactly. The manifest's ``latents["musetalk"]`` records
which VAE made them and for which crop boxes, so latents of another VAE or
of other boxes are never used; both files are replaced atomically.

``add_latents`` backs ``avatalk avatar add-latents ID [ID ...] [--force]``,
which adds latents to avatars prepared before MuseTalk was configured.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from avatalk.avatars.renderers.musetalk.loader import (
    VAE_DIR,
    load_vae,
    resolve_device,
    resolve_dtype,
)
from avatalk.avatars.store import (
    MANIFEST_NAME,
    AvatarManifest,
    AvatarNotFound,
    AvatarStore,
    InvalidAvatarId,
    LoadedAvatar,
)
from avatalk.config import Settings

logger = logging.getLogger(__name__)

RENDERER_KEY = "musetalk"
LATENTS_FILE = "musetalk-latents.npy"
#: Side of the face crop the VAE sees, and its latent (8x downsampling).
CROP_SIZE = 256
LATENT_SIZE = CROP_SIZE // 8
#: Version of the entry format in the manifest.
_FORMAT = 1


def face_crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The RGB crop box of ``frame`` resized to 256 x 256 with Lanczos, as MuseTalk prepares faces."""
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = frame[y1:y2, x1:x2]
    return cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)


@torch.inference_mode()
def encode_crops(vae: AutoencoderKL, crops: np.ndarray) -> np.ndarray:
    """UNet input latents ``(B, 8, 32, 32)`` float32 for ``(B, 256, 256, 3)`` uint8 RGB crops.

    The image is scaled to [-1, 1]; the masked copy has its lower half set
    to -1 (black), the region the UNet repaints. Latents are the posterior
    mean times the VAE's scaling factor: the official code draws a sample,
    but the VAE's posterior is so narrow that the mean is the same picture,
    and it makes preparation reproducible.
    """
    parameter = next(vae.parameters())
    images = torch.from_numpy(crops).to(parameter.device).permute(0, 3, 1, 2).to(parameter.dtype)
    images = images / 127.5 - 1.0
    masked = images.clone()
    masked[:, :, CROP_SIZE // 2 :, :] = -1.0
    posterior = vae.encode(torch.cat([masked, images])).latent_dist
    latents = posterior.mean * float(vae.config["scaling_factor"])
    count = crops.shape[0]
    result: np.ndarray = torch.cat([latents[:count], latents[count:]], dim=1).float().cpu().numpy()
    return result


def _boxes_digest(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype=np.int32).tobytes()).hexdigest()[:16]


def compute_latents(avatar: LoadedAvatar, vae: AutoencoderKL, *, batch_size: int = 16) -> np.ndarray:
    """Latents of every frame of ``avatar`` ``(N, 8, 32, 32)`` float16; repeated frames are encoded once."""
    distinct: dict[tuple[int, bytes], int] = {}
    order: list[int] = []
    crops: list[np.ndarray] = []
    for index, frame in enumerate(avatar.frames):
        key = (id(frame), avatar.boxes[index].tobytes())
        if key not in distinct:
            distinct[key] = len(crops)
            crops.append(face_crop(frame, avatar.boxes[index]))
        order.append(distinct[key])
    encoded = [
        encode_crops(vae, np.stack(crops[start : start + batch_size])) for start in range(0, len(crops), batch_size)
    ]
    unique = np.concatenate(encoded).astype(np.float16)
    every: np.ndarray = unique[np.asarray(order)]
    return every


def latents_entry(vae_id: str, avatar: LoadedAvatar) -> dict[str, Any]:
    """The manifest entry describing latents of ``avatar`` made by the VAE ``vae_id``."""
    return {
        "format": _FORMAT,
        "file": LATENTS_FILE,
        "vae": vae_id,
        "boxes": _boxes_digest(avatar.boxes),
        "shape": [avatar.manifest.frame_count, 8, LATENT_SIZE, LATENT_SIZE],
        "dtype": "float16",
    }


def load_latents(avatar: LoadedAvatar, vae_id: str) -> np.ndarray | None:
    """The stored latents of ``avatar`` if they exist and were made by this VAE for these boxes, else None.

    The manifest is read again from disk rather than taken from ``avatar``:
    latents may have been added since the avatar was loaded and cached.
    """
    try:
        manifest = AvatarManifest.from_file(avatar.path / MANIFEST_NAME)
    except (OSError, ValueError):
        return None
    entry = manifest.latents.get(RENDERER_KEY)
    expected = latents_entry(vae_id, avatar)
    if not isinstance(entry, dict) or manifest.created_at != avatar.manifest.created_at:
        return None
    if any(entry.get(key) != value for key, value in expected.items()):
        return None
    try:
        latents: np.ndarray = np.load(avatar.path / LATENTS_FILE, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if list(latents.shape) != expected["shape"]:
        return None
    return latents


def store_latents(avatar: LoadedAvatar, latents: np.ndarray, vae_id: str) -> AvatarManifest:
    """Write the latents file and the manifest entry atomically; returns the new manifest.

    Each file is written under a temporary name, synced and renamed over the
    old one, so readers see the old or the new version, never a mix that
    matters: the manifest entry is written last and names the VAE, so
    latents are only ever trusted once both are in place. Refuses (with
    ``RuntimeError``) when the avatar folder was replaced meanwhile.
    """
    folder = avatar.path
    manifest = AvatarManifest.from_file(folder / MANIFEST_NAME)
    if manifest.created_at != avatar.manifest.created_at:
        raise RuntimeError(f"avatar {manifest.id!r} was prepared again while its latents were computed")
    buffer = folder / f".{LATENTS_FILE}.{uuid.uuid4().hex}"
    with buffer.open("wb") as handle:
        np.save(handle, latents.astype(np.float16), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(buffer, folder / LATENTS_FILE)
    updated = manifest.model_copy(update={"latents": {**manifest.latents, RENDERER_KEY: latents_entry(vae_id, avatar)}})
    buffer = folder / f".{MANIFEST_NAME}.{uuid.uuid4().hex}"
    with buffer.open("wb") as handle:
        handle.write(updated.to_json().encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(buffer, folder / MANIFEST_NAME)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return updated


def ensure_latents(
    avatar: LoadedAvatar | Path, vae: AutoencoderKL, vae_id: str, *, batch_size: int = 16, force: bool = False
) -> AvatarManifest:
    """Make sure the avatar folder holds MuseTalk latents made by this VAE; returns its manifest.

    ``avatar`` is a loaded avatar or its folder. Cheap when valid latents
    are already there (unless ``force``). Raises ``OSError`` when the folder
    cannot be written.
    """
    if not isinstance(avatar, LoadedAvatar):
        folder = Path(avatar)
        avatar = AvatarStore(folder.parent).load(folder.name)
    if not force and load_latents(avatar, vae_id) is not None:
        return AvatarManifest.from_file(avatar.path / MANIFEST_NAME)
    latents = compute_latents(avatar, vae, batch_size=batch_size)
    manifest = store_latents(avatar, latents, vae_id)
    logger.info("stored MuseTalk latents of avatar %s (%d frames)", manifest.id, manifest.frame_count)
    return manifest


def add_latents(settings: Settings, avatar_ids: Sequence[str], force: bool = False) -> dict[str, AvatarManifest | str]:
    """Latents for prepared avatars (``avatalk avatar add-latents``): per id, its manifest or why it failed.

    Raises ``MuseTalkWeightsError`` when the VAE cannot be loaded, since then no avatar can gain latents.
    """
    # Imported here: preparation pulls in the video decoder and the face models, which the renderer
    # itself never needs (a GPU machine serving MuseTalk need not have them).
    from avatalk.avatars.prepare_settings import avatars_root

    musetalk = settings.musetalk
    device = resolve_device(musetalk.device)
    dtype = resolve_dtype(musetalk.dtype, device)
    vae, vae_id = load_vae(musetalk.models_dir / VAE_DIR, device=device, dtype=dtype)
    store = AvatarStore(avatars_root(settings))
    outcome: dict[str, AvatarManifest | str] = {}
    for avatar_id in avatar_ids:
        try:
            outcome[avatar_id] = ensure_latents(
                store.load(avatar_id), vae, vae_id, batch_size=musetalk.latents_batch, force=force
            )
        except (AvatarNotFound, InvalidAvatarId, OSError, RuntimeError) as error:
            outcome[avatar_id] = str(error)
    return outcome
