import numpy as np
import pytest

from avatalk.config import Settings
from avatalk.streaming.vad import WINDOW_SAMPLES, SileroVAD

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    return SileroVAD(Settings().vad_model_path())


def test_speech_scores_high_and_silence_low(vad, speech):
    audio = np.concatenate([np.zeros(16000, np.float32), speech("The weather is lovely today."), np.zeros(16000, np.float32)])
    stream = vad.stream()
    # Feed in odd-sized pieces: windows must be assembled across calls.
    results = []
    for offset in range(0, len(audio), 700):
        results += stream.process(audio[offset : offset + 700])
    assert len(results) == len(audio) // WINDOW_SAMPLES
    probabilities = np.array([p for _, p in results])
    lead = probabilities[: 16000 // WINDOW_SAMPLES - 2]
    assert lead.max() < 0.2
    assert (probabilities > 0.5).sum() * 0.032 > 0.8  # most of the sentence is speech


def test_noise_is_not_speech(vad):
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(32000) * 0.01).astype(np.float32)
    probabilities = [p for _, p in vad.stream().process(noise)]
    assert max(probabilities) < 0.5


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="silero"):
        SileroVAD(tmp_path / "nope.onnx")
