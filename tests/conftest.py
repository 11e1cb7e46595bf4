"""Shared fixtures: settings, speech generated with piper, a live server on loopback."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _without_user_configuration() -> None:
    """Forget the developer's ``AVATALK_*`` variables and ``avatalk.toml`` for the whole run.

    Settings read both (README "Configuration"), so a developer's
    ``AVATALK_LLM__BACKEND=openai`` or an ``avatalk.toml`` in the working tree
    would change what the tests test. Done once at import, before any test
    module builds a ``Settings`` or a session-scoped fixture loads the models
    (servers started as child processes inherit it); ``isolated_settings``
    restores it around every test.
    """
    for name in [name for name in os.environ if name.startswith("AVATALK_")]:
        del os.environ[name]
    os.environ["AVATALK_CONFIG"] = str(_NO_CONFIG)


#: A configuration file that does not exist, in an empty folder of its own.
_NO_CONFIG = Path(tempfile.mkdtemp(prefix="avatalk-tests-")) / "avatalk.toml"
_without_user_configuration()

from fakes import LiveServer  # noqa: E402

from avatalk.config import Settings  # noqa: E402
from avatalk.media.audio import resample  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test sees no ``AVATALK_*`` variable but the ones it sets, and no ``avatalk.toml``.

    (A test may still set its own with ``monkeypatch.setenv``; this runs first.)
    """
    for name in [name for name in os.environ if name.startswith("AVATALK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AVATALK_CONFIG", str(tmp_path / "no-such-dir" / "avatalk.toml"))


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@lru_cache(maxsize=1)
def _piper_voice():
    from piper import PiperVoice

    return PiperVoice.load(str(Settings().tts_model_path()))


@lru_cache(maxsize=32)
def _speech(text: str, sample_rate: int) -> np.ndarray:
    voice = _piper_voice()
    chunks = [chunk.audio_float_array for chunk in voice.synthesize(text)]
    audio = np.concatenate(chunks).astype(np.float32)
    return resample(audio, voice.config.sample_rate, sample_rate)


@pytest.fixture(scope="session")
def speech() -> Callable[..., np.ndarray]:
    """``speech("What is two plus two?", 16000)`` -> float32 mono audio spoken by piper."""

    def make(text: str, sample_rate: int = 16000) -> np.ndarray:
        return _speech(text, sample_rate).copy()

    return make


@pytest.fixture(scope="session")
def engine_models():
    """The real embedded models, loaded once for the whole test run."""
    from avatalk.streaming.models import EngineModels

    return EngineModels.load(Settings())


@pytest.fixture(scope="session")
def live_server_factory(engine_models, tmp_path_factory):
    """Start servers sharing the loaded models; all are stopped at the end."""
    from avatalk.server.app import create_app

    servers: list[LiveServer] = []

    def start(models=None, **overrides) -> LiveServer:
        settings = Settings(data_dir=tmp_path_factory.mktemp("data"), **overrides)
        server = LiveServer(create_app(settings, models or engine_models), settings.limits.max_ws_message_bytes)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
