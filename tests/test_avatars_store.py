import json
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError
from skimage import data as skimage_data

from avatalk.avatars import landmarks as mesh
from avatalk.avatars.default_face import GENERATOR_VERSION, ensure_default_avatar
from avatalk.avatars.landmarks import FaceLandmarker
from avatalk.avatars.prepare import pingpong_cycle, prepare_avatar
from avatalk.avatars.store import (
    AvatarManifest,
    AvatarNotFound,
    AvatarStore,
    InvalidAvatarId,
    validate_avatar_id,
)


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    """An avatars root with the default avatar and a photo avatar, built once."""
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root)
    photo = tmp_path_factory.mktemp("photo") / "astronaut.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    prepare_avatar(photo, "astro", "Astronaut", root, still_seconds=0.4, landmarker=FaceLandmarker())
    return root


@pytest.fixture
def root(prepared_root, tmp_path) -> Path:
    """A private copy of the prepared avatars, free to modify."""
    copy = tmp_path / "avatars"
    shutil.copytree(prepared_root, copy)
    return copy


@pytest.mark.parametrize("good", ["ava", "a", "0", "my-avatar_2", "x" * 64])
def test_valid_ids(good):
    assert validate_avatar_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../x", "a/b", "a\\b", "/abs", ".hidden", "-x", "_x", "Ava", "a b", "a\x00", "é", "x" * 65]
)
def test_invalid_ids(bad):
    with pytest.raises(InvalidAvatarId):
        validate_avatar_id(bad)


def test_list_and_get(root):
    store = AvatarStore(root)
    manifests = store.list()
    assert [m.id for m in manifests] == ["astro", "ava"]
    ava = store.get("ava")
    assert ava.display_name == "Ava" and ava.source.kind == "generated"
    assert store.exists("ava") and not store.exists("nobody")
    with pytest.raises(AvatarNotFound, match="no avatar 'nobody'"):
        store.get("nobody")
    with pytest.raises(KeyError):  # AvatarNotFound is a KeyError for dict-like callers
        store.get("nobody")
    with pytest.raises(InvalidAvatarId):
        store.get("../ava")


