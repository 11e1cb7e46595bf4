"""The suite is isolated from the developer's configuration (tests/conftest.py, ``isolated_settings``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from avatalk.config import Settings


def test_no_avatalk_variable_and_no_configuration_file_reach_a_test() -> None:
    assert [name for name in os.environ if name.startswith("AVATALK_")] == ["AVATALK_CONFIG"]
    assert not Path(os.environ["AVATALK_CONFIG"]).exists()
    assert Settings().port == Settings.model_fields["port"].default


def test_an_avatalk_toml_in_the_working_directory_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "avatalk.toml").write_text("port = 1234\n[llm]\nmax_tokens = 7\n")
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.port == 8000 and settings.llm.max_tokens == Settings.model_fields["llm"].default.max_tokens


def test_a_test_may_still_set_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AVATALK_PORT", "4321")
    config = tmp_path / "mine.toml"
    config.write_text("[limits]\nmax_sessions = 3\n")
    monkeypatch.setenv("AVATALK_CONFIG", str(config))
    settings = Settings()
    assert settings.port == 4321 and settings.limits.max_sessions == 3
