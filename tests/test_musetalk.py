"""The MuseTalk renderer end to end on the CPU, with tiny random-weight models in the official layout.

The models are written as a user would have them (``musetalkV15/unet.pth``
as a plain state dict + ``musetalk.json``, ``sd-vae/`` and ``whisper/`` via
``save_pretrained``) and loaded by the real loader; frames go through the
real scheduler. GPU-only checks are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import json
import shutil
import threading
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402

from avatalk.avatars.default_face import ensure_default_avatar  # noqa: E402
from avatalk.avatars.renderers import SAMPLES_PER_TICK, RendererUnavailable, create_renderer  # noqa: E402
from avatalk.avatars.renderers.musetalk import (  # noqa: E402
    MuseTalkModels,
    MuseTalkRenderer,
    MuseTalkSession,
    MuseTalkSettings,
    MuseTalkWeightsError,
    RenderStats,
    ensure_latents,
    load_latents,
    load_musetalk,
)
from avatalk.avatars.renderers.musetalk.latents import LATENTS_FILE, RENDERER_KEY  # noqa: E402
from avatalk.avatars.renderers.musetalk.loader import UNET_CONFIG, UNET_DIR, UNET_WEIGHTS  # noqa: E402
from avatalk.avatars.renderers.musetalk.random_models import write_layout  # noqa: E402
from avatalk.avatars.store import AvatarStore, LoadedAvatar  # noqa: E402

SIZE = 128
TICKS = 10


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layout(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(layout: Path) -> MuseTalkModels:
    return load_musetalk(layout)


@pytest.fixture(scope="module")
def avatars_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root, size=SIZE, seconds=0.4)  # 10 frames, a cycle of 18
    return root


@pytest.fixture(scope="module")
def avatar(avatars_root: Path) -> LoadedAvatar:
    return AvatarStore(avatars_root).load("ava")


def make_renderer(models: MuseTalkModels, **settings: object) -> MuseTalkRenderer:
    """A renderer with budgets generous enough for a busy 2-core CPU (nothing is ever late)."""
    values: dict[str, object] = {"frame_budget_ms": 30000, "look_ahead_ms": 200, "batch_window_ms": 20}
    values.update(settings)
    return MuseTalkRenderer(MuseTalkSettings.model_validate(values), models=models)


@pytest.fixture(scope="module")
def renderer(models: MuseTalkModels) -> Iterator[MuseTalkRenderer]:
    renderer = make_renderer(models, max_batch=1)
    yield renderer
    renderer.close()


def voice(seed: int, ticks: int = TICKS) -> np.ndarray:
    """Loud, varying audio (each session gets its own), whole ticks at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(ticks * SAMPLES_PER_TICK) / 16000
    tone = np.sin(2 * np.pi * (150 + 40 * seed) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def tick_audio(audio: np.ndarray, tick: int) -> np.ndarray:
    return audio[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK]


def speak(session: MuseTalkSession, audio: np.ndarray, *, look_ahead: bool) -> list[np.ndarray]:
    """Render every tick of ``audio`` as the clock would, optionally telling the session what comes next."""
    frames = []
    for tick in range(len(audio) // SAMPLES_PER_TICK):
        if look_ahead:
            session.look_ahead(tick, audio[tick * SAMPLES_PER_TICK :])
        frames.append(session.render(tick, tick_audio(audio, tick)))
    return frames


def count_unet_calls(models: MuseTalkModels) -> list[int]:
    calls = [0]

    def hook(module: torch.nn.Module, args: object) -> None:
        calls[0] += 1

    models.unet.register_forward_pre_hook(hook)
    return calls


# --- Loading -----------------------------------------------------------------------


def copy_layout(layout: Path, tmp_path: Path) -> Path:
    target = tmp_path / "models"
    shutil.copytree(layout, target)
    return target


def test_missing_files_are_named_with_the_fix(layout: Path, tmp_path: Path) -> None:
    broken = copy_layout(layout, tmp_path)
    (broken / UNET_DIR / UNET_WEIGHTS).unlink()
    with pytest.raises(MuseTalkWeightsError, match=r"unet\.pth.*docs/avatars\.md"):
        load_musetalk(broken)
    with pytest.raises(RendererUnavailable, match="not available"):
        load_musetalk(tmp_path / "nowhere")


def test_a_config_that_is_not_musetalk_is_rejected(layout: Path, tmp_path: Path) -> None:
    broken = copy_layout(layout, tmp_path)
    config_path = broken / UNET_DIR / UNET_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, in_channels=4)))
    with pytest.raises(MuseTalkWeightsError, match="in_channels is 4 but MuseTalk v1.5 needs 8"):
        load_musetalk(broken)
    config_path.write_text(json.dumps(dict(config, cross_attention_dim=64)))
    with pytest.raises(MuseTalkWeightsError, match="cross_attention_dim is 64"):
        load_musetalk(broken)
    config_path.write_text("{not json")
    with pytest.raises(MuseTalkWeightsError, match="not valid JSON"):
        load_musetalk(broken)


