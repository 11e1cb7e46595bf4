"""The MuseTalk renderer end to end on the CPU, with tiny random-weight models in the official layout.

The models are written as a user would have them (``musetalkV15/unet.pth``
as a plain state dict + ``musetalk.json``, ``sd-vae/`` and ``whisper/`` via
``save_pretrained``) and loaded by the real loader; frames go through the
real scheduler. The GPU-only checks are in ``test_musetalk_gpu.py``.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402

from avatalk.avatars.default_face import ensure_default_avatar  # noqa: E402
from avatalk.avatars.renderers import (  # noqa: E402
    SAMPLES_PER_TICK,
    ClassicSession,
    FallbackRenderer,
    FallbackSession,
    RendererUnavailable,
    SpeechSegment,
    create_renderer,
)
from avatalk.avatars.renderers.classic import ClassicRenderer  # noqa: E402
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
from avatalk.avatars.renderers.musetalk.blending import (  # noqa: E402
    blur_kernel,
    crop_square,
    jaw_paste,
)
from avatalk.avatars.renderers.musetalk.latents import LATENTS_FILE, RENDERER_KEY  # noqa: E402
from avatalk.avatars.renderers.musetalk.loader import (  # noqa: E402
    UNET_CONFIG,
    UNET_DIR,
    UNET_WEIGHTS,
)
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
def renderer(models: MuseTalkModels, avatar: LoadedAvatar) -> Iterator[MuseTalkRenderer]:
    renderer = make_renderer(models, max_batch=1)
    renderer.prepare(avatar)
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


def speak(session: MuseTalkSession, audio: np.ndarray, *, look_ahead: bool, start: int = 0) -> list[np.ndarray]:
    """Render every tick of ``audio`` (one segment, from tick ``start``) as the video stage would.

    With ``look_ahead`` the session is told the queued segment before each
    tick, as in serving; without, it only sees each tick's audio (offline).
    """
    segment = SpeechSegment(start * SAMPLES_PER_TICK, audio)
    frames = []
    for tick in range(len(audio) // SAMPLES_PER_TICK):
        if look_ahead:
            session.look_ahead(start + tick, [segment])
        frames.append(session.render(start + tick, tick_audio(audio, tick)))
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
    renderer = create_renderer("musetalk")
    assert isinstance(renderer, FallbackRenderer) and renderer.primary is None
    musetalk, classic = renderer.status()
    assert not musetalk.live and musetalk.reason is not None and "musetalkV15" in musetalk.reason
    assert classic.name == "classic" and classic.live


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
        session.look_ahead(tick, [SpeechSegment(tick * SAMPLES_PER_TICK, np.tile(audio, 4))])
        assert session.render(tick, audio) is session.idle_frame(tick)
    assert calls[0] == 0 and session.stats.silent == 6
    spoken = session.render(6, tick_audio(voice(0), 0))
    assert calls[0] == 1 and session.stats.generated == 1
    assert spoken.shape == (SIZE, SIZE, 3) and spoken.dtype == np.uint8 and not spoken.flags.writeable
    session.close()


def test_the_face_is_pasted_only_where_the_jaw_mask_lets_it(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    session = renderer.open(avatar, SIZE)
    frame = speak(session, voice(1, ticks=3), look_ahead=True)[2]
    session.close()
    idle = session.idle_frame(2)
    index = int(avatar.cycle[2])
    paste = jaw_paste(avatar.landmarks[index], avatar.boxes[index], idle.shape[:2])  # the avatar is SIZE x SIZE
    assert paste is not None
    covered = np.zeros(idle.shape[:2], bool)
    covered[paste.rows, paste.cols] = paste.alpha[..., 0] > 0
    changed = np.any(frame != idle, axis=2)
    assert changed.any() and not changed[~covered].any()
    _, y1, _, y2 = avatar.boxes[index]
    radius = blur_kernel(crop_square(avatar.boxes[index])[2]) // 2
    assert not changed[: (y1 + y2) // 2 - radius].any()  # the official upper boundary, feathered


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


def test_without_look_ahead_a_frame_is_made_from_the_clip_so_far(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar
) -> None:
    """Offline renders give one tick at a time: the last frame, with no audio after it either way, is the same."""
    audio = voice(5, ticks=6)
    ahead = speak(renderer.open(avatar, SIZE), audio, look_ahead=True)
    alone = speak(renderer.open(avatar, SIZE), audio, look_ahead=False)
    assert np.abs(ahead[-1].astype(int) - alone[-1].astype(int)).max() <= 2
    assert any(np.any(a != b) for a, b in zip(ahead[:3], alone[:3], strict=True))  # the rest of the clip matters


def test_a_late_frame_is_the_idle_frame_and_the_session_reports_it(
    models: MuseTalkModels, avatar: LoadedAvatar, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slow = make_renderer(models, frame_budget_ms=30, look_ahead_ms=0)
    generate = slow.generator.generate

    release = threading.Event()

    def stalled(latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        release.wait(10)  # the GPU stalls until the test has seen every frame
        return generate(latents, features)

    monkeypatch.setattr(slow.generator, "generate", stalled)
    session = slow.open(avatar, SIZE)
    audio = voice(6, ticks=4)
    caplog.set_level(logging.WARNING, logger="avatalk.avatars.renderers.musetalk.session")
    try:
        for tick in range(4):
            frame = session.render(tick, tick_audio(audio, tick))  # returns while the GPU is still stalled
            assert frame is session.idle_frame(tick)
    finally:
        release.set()
        slow.close()
    assert session.stats.late == 4 and session.stats.degraded
    degraded = [record for record in caplog.records if "degraded" in record.getMessage()]
    assert len(degraded) == 1 and "3 of the last" in degraded[0].getMessage()


def test_a_refilled_queue_and_a_reset_start_new_clips(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    first, second = voice(7, ticks=4), voice(8, ticks=4)
    session = renderer.open(avatar, SIZE)
    session.look_ahead(0, [SpeechSegment(0, first)])
    session.render(0, tick_audio(first, 0))
    session.look_ahead(1, [SpeechSegment(0, second)])  # the queue was cleared and refilled at the same place
    after_change = session.render(1, tick_audio(second, 1))
    fresh = renderer.open(avatar, SIZE)
    fresh.look_ahead(1, [SpeechSegment(0, second)])
    assert np.abs(after_change.astype(int) - fresh.render(1, tick_audio(second, 1)).astype(int)).max() <= 2
    session.reset()
    assert session.render(3, tick_audio(second, 3)).shape == (SIZE, SIZE, 3)
    assert session.stats.late == 0
    session.close()
    fresh.close()


def test_sentences_queued_back_to_back_are_separate_clips(renderer: MuseTalkRenderer, avatar: LoadedAvatar) -> None:
    """A tick is drawn from the sentence that holds most of its audio, each sentence encoded on its own."""
    first, second = voice(9, ticks=3)[:1700], voice(10, ticks=3)
    segments = [SpeechSegment(0, first), SpeechSegment(1700, second)]  # the second starts 420 samples into tick 2
    seen: list[np.ndarray] = []
    handle = renderer.models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(kwargs["encoder_hidden_states"].numpy()), with_kwargs=True
    )
    timeline = np.zeros(6 * SAMPLES_PER_TICK, np.float32)
    timeline[: 1700 + len(second)] = np.concatenate([first, second])
    session = renderer.open(avatar, SIZE)
    try:
        for tick in range(6):
            session.look_ahead(tick, segments)
            session.render(tick, timeline[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
    finally:
        handle.remove()
        session.close()
    encoder = renderer.models.audio
    first_states, second_states = encoder.encode(first), encoder.encode(second)
    expected = [
        *encoder.windows(first_states, [0, 2, 4]),  # tick 2 holds 420 samples of the first, 220 of the second
        *encoder.windows(second_states, [(tick * 640 - 1700 + 160) // 320 for tick in (3, 4, 5)]),
    ]
    assert session.stats.generated == 6
    np.testing.assert_allclose(np.stack(seen), np.stack(expected), rtol=0, atol=1e-5)


# --- Blending (v1.5 jaw mode) ------------------------------------------------------


def test_the_jaw_mask_follows_the_official_geometry(tmp_path: Path) -> None:
    ensure_default_avatar(tmp_path, size=512, seconds=0.2)  # a face box of about 200 px, as MuseTalk's scripts see
    avatar = AvatarStore(tmp_path).load("ava")
    index = int(avatar.cycle[0])
    landmarks, box = avatar.landmarks[index], avatar.boxes[index]
    paste = jaw_paste(landmarks, box, avatar.frames[index].shape[:2])
    assert paste is not None
    alpha = paste.alpha[..., 0]
    x1, y1, x2, y2 = (int(v) for v in box)
    assert alpha.shape == (y2 - y1, x2 - x1)
    # Seamless: zero on the box's left, right and bottom edges.
    assert alpha[:, 0].max() == alpha[:, -1].max() == alpha[-1].max() == 0.0
    # The official upper boundary: nothing above half of the 1.5x square (its centre is the box's), feathered.
    _, top, side = crop_square(box)
    assert top + side // 2 == (y1 + y2) // 2
    assert alpha[: (y1 + y2) // 2 - y1 - blur_kernel(side) // 2].max() == 0.0
    assert alpha[(y1 + y2) // 2 - y1 - 2].max() > 0.0  # and the feather reaches above it
    nose = np.round(landmarks[1] - [x1, y1]).astype(int)
    assert alpha[nose[1], nose[0]] < 0.15  # the nose is excluded
    chin = np.round(landmarks[152] - [x1, y1]).astype(int)
    assert 0.65 <= alpha[chin[1], chin[0]] <= 0.85  # official: about 0.75 at the chin line
    mouth = np.round(landmarks[13] - [x1, y1]).astype(int)
    assert alpha[mouth[1], mouth[0]] > 0.99
    assert side == 2 * int(max(x2 - x1, y2 - y1) // 2 * 1.5) and blur_kernel(side) == int(0.1 * side // 2 * 2) + 1


# --- Fallback to the classic renderer ----------------------------------------------


def fresh_avatar(root: Path) -> LoadedAvatar:
    ensure_default_avatar(root, size=SIZE, seconds=0.2)
    return AvatarStore(root).load("ava")


def test_an_avatar_without_latents_is_drawn_by_classic_until_they_are_ready(
    models: MuseTalkModels, tmp_path: Path
) -> None:
    avatar = fresh_avatar(tmp_path)
    musetalk = make_renderer(models)
    renderer = FallbackRenderer("musetalk", musetalk, ClassicRenderer())
    try:
        session = renderer.open(avatar, SIZE)
        assert isinstance(session.current, ClassicSession)
        notice = session.take_fallback()
        assert notice is not None and notice.reason == "no_latents" and "latents" in notice.message
        assert session.take_fallback() is None  # reported once
        assert musetalk.sessions == 0  # the refused session holds no GPU slot
        musetalk.prepare(avatar)  # what the background computation started by open() finishes
        assert load_latents(avatar, models.vae_id) is not None
        later = renderer.open(avatar, SIZE)
        assert isinstance(later.current, MuseTalkSession) and later.take_fallback() is None
        later.close()
    finally:
        renderer.close()


def test_sessions_beyond_the_gpu_capacity_are_drawn_by_classic(models: MuseTalkModels, avatar: LoadedAvatar) -> None:
    musetalk = make_renderer(models, max_sessions=2)
    musetalk.prepare(avatar)
    renderer = FallbackRenderer("musetalk", musetalk, ClassicRenderer())
    try:
        first, second = renderer.open(avatar, SIZE), renderer.open(avatar, SIZE)
        third = renderer.open(avatar, SIZE)
        assert isinstance(third.current, ClassicSession)
        notice = third.take_fallback()
        assert notice is not None and notice.reason == "gpu_full" and "MAX_SESSIONS" in notice.message
        first.close()
        assert musetalk.sessions == 1
        assert isinstance(renderer.open(avatar, SIZE).current, MuseTalkSession)  # a freed slot is used again
        gc.collect()  # that session was never closed (offline renders do not close): collecting it frees its slot
        assert musetalk.sessions == 1
        second.close()
        assert musetalk.sessions == 0
    finally:
        renderer.close()


def test_a_device_error_hands_the_session_to_classic_and_takes_musetalk_out(
    models: MuseTalkModels, avatar: LoadedAvatar, monkeypatch: pytest.MonkeyPatch
) -> None:
    musetalk = make_renderer(models)
    musetalk.prepare(avatar)
    renderer = FallbackRenderer("musetalk", musetalk, ClassicRenderer())

    def failing_generate_fake(latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(musetalk.generator, "generate", failing_generate_fake)
    audio = voice(11, ticks=3)
    try:
        session = renderer.open(avatar, SIZE)
        assert isinstance(session.current, MuseTalkSession) and session.uses_look_ahead
        frames = speak(session, audio, look_ahead=True)
        assert isinstance(session.current, ClassicSession) and not session.uses_look_ahead
        classic = ClassicRenderer().open(avatar, SIZE)
        np.testing.assert_array_equal(frames[0], classic.render(0, tick_audio(audio, 0)))  # no frame lost
        notice = session.take_fallback()
        assert notice is not None and notice.reason == "device_error" and "illegal memory access" in notice.message
        assert musetalk.sessions == 0  # the failed session's slot was released
        status = {item.name: item for item in renderer.status()}
        assert not status["musetalk"].live and "CUDA error" in (status["musetalk"].reason or "")
        later = renderer.open(avatar, SIZE)  # new sessions go straight to classic
        assert isinstance(later.current, ClassicSession) and later.take_fallback().reason == "device_error"
    finally:
        renderer.close()


def test_a_model_that_failed_to_load_serves_every_session_with_classic(avatar: LoadedAvatar, tmp_path: Path) -> None:
    renderer = create_renderer("musetalk", MuseTalkSettings(models_dir=tmp_path))
    session = renderer.open(avatar, SIZE)
    assert isinstance(session, FallbackSession) and isinstance(session.current, ClassicSession)
    notice = session.take_fallback()
    assert notice is not None and notice.reason == "model_unavailable" and "musetalkV15" in notice.message
    assert session.render(0, tick_audio(voice(12, ticks=1), 0)).shape == (SIZE, SIZE, 3)