def test_list_skips_broken_folders(root):
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{not json")
    (root / "notes").mkdir()  # no manifest at all
    assert [m.id for m in AvatarStore(root).list()] == ["astro", "ava"]


def test_delete(root):
    store = AvatarStore(root)
    store.load("astro")
    store.delete("astro")
    assert [m.id for m in store.list()] == ["ava"]
    assert sorted(p.name for p in root.iterdir()) == ["ava"]  # no trash left
    with pytest.raises(AvatarNotFound):
        store.get("astro")
    with pytest.raises(AvatarNotFound):
        store.load("astro")
    with pytest.raises(AvatarNotFound):
        store.delete("astro")


def test_load_decodes_everything_once(root):
    store = AvatarStore(root)
    avatar = store.load("astro")
    n = avatar.manifest.frame_count
    assert n == 10
    assert len(avatar.frames) == n and avatar.frames[0].shape == (512, 512, 3) and avatar.frames[0].dtype == np.uint8
    assert all(frame is avatar.frames[0] for frame in avatar.frames)  # one photo, decoded once
    assert avatar.landmarks.shape == (n, 468, 2) and avatar.boxes.shape == (n, 4)
    assert len(avatar.masks) == n and avatar.masks[0].shape == (256, 256)
    assert avatar.cycle.tolist() == pingpong_cycle(n)
    with pytest.raises(ValueError):
        avatar.frames[0][0, 0, 0] = 1  # shared between sessions: read-only
    with pytest.raises(ValueError):
        avatar.boxes[0, 0] = 1
    # RGB order: the astronaut's suit is orange (red > blue).
    suit = avatar.frames[0][450:500, 100:200].reshape(-1, 3).mean(axis=0)
    assert suit[0] > suit[2] + 50
    assert store.load("astro") is avatar  # cached


def test_cache_notices_a_replaced_avatar(root, tmp_path):
    store = AvatarStore(root)
    before = store.load("astro")
    photo = tmp_path / "face.png"
    cv2.imwrite(str(photo), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    prepare_avatar(photo, "astro", "Renamed", root, still_seconds=0.2, overwrite=True, landmarker=FaceLandmarker())
    after = store.load("astro")
    assert after is not before and after.manifest.display_name == "Renamed" and after.manifest.frame_count == 5


def test_stale_temporary_folders_are_removed_on_open(root):
    stale = root / ".tmp-old-1234"
    (stale / "frames").mkdir(parents=True)
    trash = root / ".trash-gone-5678"
    trash.mkdir()
    fresh = root / ".tmp-busy-9999"
    (fresh / "frames").mkdir(parents=True)
    hour_ago = time.time() - 3600
    for folder in (stale / "frames", stale, trash):
        os.utime(folder, (hour_ago, hour_ago))
    AvatarStore(root)
    assert not stale.exists() and not trash.exists()
    assert fresh.exists()  # may belong to a preparation running right now


def test_manifest_round_trip_and_validation(root):
    path = root / "ava" / "manifest.json"
    manifest = AvatarManifest.from_file(path)
    assert AvatarManifest.model_validate_json(manifest.to_json()) == manifest
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["latents"] == {} and raw["fps"] == 25
    assert raw["frame_count"] == len(raw["frames"]) == len(raw["masks"]["files"])

    raw["future_field"] = {"kept": True}
    assert AvatarManifest.model_validate(raw).model_dump()["future_field"] == {"kept": True}
    for change in (
        {"version": 2},
        {"frame_count": raw["frame_count"] + 1},
        {"cycle": [0, raw["frame_count"]]},
        {"id": "../etc"},
        {"frames": ["../../secret.jpg"] * raw["frame_count"]},
        {"landmarks": "/etc/passwd"},
    ):
        with pytest.raises(ValidationError):
            AvatarManifest.model_validate({**raw, **change})


def test_invalid_manifest_is_reported(root):
    (root / "ava" / "manifest.json").write_text(json.dumps({"version": 1, "id": "ava"}))
    with pytest.raises(ValueError, match="invalid manifest"):
        AvatarStore(root).get("ava")


def test_default_avatar_is_created_and_loads(root):
    manifest = AvatarStore(root).get("ava")
    assert manifest.frame_count == 100 and (manifest.width, manifest.height) == (512, 512)
    assert manifest.model_extra is not None
    assert manifest.source.model_extra == {
        "generator": "avatalk.avatars.default_face",
        "generator_version": GENERATOR_VERSION,
    }
    avatar = AvatarStore(root).load("ava")
    frames = np.stack(avatar.frames)
    # Idle motion: frames differ, but only slightly.
    change = np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean()
    assert 0.3 < change < 20

    # The drawn features are where the landmarks say.
    def pixel(frame: np.ndarray, point: np.ndarray) -> np.ndarray:
        x, y = np.round(point).astype(int)
        return frame[y, x].astype(int)

    eye_closed = [57]  # the blink
    for index in (0, 50, 57, 99):
        frame, points = frames[index], avatar.landmarks[index]
        lip = pixel(frame, points[[mesh.LIPS_OUTER_UPPER[5], 14]].mean(axis=0))
        assert lip[0] > lip[1] + 40  # reddish
        cheek = pixel(frame, points[205])
        if index in eye_closed:
            lid = pixel(frame, points[159] - [0, 4])  # just above the closed lids' lash line
            assert np.abs(lid - cheek).sum() < 60  # skin-coloured
        else:
            iris = pixel(frame, points[[159, 145]].mean(axis=0))  # between the lids' middles
            assert iris.sum() < cheek.sum() - 200  # dark
        x1, y1, x2, y2 = avatar.boxes[index]
        assert x1 < points[mesh.NOSE_TIP, 0] < x2 and y1 < points[mesh.MOUTH_LEFT_CORNER, 1] < y2


def test_default_avatar_is_kept_when_current_and_regenerated_when_outdated(root):
    first = ensure_default_avatar(root)
    assert ensure_default_avatar(root).created_at == first.created_at
    path = root / "ava" / "manifest.json"
    raw = json.loads(path.read_text())
    raw["source"]["generator_version"] = GENERATOR_VERSION - 1
    path.write_text(json.dumps(raw))
    regenerated = ensure_default_avatar(root)
    assert regenerated.created_at > first.created_at
    assert regenerated.source.model_extra["generator_version"] == GENERATOR_VERSION


def test_user_avatar_named_like_the_default_is_left_alone(root):
    shutil.rmtree(root / "ava")
    shutil.copytree(root / "astro", root / "ava")
    raw = json.loads((root / "ava" / "manifest.json").read_text())
    raw["id"] = "ava"
    (root / "ava" / "manifest.json").write_text(json.dumps(raw))
    assert ensure_default_avatar(root).source.kind == "image"
