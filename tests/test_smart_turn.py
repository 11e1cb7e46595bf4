"""The real smart-turn v3 model (from the pipecat-ai wheel) on utterances synthesised with piper."""

from __future__ import annotations

import numpy as np
import pytest

from avatalk.config import Settings
from avatalk.streaming.models import load_smart_turn
from avatalk.streaming.smart_turn import SmartTurnModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> SmartTurnModel:
    loaded = load_smart_turn(Settings())
    if loaded is None:
        pytest.skip("the pipecat-ai wheel (smart-turn model) is not installed; run `make setup`")
    return loaded


def spoken(speech, text: str) -> np.ndarray:
    """The utterance as the detector holds it after the short silence: pre-roll, speech, 180 ms of silence."""
    return np.concatenate([np.zeros(3200, np.float32), speech(text), np.zeros(2880, np.float32)])


@pytest.mark.parametrize("text", ["What is the capital of France?", "Tell me a fun fact about cats.", "How are you today?"])
def test_a_finished_question_is_complete(model: SmartTurnModel, speech, text: str) -> None:
    assert model.complete_probability(spoken(speech, text)) > 0.5


@pytest.mark.parametrize("text", ["Can you tell me, um, the", "So I was thinking that maybe"])
def test_a_trailing_thought_is_incomplete(model: SmartTurnModel, speech, text: str) -> None:
    assert model.complete_probability(spoken(speech, text)) < 0.5


def test_the_input_is_whisper_log_mel_of_the_last_eight_seconds(model: SmartTurnModel) -> None:
    rng = np.random.default_rng(1)
    long = rng.standard_normal(16000 * 10).astype(np.float32) * 0.1
    features = model.features(long)
    assert features.shape == (80, 800)
    np.testing.assert_allclose(features, model.features(long[-16000 * 8 :]), atol=1e-6)  # only the last 8 s count
    short = model.features(long[:16000])  # shorter audio is padded with silence at the start
    assert short.shape == (80, 800)
    assert np.ptp(short[:, :690], axis=1).max() < 1e-5  # 7 s of leading silence: constant in time
    assert np.ptp(short[:, 710:], axis=1).min() > 0.1  # the last second: the noise


def test_a_missing_model_turns_semantic_mode_off(tmp_path) -> None:
    assert load_smart_turn(Settings(turns={"smart_turn_model_path": tmp_path / "none.onnx"})) is None
    assert load_smart_turn(Settings(turns={"semantic": False})) is None
