"""Voice activity detection with the silero VAD ONNX model.

One ``SileroVAD`` (an onnxruntime session) is loaded per server and shared:
``InferenceSession.run`` is thread-safe. Each conversation owns a ``VADStream``
holding the recurrent state and the 64-sample context the model expects in
front of every 512-sample (32 ms) window at 16 kHz.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from avatalk.media.timebase import ENGINE_SAMPLE_RATE as SAMPLE_RATE

logger = logging.getLogger(__name__)

WINDOW_SAMPLES = 512  # 32 ms at 16 kHz
CONTEXT_SAMPLES = 64


class SileroVAD:
    """The shared silero model."""

    def __init__(self, model_path: Path) -> None:
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"silero VAD model not found at {model_path}")
        options = ort.SessionOptions()
        # Each call is a few microseconds of work; more threads only add overhead.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
        logger.info("loaded silero VAD from %s", model_path)

    def stream(self) -> VADStream:
        return VADStream(self)


class VADStream:
    """Per-conversation VAD state: feed 16 kHz audio, get one probability per 32 ms window."""

    def __init__(self, model: SileroVAD) -> None:
        self._model = model
        self._pending = np.zeros(0, dtype=np.float32)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)

    def process(self, samples: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """Return ``(window, speech_probability)`` for every complete window now available.

        Blocking (runs the model): call it from a worker thread.
        """
        self._pending = np.concatenate([self._pending, samples.astype(np.float32, copy=False)])
        results: list[tuple[np.ndarray, float]] = []
        sr = np.array(SAMPLE_RATE, dtype=np.int64)
        while len(self._pending) >= WINDOW_SAMPLES:
            window = self._pending[:WINDOW_SAMPLES]
            self._pending = self._pending[WINDOW_SAMPLES:]
            model_input = np.concatenate([self._context, window])[None, :]
            output, self._state = self._model.session.run(
                None, {"input": model_input, "state": self._state, "sr": sr}
            )
            self._context = window[-CONTEXT_SAMPLES:]
            results.append((window, float(output[0, 0])))
        return results
