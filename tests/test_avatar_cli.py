from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data as skimage_data
from typer.testing import CliRunner

from avatalk.avatars.cli import app


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """Settings for the CLI: a private data folder and a small frame size."""
    return {"AVATALK_DATA_DIR": str(tmp_path / "data"), "AVATALK_AVATARS__OUTPUT_SIZE": "128"}


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR))
    return path


def test_create_list_and_delete(env, photo, tmp_path):
    runner = CliRunner()
    created = runner.invoke(app, ["create", "--id", "tutor", "--image", str(photo), "--name", "The Tutor"], env=env)
    assert created.exit_code == 0, created.output
    assert "created avatar 'tutor' (The Tutor): 50 frames of 128x128" in created.output
    assert (tmp_path / "data" / "avatars" / "tutor" / "manifest.json").is_file()

    listed = runner.invoke(app, ["list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "tutor" in listed.output and "The Tutor" in listed.output and "128x128" in listed.output

    again = runner.invoke(app, ["create", "--id", "tutor", "--image", str(photo)], env=env)
    assert again.exit_code == 1 and "already exists" in again.output

    deleted = runner.invoke(app, ["delete", "tutor"], env=env)
    assert deleted.exit_code == 0 and "deleted avatar 'tutor'" in deleted.output
    assert "no avatars" in runner.invoke(app, ["list"], env=env).output
    gone = runner.invoke(app, ["delete", "tutor"], env=env)
    assert gone.exit_code == 1 and "no avatar 'tutor'" in gone.output


def test_clear_errors(env, photo, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["create", "--id", "x", "--video", str(tmp_path / "missing.mp4")], env=env)
    assert missing.exit_code != 0 and "missing.mp4 does not exist" in missing.output

    wrong_kind = runner.invoke(app, ["create", "--id", "x", "--video", str(photo)], env=env)
    assert wrong_kind.exit_code != 0 and "is a jpeg image; use --image" in wrong_kind.output

    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    unsupported = runner.invoke(app, ["create", "--id", "x", "--image", str(text)], env=env)
    assert unsupported.exit_code != 0 and "not a supported video" in unsupported.output

    bad_id = runner.invoke(app, ["create", "--id", "../evil", "--image", str(photo)], env=env)
    assert bad_id.exit_code != 0 and "invalid avatar id" in bad_id.output

    both = runner.invoke(app, ["create", "--id", "x", "--image", str(photo), "--video", str(photo)], env=env)
    assert both.exit_code != 0 and "exactly one of --video or --image" in both.output

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 64, 3), 200, np.uint8))
    no_face = runner.invoke(app, ["create", "--id", "blank", "--image", str(blank)], env=env)
    assert no_face.exit_code == 1 and "no face was found in the photo blank.png" in no_face.output
    assert not (tmp_path / "data" / "avatars" / "blank").exists()
