"""Semantic end of turn: the smart-turn v3 classifier on the last seconds of the user's audio.

Silence alone cannot tell "What is the capital of France?" from "I'd like to
know about... um": both end in a pause. smart-turn v3 (the
``smart-turn-v3.2-cpu.onnx`` file shipped in the ``pipecat-ai`` wheel, run
here with onnxruntime; pipecat itself is never imported) looks at the
intonation and words of the last 8 s and says whether the speaker has
finished. The turn detector asks it after a short silence: "complete" ends the
turn at once, "incomplete" waits longer for the user to go on.

Its input is Whisper's log-mel spectrogram of exactly 8 s of 16 kHz audio
(zero-padded at the start when shorter), computed from a zero-mean,
unit-variance waveform. faster-whisper's numpy ``FeatureExtractor`` (already a
dependency for speech recognition) computes exactly that spectrogram.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

from avatalk.media.timebase import ENGINE_SAMPLE_RATE

logger = logging.getLogger(__name__)

WINDOW_S = 8
_WINDOW_SAMPLES = WINDOW_S * ENGINE_SAMPLE_RATE
_VARIANCE_EPS = 1e-7


class SmartTurnModel:
    """The shared classifier; ``complete_probability`` is blocking (run it on an executor)."""

    def __init__(self, model_path: Path) -> None:
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"smart-turn model not found at {model_path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._features = FeatureExtractor(feature_size=80, sampling_rate=ENGINE_SAMPLE_RATE, chunk_length=WINDOW_S)
        logger.info("loaded smart-turn model from %s", model_path)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """The (80, 800) log-mel input for the last 8 s of 16 kHz ``audio``."""
        window = np.asarray(audio, dtype=np.float32)[-_WINDOW_SAMPLES:]
        window = np.pad(window, (_WINDOW_SAMPLES - len(window), 0))
        window = (window - window.mean()) / np.sqrt(window.var() + _VARIANCE_EPS)
        return self._features(window.astype(np.float32), padding=0)[:, : _WINDOW_SAMPLES // 160]

    def complete_probability(self, audio: np.ndarray) -> float:
        """How sure the model is that the speaker has finished their turn (0..1)."""
        features = self.features(audio)[None].astype(np.float32)
        (output,) = self._session.run(None, {self._input: features})
        return float(np.asarray(output).reshape(-1)[0])
