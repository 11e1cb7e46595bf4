"""MuseTalk audio features: what the renderer feeds the UNet equals the official recipe, per reply segment.

The Whisper encoder is the full-size Whisper-tiny configuration (4 layers,
d_model 384, 1500 positions) with random weights, written in the official
layout and loaded by the real loader. The reference below is this test's
own implementation of the official ``AudioProcessor`` (read from
TMElyralab/MuseTalk, ``musetalk/utils/audio_processor.py`` and
``models/unet.py``): each 30 s piece through ``WhisperFeatureExtractor``
(padded to 30 s), the encoder's hidden states over the whole window, the
pieces joined and cut to ``floor(seconds * 50)``, frame ``i`` taking
``[2i - 4, 2i + 6)`` with zeros outside, then the positional encoding. The
renderer is driven like a live session (``look_ahead`` with the queued
segment, then ``render``), and the ``encoder_hidden_states`` its UNet
receives are compared frame by frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor, WhisperModel  # noqa: E402

from avatalk.avatars.default_face import ensure_default_avatar  # noqa: E402
from avatalk.avatars.renderers import SAMPLES_PER_TICK, SpeechSegment  # noqa: E402
from avatalk.avatars.renderers.musetalk import (  # noqa: E402
    MuseTalkModels,
    MuseTalkRenderer,
    MuseTalkSettings,
    WhisperFeatureEncoder,
    load_musetalk,
)
from avatalk.avatars.renderers.musetalk.features import ClipFeatures, clip_whisper_frames  # noqa: E402
from avatalk.avatars.renderers.musetalk.loader import WHISPER_DIR  # noqa: E402
from avatalk.avatars.renderers.musetalk.random_models import write_layout  # noqa: E402
from avatalk.avatars.store import AvatarStore, LoadedAvatar  # noqa: E402

RATE = 16000
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layout(tmp_path_factory.mktemp("models"), "reduced")


@pytest.fixture(scope="module")
def models(layout: Path) -> MuseTalkModels:
    loaded = load_musetalk(layout)
    config = loaded.audio.encoder.config
    assert (config.d_model, config.encoder_layers, config.max_source_positions) == (384, 4, 1500)  # full size
    return loaded


@pytest.fixture(scope="module")
def avatar(tmp_path_factory: pytest.TempPathFactory) -> LoadedAvatar:
    root = tmp_path_factory.mktemp("avatars")
    ensure_default_avatar(root, size=96, seconds=0.4)
    return AvatarStore(root).load("ava")


@pytest.fixture(scope="module")
def renderer(models: MuseTalkModels, avatar: LoadedAvatar) -> Iterator[MuseTalkRenderer]:
    settings = MuseTalkSettings(frame_budget_ms=60000, look_ahead_ms=0, max_batch=1, silence_db=-90)
    renderer = MuseTalkRenderer(settings, models=models)
    renderer.prepare(avatar)
    yield renderer
    renderer.close()


@pytest.fixture(scope="module")
def encoder(models: MuseTalkModels) -> WhisperFeatureEncoder:
    return models.audio


def speechlike(seconds: float, seed: int, *, silence_s: float = 0.0) -> np.ndarray:
    """A voiced tone with a syllable rhythm and some noise, after ``silence_s`` of digital silence."""
    rng = np.random.default_rng(seed)
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = 120 + 60 * rng.random()
    audio = 0.3 * np.sin(2 * np.pi * pitch * t) * (1.2 + np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(n)
    audio[: round(silence_s * RATE)] = 0.0
    return audio.astype(np.float32)


def official_whisper(whisper_dir: Path, audio: np.ndarray) -> torch.Tensor:
    """The official joined, cut and padded Whisper states ``(4 + frames + 12, 5, 384)`` of one clip."""
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    model = WhisperModel.from_pretrained(whisper_dir).eval()
    window = 30 * RATE
    states = []
    for start in range(0, len(audio), window):
        mel = extractor(audio[start : start + window], sampling_rate=RATE, return_tensors="pt").input_features
        with torch.no_grad():
            hidden = model.encoder(mel, output_hidden_states=True).hidden_states
        states.append(torch.stack(hidden, dim=2))
    whisper = torch.cat(states, dim=1)[0, : math.floor(len(audio) / RATE * 50)]
    return torch.cat([torch.zeros_like(whisper[:4]), whisper, torch.zeros_like(whisper[:12])])


def official_prompts(padded: torch.Tensor, starts: list[int]) -> np.ndarray:
    """Windows of ten Whisper frames starting at ``starts`` of the padded states, flattened, plus MuseTalk's PE."""
    prompts = torch.stack([padded[start : start + 10] for start in starts])  # (n, 10, 5, 384)
    prompts = prompts.reshape(len(starts), -1, prompts.shape[-1])  # (c h) w: token = 5 * time + state
    tokens, width = prompts.shape[1:]
    position = torch.arange(tokens, dtype=torch.float)[:, None]
    div = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
    encoding = torch.zeros(tokens, width)
    encoding[:, 0::2] = torch.sin(position * div)
    encoding[:, 1::2] = torch.cos(position * div)
    result: np.ndarray = (prompts + encoding).numpy()
    return result