def test_weights_that_do_not_fit_the_config_are_rejected(layout: Path, tmp_path: Path) -> None:
    broken = copy_layout(layout, tmp_path)
    config_path = broken / UNET_DIR / UNET_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, block_out_channels=[32, 32, 64, 64])))
    with pytest.raises(MuseTalkWeightsError, match=r"does not fit .*conv_in\.weight is \[16, 8, 3, 3\]"):
        load_musetalk(broken)


def test_the_factory_reports_missing_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATALK_MUSETALK__MODELS_DIR", str(tmp_path))
    with pytest.raises(RendererUnavailable, match="musetalkV15"):
        create_renderer("musetalk")


def test_models_load_in_float32_on_the_cpu(models: MuseTalkModels) -> None:
    assert models.dtype == torch.float32 and models.device.type == "cpu"
    assert models.audio.tokens == 50 and models.audio.d_model == models.unet.config["cross_attention_dim"]


# --- Latents -----------------------------------------------------------------------


def test_latents_are_stored_once_and_reused(avatars_root: Path, models: MuseTalkModels) -> None:
    store = AvatarStore(avatars_root)
    avatar = store.load("ava")
    manifest = ensure_latents(avatar, models.vae, models.vae_id)
    entry = manifest.latents[RENDERER_KEY]
    assert entry["vae"] == models.vae_id and entry["shape"] == [avatar.manifest.frame_count, 8, 32, 32]
    assert store.get("ava").latents[RENDERER_KEY] == entry  # the manifest on disk was rewritten, still valid
    stored = load_latents(avatar, models.vae_id)  # the cached avatar's manifest predates them: read from disk
    assert stored is not None and stored.dtype == np.float16
    written = (avatars_root / "ava" / LATENTS_FILE).stat().st_mtime_ns
    ensure_latents(avatars_root / "ava", models.vae, models.vae_id)  # by folder; nothing to do
    assert (avatars_root / "ava" / LATENTS_FILE).stat().st_mtime_ns == written
    assert load_latents(avatar, "another-vae") is None  # latents of another VAE are never used
    assert not list((avatars_root / "ava").glob(".*"))  # no temporary files left


