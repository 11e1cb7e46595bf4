"""The embedded default TTS: a piper voice (VITS, ONNX) run in-process.

Synthesis runs on the ``tts`` executor. Piper phonemizes the whole text
first, then runs the voice model once per sentence it finds and yields that
sentence's audio as one chunk: "streaming" here means sentence by sentence
(the engine already sends one sentence at a time, so usually one chunk per
call), and a consumer that goes away stops synthesis before the next
sentence. The voice is loaded once and shared: onnxruntime sessions may be
run from several threads at once and piper guards its espeak phonemizer with
a lock of its own, so concurrent sessions need no extra locking here; the
``tts`` executor's size bounds how many synthesise at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from pathlib import Path
from typing import Self

import numpy as np

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.threads import iterate_in_thread
from avatalk.tts.base import TTS, TTSError

logger = logging.getLogger(__name__)


class PiperTTS(TTS):
    """A piper ``.onnx`` voice with its ``.onnx.json`` config beside it."""

    name = "piper"

    def __init__(self, model_path: Path, executor: ThreadPoolExecutor) -> None:
        """Load the voice, to synthesise on ``executor``; raises ``TTSError`` if the files are missing or invalid."""
        from piper import PiperVoice

        path = Path(model_path)
        config_path = Path(f"{path}.json")
        for required in (path, config_path):
            if not required.is_file():
                raise TTSError(
                    f"piper voice file {required} does not exist (set tts.piper.model_path to a piper .onnx voice)"
                )
        started = time.perf_counter()
        try:
            self._voice = PiperVoice.load(path, config_path=config_path)
        except Exception as error:  # onnxruntime and json raise many types
            raise TTSError(f"could not load piper voice {path}: {error}") from error
        self._executor = executor
        self._sample_rate = int(self._voice.config.sample_rate)
        logger.info(
            "loaded piper voice %s (%d Hz) in %.2f s", path.name, self._sample_rate, time.perf_counter() - started
        )

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The voice of ``tts.piper`` (the bundled en_US-joe-medium when unset), synthesising on ``executors.tts``."""
        return cls(settings.tts_model_path(), executors.tts)

    @property
    def sample_rate(self) -> int:
        """The voice's native rate (22050 Hz for the medium voices)."""
        return self._sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        """Speak ``text``, one chunk per sentence piper finds in it."""
        text = text.strip()
        if not text:
            return
        chunks = iterate_in_thread(self._executor, lambda stop: self._chunks(text), maxsize=4)
        try:
            async with aclosing(chunks):
                async for audio in chunks:
                    yield audio
        except Exception as error:
            raise TTSError(f"piper could not synthesise {text[:40]!r}: {error}") from error

    def _chunks(self, text: str) -> Iterator[np.ndarray]:
        """Blocking synthesis, run on the ``tts`` executor; advanced only while the consumer is there."""
        for chunk in self._voice.synthesize(text):
            yield np.asarray(chunk.audio_float_array, dtype=np.float32)
