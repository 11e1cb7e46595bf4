"""MuseTalk on CUDA in float16 (skipped without CUDA): the checks ``bench/gpu_check.sh`` runs on a GPU machine.

Kept apart and light: no test here needs the server's packages, so a bare
CUDA machine with the wheels ``bench/gpu_check.sh fetch`` collects can run
them (``pytest --noconftest -m gpu``). ``MUSETALK_AVATARS`` names a prepared
avatars root holding "ava" (drawing the default avatar needs the face models).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402

from avatalk.avatars.renderers import SAMPLES_PER_TICK, SpeechSegment  # noqa: E402
from avatalk.avatars.renderers.musetalk import MuseTalkRenderer, MuseTalkSettings, load_musetalk  # noqa: E402
from avatalk.avatars.renderers.musetalk.random_models import write_layout  # noqa: E402
from avatalk.avatars.store import AvatarStore, LoadedAvatar  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SIZE = 256
TICKS = 25


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> LoadedAvatar:
    prepared = os.environ.get("MUSETALK_AVATARS")
    if prepared:
        return AvatarStore(Path(prepared)).load("ava")
    from avatalk.avatars.default_face import ensure_default_avatar

    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root, size=SIZE, seconds=0.4)
    return AvatarStore(root).load("ava")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layout(tmp_path_factory.mktemp("models"), "reduced")  # full-size Whisper-tiny


@pytest.fixture(scope="module")
def renderer(layout: Path, avatar: LoadedAvatar) -> Iterator[MuseTalkRenderer]:
    models = load_musetalk(layout, device="cuda")
    renderer = MuseTalkRenderer(MuseTalkSettings(frame_budget_ms=1000), models=models)
    renderer.prepare(avatar)
    yield renderer
    renderer.close()


def speech(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 160 * t) * (1.2 + np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(t.size)
    return audio.astype(np.float32)


def test_float16_on_cuda_end_to_end(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    assert renderer.models.dtype == torch.float16 and renderer.models.device.type == "cuda"
    audio = speech(TICKS * 0.04, seed=1)
    segment = SpeechSegment(0, audio)
    session = renderer.open(avatar, SIZE)
    frames = []
    for tick in range(TICKS):
        session.look_ahead(tick, [segment])
        frames.append(session.render(tick, audio[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK]))
    session.close()
    assert session.stats.generated == TICKS and session.stats.late == 0 and session.stats.failed == 0
    assert all(frame.shape == (SIZE, SIZE, 3) for frame in frames)
    assert renderer.scheduler.stats.mean_batch > 1  # look-ahead frames were batched


def test_float16_features_on_cuda_follow_the_float32_recipe(renderer: MuseTalkRenderer, layout: Path) -> None:
    """The features the GPU computes in float16 stay within float16 precision of the float32 computation."""
    audio = speech(2.37, seed=2)
    gpu = renderer.models.audio
    cpu = load_musetalk(layout, device="cpu").audio
    on_gpu = gpu.windows(gpu.encode(audio), [2 * i for i in range(59)])
    on_cpu = cpu.windows(cpu.encode(audio), [2 * i for i in range(59)])
    scale = float(np.abs(on_cpu).max())
    assert float(np.abs(on_gpu - on_cpu).max()) <= 0.02 * scale