def fed_to_unet(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, segment: SpeechSegment, ticks: list[int]
) -> np.ndarray:
    """Drive a session through ``ticks`` as the video stage does; the UNet's ``encoder_hidden_states``, in order."""
    seen: list[np.ndarray] = []

    def hook(module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, torch.Tensor]) -> None:
        seen.extend(kwargs["encoder_hidden_states"].float().numpy())

    handle = renderer.models.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        session = renderer.open(avatar, 96)
        timeline = np.zeros(segment.stop + 2 * SAMPLES_PER_TICK, np.float32)
        timeline[segment.start : segment.stop] = segment.audio
        for tick in ticks:
            session.look_ahead(tick, [segment])
            session.render(tick, timeline[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
        session.close()
    finally:
        handle.remove()
    assert session.stats.generated == len(ticks) == len(seen)
    return np.stack(seen)


@pytest.mark.parametrize(
    ("seconds", "silence_s"),
    [(0.6, 0.0), (2.37, 0.0), (1.2, 0.4)],
    ids=["0.6s", "2.37s-not-whole-ticks", "starts-with-400ms-digital-silence"],
)
def test_features_fed_to_the_unet_equal_the_official_recipe(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, layout: Path, seconds: float, silence_s: float
) -> None:
    audio = speechlike(seconds, seed=round(seconds * 100), silence_s=silence_s)
    frames = math.floor(len(audio) / RATE * 25)  # the official frame count (2.37 s: 59 of the 60 ticks)
    speaking = [i for i in range(frames) if i * SAMPLES_PER_TICK >= round(silence_s * RATE)]
    fed = fed_to_unet(renderer, avatar, SpeechSegment(0, audio), speaking)
    reference = official_prompts(official_whisper(layout / WHISPER_DIR, audio), [2 * i for i in speaking])
    assert fed.shape == reference.shape == (len(speaking), 50, 384)
    difference = float(np.abs(fed - reference).max())
    assert difference <= TOLERANCE, f"max abs difference {difference:.2e}"


def test_a_31s_segment_is_encoded_in_two_30s_windows_as_official(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, layout: Path
) -> None:
    audio = speechlike(31.0, seed=31)
    ticks = [0, 1, 2, 373, 374, 748, 749, 750, 751, 752, 773, 774]  # both ends, the middle and the 30 s seam
    fed = fed_to_unet(renderer, avatar, SpeechSegment(0, audio), ticks)
    reference = official_prompts(official_whisper(layout / WHISPER_DIR, audio), [2 * i for i in ticks])
    difference = float(np.abs(fed - reference).max())
    assert difference <= TOLERANCE, f"max abs difference {difference:.2e}"


def test_a_segment_starting_inside_a_tick_takes_the_nearest_whisper_frames(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, layout: Path
) -> None:
    """A sentence queued right after another starts mid-tick: each tick's window starts at its own Whisper frame."""
    audio = speechlike(0.8, seed=8)
    start = 3 * SAMPLES_PER_TICK + 200  # 12.5 ms into tick 3
    ticks = list(range(4, 22))  # the ticks the segment owns (most of their audio is in it)
    fed = fed_to_unet(renderer, avatar, SpeechSegment(start, audio), ticks)
    whisper_starts = [(tick * SAMPLES_PER_TICK - start + 160) // 320 for tick in ticks]
    reference = official_prompts(official_whisper(layout / WHISPER_DIR, audio), whisper_starts)
    np.testing.assert_allclose(fed, reference, rtol=0, atol=TOLERANCE)


def test_digital_silence_takes_the_log_floor_of_the_whole_window(encoder: WhisperFeatureEncoder) -> None:
    """Padded and silent audio get the window's floor (max - 8 decades), not a running peak's."""
    audio = speechlike(1.0, seed=3, silence_s=0.4)
    mel = encoder.log_mel(torch.from_numpy(np.pad(audio, (0, encoder.piece_samples - len(audio))))[None])[0]
    floor = float(mel.max()) - 2.0  # (max - 8 + 4) / 4 in normalised units
    np.testing.assert_allclose(mel[:, :30].numpy(), floor, atol=1e-6)  # the first 300 ms are silent
    np.testing.assert_allclose(mel[:, 200:].numpy(), floor, atol=1e-6)  # the padding after 1 s
    extractor = WhisperFeatureExtractor(feature_size=encoder.n_mels)
    official = extractor(audio, sampling_rate=RATE, return_tensors="np").input_features[0]
    assert float(np.abs(mel.numpy() - official).max()) < 1e-5


def test_the_official_frame_cut_is_kept_where_it_differs_from_integer_division() -> None:
    assert clip_whisper_frames(9280) == 28 and 9280 // 320 == 29  # 0.58 * 50 is 28.999... in float
    assert clip_whisper_frames(37920) == 118  # 2.37 s


def test_frames_outside_the_clip_are_zeros_plus_the_encoding(encoder: WhisperFeatureEncoder) -> None:
    states = encoder.encode(speechlike(0.2, seed=5))  # 10 Whisper frames
    assert states.shape == (10, 5, 384)
    features = encoder.windows(states, [0, 40])
    # Frame 0's window starts 4 Whisper frames before the clip: zeros there.
    np.testing.assert_array_equal(features[0, :20], encoder.positional[:20])
    assert not np.allclose(features[0, 20:], encoder.positional[20:])
    np.testing.assert_array_equal(features[1], encoder.positional)


def test_an_utterance_streamed_in_pieces_is_one_clip_known_so_far(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, encoder: WhisperFeatureEncoder
) -> None:
    """A render session's audio arrives in pieces that continue one utterance: each frame is made from the
    utterance as known when it is drawn (the official recipe on the audio so far), never from one piece alone."""
    audio = speechlike(0.8, seed=9)
    pieces = [(start, audio[start : start + 1000]) for start in range(0, len(audio), 1000)]
    seen: list[np.ndarray] = []
    handle = renderer.models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.extend(kwargs["encoder_hidden_states"].numpy()), with_kwargs=True
    )
    session = renderer.open(avatar, 96)
    known_at: list[int] = []
    try:
        for tick in range(len(audio) // SAMPLES_PER_TICK):
            known = min(len(audio), (tick + 2) * SAMPLES_PER_TICK)  # about a tick of audio ahead, as streamed
            arrived = [(start, piece) for start, piece in pieces if start < known]
            segments = [SpeechSegment(start, piece, continues=start > 0) for start, piece in arrived]
            known_at.append(arrived[-1][0] + len(arrived[-1][1]))
            session.look_ahead(tick, segments)
            session.render(tick, audio[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])
    finally:
        handle.remove()
        session.close()
    expected = [encoder.windows(encoder.encode(audio[:known]), [2 * tick])[0] for tick, known in enumerate(known_at)]
    np.testing.assert_allclose(np.stack(seen), np.stack(expected), rtol=0, atol=TOLERANCE)


def test_a_growing_clip_encodes_again_only_its_last_30s_piece(
    encoder: WhisperFeatureEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    encode_pieces = encoder.encode_pieces

    def counted(pieces: np.ndarray) -> np.ndarray:
        calls.append(len(pieces))
        return encode_pieces(pieces)

    monkeypatch.setattr(encoder, "encode_pieces", counted)
    audio = speechlike(31.0, seed=11)
    clip = ClipFeatures(encoder)
    clip.update(audio[: 30 * RATE + 8000])
    clip.update(audio)
    assert calls == [2, 1]  # the first 30 s piece was complete: its states are kept
    np.testing.assert_allclose(clip.states, encoder.encode(audio), rtol=0, atol=1e-6)
