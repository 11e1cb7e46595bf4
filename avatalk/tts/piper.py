"""The embedded default TTS: a piper voice (VITS, ONNX) run in-process.

Piper synthesises about thirty times faster than real time on two CPU cores,
so a short sentence is ready in a few tens of milliseconds. The voice is
loaded once and shared: onnxruntime sessions may be run from several threads
at once and piper guards its phonemizer with its own lock, so concurrent
sessions need no extra locking here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np

from avatalk.threads import iterate_in_thread
from avatalk.tts.base import TTS, TTSError

logger = logging.getLogger(__name__)


class PiperTTS(TTS):
    """A piper ``.onnx`` voice with its ``.onnx.json`` config beside it."""

    name = "piper"

    def __init__(self, model_path: Path) -> None:
        """Load the voice; raises ``TTSError`` if the files are missing or invalid."""
        from piper import PiperVoice

        path = Path(model_path)
        config_path = Path(f"{path}.json")
        for required in (path, config_path):
            if not required.is_file():
                raise TTSError(
                    f"piper voice file {required} does not exist (set tts.model_path to a piper .onnx voice)"
                )
        started = time.perf_counter()
        try:
            self._voice = PiperVoice.load(path, config_path=config_path)
        except Exception as error:  # onnxruntime and json raise many types
            raise TTSError(f"could not load piper voice {path}: {error}") from error
        self._sample_rate = int(self._voice.config.sample_rate)
        logger.info(
            "loaded piper voice %s (%d Hz) in %.2f s", path.name, self._sample_rate, time.perf_counter() - started
        )

    @property
    def sample_rate(self) -> int:
        """The voice's native rate (22050 Hz for the medium voices)."""
        return self._sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        """Speak ``text``, one chunk per sentence piper finds in it."""
        text = text.strip()
        if not text:
            return
        try:
            async for audio in iterate_in_thread(lambda stop: self._chunks(text, stop), maxsize=4):
                yield audio
        except Exception as error:
            raise TTSError(f"piper could not synthesise {text[:40]!r}: {error}") from error

    def _chunks(self, text: str, stop: threading.Event) -> Iterator[np.ndarray]:
        """Blocking synthesis loop run in a worker thread."""
        for chunk in self._voice.synthesize(text):
            if stop.is_set():
                return
            yield np.asarray(chunk.audio_float_array, dtype=np.float32)
