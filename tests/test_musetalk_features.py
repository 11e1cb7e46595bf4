"""MuseTalk audio features: streamed per tick they equal the official whole-clip computation.

A tiny random-weight Whisper (d_model 32, 4 layers, so 5 hidden states as in
the real model) is written in the official layout and loaded by the real
loader. Its position table is 1 s long (``max_source_positions`` 50, feature
extractor ``chunk_length`` 1) instead of 30 s, so that a short clip fills
whole Whisper windows: with a context covering a whole window, streaming
and the official "pad to the window, encode, cut [2i-4, 2i+6)" must agree to
rounding, layer by layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor, WhisperModel  # noqa: E402

from avatalk.avatars.renderers.musetalk.features import (  # noqa: E402
    SAMPLES_PER_BLOCK,
    AudioFeatureStream,
    WhisperFeatureEncoder,
)
from avatalk.avatars.renderers.musetalk.loader import WHISPER_DIR, load_audio_encoder  # noqa: E402
from avatalk.avatars.renderers.musetalk.random_models import write_layout  # noqa: E402

RATE = 16000
PIECE_S = 1


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_layout(tmp_path_factory.mktemp("models"), piece_s=PIECE_S) / WHISPER_DIR


@pytest.fixture(scope="module")
def encoder(whisper_dir: Path) -> WhisperFeatureEncoder:
    return load_audio_encoder(whisper_dir, device=torch.device("cpu"), dtype=torch.float32)


def speechlike(seconds: float, seed: int = 1) -> np.ndarray:
    """A voiced tone with a syllable rhythm, some noise and a stretch of digital silence."""
    n = round(seconds * RATE)
    t = np.arange(n) / RATE
    rng = np.random.default_rng(seed)
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(n)
    audio[int(0.55 * n) : int(0.7 * n)] = 0.0  # exercises Whisper's 8-decade clamp
    return audio.astype(np.float32)


def official_features(whisper_dir: Path, audio: np.ndarray) -> np.ndarray:
    """MuseTalk's own recipe (audio_processor.py): windows padded by the extractor, encoded, cut per frame."""
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    model = WhisperModel.from_pretrained(whisper_dir).eval()
    window = extractor.n_samples
    states = []
    for start in range(0, len(audio), window):
        mel = extractor(audio[start : start + window], sampling_rate=RATE, return_tensors="np").input_features
        with torch.no_grad():
            hidden = model.encoder(torch.from_numpy(mel), output_hidden_states=True).hidden_states
        states.append(torch.stack(hidden, dim=2))
    whisper = torch.cat(states, dim=1)[:, : math.floor(len(audio) / RATE * 50)]
    whisper = torch.cat([torch.zeros_like(whisper[:, :4]), whisper, torch.zeros_like(whisper[:, :12])], dim=1)
    frames = math.floor(len(audio) / RATE * 25)
    prompts = torch.cat([whisper[:, 2 * i : 2 * i + 10] for i in range(frames)])
    prompts = prompts.reshape(frames, -1, prompts.shape[-1])  # (c h) w: token = 5 * time + state
    tokens, width = prompts.shape[1:]
    position = torch.arange(tokens, dtype=torch.float)[:, None]
    div = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
    encoding = torch.zeros(tokens, width)
    encoding[:, 0::2] = torch.sin(position * div)
    encoding[:, 1::2] = torch.cos(position * div)
    result: np.ndarray = (prompts + encoding).numpy()
    return result


def streamed(
    encoder: WhisperFeatureEncoder, audio: np.ndarray, chunks: list[int], *, left: int, right: int
) -> np.ndarray:
    """Push ``audio`` in ``chunks`` (sample counts), taking each frame's features as soon as it is ready."""
    stream = AudioFeatureStream(encoder, left=left, right=right)
    frames = len(audio) // SAMPLES_PER_BLOCK
    out: dict[int, np.ndarray] = {}
    start = 0
    for size in chunks:
        stream.push(audio[start : start + size])
        start += size
        ready = [i for i in range(min(stream.ready_frames(), frames)) if i not in out]
        out.update(zip(ready, stream.features(ready), strict=True))
    assert start == len(audio)
    rest = [i for i in range(frames) if i not in out]
    out.update(zip(rest, stream.features(rest, provisional=True), strict=True))
    return np.stack([out[i] for i in range(frames)])


def test_streamed_features_equal_the_official_computation(encoder: WhisperFeatureEncoder, whisper_dir: Path) -> None:
    audio = speechlike(2 * PIECE_S)  # two whole Whisper windows
    reference = official_features(whisper_dir, audio)
    assert reference.shape == (50, 50, 32)
    per_tick = streamed(encoder, audio, [SAMPLES_PER_BLOCK] * (len(audio) // SAMPLES_PER_BLOCK), left=50, right=50)
    np.testing.assert_allclose(per_tick, reference, rtol=0, atol=2e-5)


def test_chunking_never_changes_the_features(encoder: WhisperFeatureEncoder) -> None:
    """Bounded context: per tick, odd-sized chunks and all at once give the same features."""
    audio = speechlike(2.6 * PIECE_S, seed=2)  # crosses a window boundary and ends inside one
    ticks = len(audio) // SAMPLES_PER_BLOCK
    whole = streamed(encoder, audio, [len(audio)], left=8, right=4)
    rng = np.random.default_rng(3)
    sizes: list[int] = []
    while sum(sizes) < len(audio):
        sizes.append(min(int(rng.integers(1, 3000)), len(audio) - sum(sizes)))
    for chunks in ([SAMPLES_PER_BLOCK] * ticks, sizes):
        np.testing.assert_allclose(streamed(encoder, audio, chunks, left=8, right=4), whole, rtol=0, atol=1e-5)


def test_a_frame_needed_early_is_the_frame_of_the_clip_cut_there(encoder: WhisperFeatureEncoder) -> None:
    """Without look-ahead, frame k is computed as if the clip ended after tick k (reduced right context)."""
    audio = speechlike(1.6 * PIECE_S, seed=4)
    stream = AudioFeatureStream(encoder, left=8, right=4)
    for tick in range(len(audio) // SAMPLES_PER_BLOCK):
        stream.push(audio[tick * SAMPLES_PER_BLOCK : (tick + 1) * SAMPLES_PER_BLOCK])
        if tick in (0, 3, 24, 26, 39):
            early = stream.features([tick], provisional=True)[0]
            cut = AudioFeatureStream(encoder, left=8, right=4)
            cut.push(audio[: (tick + 1) * SAMPLES_PER_BLOCK])
            np.testing.assert_allclose(early, cut.features([tick], provisional=True)[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        stream.features([stream.known_blocks - 1])


def test_frames_outside_the_clip_are_zeros_plus_the_encoding(encoder: WhisperFeatureEncoder) -> None:
    stream = AudioFeatureStream(encoder, left=4, right=2)
    stream.push(speechlike(0.2, seed=5))  # 5 ticks
    features = stream.features([0, 20], provisional=True)
    states = encoder.num_states
    # Frame 0's window starts 4 Whisper frames (2 blocks) before the clip: zeros there.
    np.testing.assert_array_equal(features[0, : 4 * states], encoder.positional[: 4 * states])
    assert not np.allclose(features[0, 4 * states :], encoder.positional[4 * states :])
    np.testing.assert_array_equal(features[1], encoder.positional)