def test_the_latents_command_adds_latents_to_prepared_avatars(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from avatalk.cli import app as cli_app

    ensure_default_avatar(tmp_path / "avatars", size=64, seconds=0.2)
    monkeypatch.setenv("AVATALK_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AVATALK_MUSETALK__MODELS_DIR", str(layout))
    result = CliRunner().invoke(cli_app, ["avatar", "add-latents", "ava"])
    assert result.exit_code == 0, result.output
    assert "ava: latents of 5 frames ready" in result.stdout
    assert AvatarStore(tmp_path / "avatars").get("ava").latents[RENDERER_KEY]["shape"] == [5, 8, 32, 32]
    result = CliRunner().invoke(cli_app, ["avatar", "add-latents", "ava", "nobody"])
    assert result.exit_code == 1
    assert "nobody" in result.stderr


# --- Rendering ---------------------------------------------------------------------


def test_silence_and_idle_ticks_never_reach_the_unet(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    calls = count_unet_calls(renderer.models)
    session = renderer.open(avatar, SIZE)
    quiet = (1e-4 * np.random.default_rng(0).standard_normal(SAMPLES_PER_TICK)).astype(np.float32)  # -80 dBFS
    for tick in range(6):
        assert session.idle_frame(tick) is session.idle_frame(tick + 18)
        audio = quiet if tick % 2 else np.zeros(SAMPLES_PER_TICK, np.float32)
        session.look_ahead(tick, np.tile(audio, 4))
        assert session.render(tick, audio) is session.idle_frame(tick)
    assert calls[0] == 0 and session.stats.silent == 6
    spoken = session.render(6, tick_audio(voice(0), 0))
    assert calls[0] == 1 and session.stats.generated == 1
    assert spoken.shape == (SIZE, SIZE, 3) and spoken.dtype == np.uint8 and not spoken.flags.writeable


def test_the_face_is_pasted_only_inside_the_blend_mask(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    session = renderer.open(avatar, SIZE)
    frame = speak(session, voice(1, ticks=3), look_ahead=False)[2]
    idle = session.idle_frame(2)
    x1, y1, x2, y2 = avatar.boxes[2]  # the avatar is SIZE x SIZE: boxes are at output scale
    covered = np.zeros(idle.shape[:2], bool)
    covered[y1:y2, x1:x2] = cv2.resize(avatar.masks[2], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR) > 0
    changed = np.any(frame != idle, axis=2)
    assert changed.any() and not changed[~covered].any()
    assert not changed[y1 : y1 + (y2 - y1) // 3].any()  # the mask covers the lower face only


def test_concurrent_sessions_get_their_own_frames_in_order(models: MuseTalkModels, avatar: LoadedAvatar) -> None:
    """Three sessions at once, batched together, match each session rendered alone, frame by frame."""
    voices = [voice(seed) for seed in range(3)]
    alone = make_renderer(models, max_batch=1)
    try:
        expected = [speak(alone.open(avatar, SIZE), audio, look_ahead=True) for audio in voices]
        assert alone.scheduler.stats.mean_batch == 1.0
    finally:
        alone.close()

    batched = make_renderer(models, max_batch=8)
    sessions = [batched.open(avatar, SIZE) for _ in voices]
    results: list[list[np.ndarray]] = [[] for _ in voices]
    start = threading.Barrier(len(voices))

    def run(index: int) -> None:
        start.wait()
        results[index] = speak(sessions[index], voices[index], look_ahead=True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(voices))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert batched.scheduler.stats.mean_batch > 1.5  # frames of several sessions shared batches
    finally:
        batched.close()
    for session, frames, reference in zip(sessions, results, expected, strict=True):
        assert len(frames) == TICKS and session.stats == RenderStats(frames=TICKS, generated=TICKS)
        for frame, want in zip(frames, reference, strict=True):
            assert np.abs(frame.astype(int) - want.astype(int)).max() <= 2  # batched == unbatched


def test_look_ahead_and_render_alone_agree_where_the_context_is_the_same(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar
) -> None:
    """The last frames of a clip have no more audio after them either way: both paths give the same frame."""
    audio = voice(5, ticks=6)
    ahead = speak(renderer.open(avatar, SIZE), audio, look_ahead=True)
    alone = speak(renderer.open(avatar, SIZE), audio, look_ahead=False)
    assert np.abs(ahead[-1].astype(int) - alone[-1].astype(int)).max() <= 2
    assert any(np.any(a != b) for a, b in zip(ahead[:3], alone[:3], strict=True))  # full context differs


def test_a_late_frame_is_the_idle_frame_and_the_session_reports_it(
    models: MuseTalkModels, avatar: LoadedAvatar, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slow = make_renderer(models, frame_budget_ms=30, look_ahead_ms=0)
    generate = slow.generator.generate

    def stalled(latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        time.sleep(0.3)
        return generate(latents, features)

    monkeypatch.setattr(slow.generator, "generate", stalled)
    session = slow.open(avatar, SIZE)
    audio = voice(6, ticks=4)
    caplog.set_level(logging.WARNING, logger="avatalk.avatars.renderers.musetalk.renderer")
    try:
        for tick in range(4):
            started = time.monotonic()
            frame = session.render(tick, tick_audio(audio, tick))
            assert time.monotonic() - started < 0.25  # never waits for the stalled GPU
            assert frame is session.idle_frame(tick)
    finally:
        slow.close()
    assert session.stats.late == 4 and session.stats.degraded
    degraded = [record for record in caplog.records if "degraded" in record.getMessage()]
    assert len(degraded) == 1 and "3 of the last" in degraded[0].getMessage()


def test_reset_and_changed_audio_start_a_new_clip(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    session = renderer.open(avatar, SIZE)
    first, second = voice(7, ticks=4), voice(8, ticks=4)
    session.look_ahead(0, first)
    session.render(0, tick_audio(first, 0))
    session.look_ahead(1, second[SAMPLES_PER_TICK:])  # the queue was cleared and refilled
    after_change = session.render(1, tick_audio(second, 1))
    fresh = renderer.open(avatar, SIZE)
    fresh.look_ahead(1, second[SAMPLES_PER_TICK:])
    assert np.abs(after_change.astype(int) - fresh.render(1, tick_audio(second, 1)).astype(int)).max() <= 2
    session.reset()
    assert session.render(3, tick_audio(second, 3)).shape == (SIZE, SIZE, 3)
    assert session.stats.late == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_float16_on_cuda_end_to_end(layout: Path, avatar: LoadedAvatar) -> None:
    cuda = load_musetalk(layout, device="cuda")
    assert cuda.dtype == torch.float16
    gpu = MuseTalkRenderer(MuseTalkSettings(frame_budget_ms=1000), models=cuda)
    try:
        session = gpu.open(avatar, SIZE)
        frames = speak(session, voice(9), look_ahead=True)
        assert len(frames) == TICKS and session.stats.generated == TICKS and session.stats.late == 0
    finally:
        gpu.close()
