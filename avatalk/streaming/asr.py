"""Streaming speech recognition with faster-whisper.

Whisper is not a streaming model, so "streaming" here means: re-transcribe the
growing utterance about every 0.5 s while the user speaks (partials), start a
transcription the moment the user pauses (so the final is usually ready when
the end-of-turn silence has elapsed), and reuse that result at the end of the
turn when no speech followed the pause.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np

from avatalk.config import ASRSettings

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_SENTENCE_END = re.compile(r"[.!?…]['\")\]]*\s*$")


def ends_sentence(text: str) -> bool:
    """True when a transcript looks like a finished sentence."""
    return bool(_SENTENCE_END.search(text.strip()))


class WhisperASR:
    """A faster-whisper model shared by every session (CTranslate2 calls are thread-safe)."""

    def __init__(self, model_path: Path, settings: ASRSettings) -> None:
        from faster_whisper import WhisperModel

        if not (Path(model_path) / "model.bin").is_file():
            raise FileNotFoundError(f"no faster-whisper model (model.bin) in {model_path}")
        self.settings = settings
        self.model = WhisperModel(
            str(model_path),
            device=settings.device,
            compute_type=settings.compute_type,
            cpu_threads=settings.cpu_threads,
            local_files_only=True,
        )
        # Serialise calls: on a small CPU two concurrent decodes are slower than two in a row.
        self._lock = threading.Lock()
        logger.info("loaded faster-whisper model from %s", model_path)

    def transcribe(self, audio: np.ndarray) -> str:
        """Transcribe 16 kHz float32 audio. Blocking: call from a worker thread."""
        if len(audio) < SAMPLE_RATE // 10:
            return ""
        waited = time.perf_counter()
        with self._lock:
            started = time.perf_counter()
            segments, _info = self.model.transcribe(
                audio.astype(np.float32, copy=False),
                language=self.settings.language or None,
                beam_size=self.settings.beam_size,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
                temperature=0.0,
            )
            text = " ".join(segment.text.strip() for segment in segments)
        logger.debug(
            "transcribed %.2f s of audio in %.0f ms (waited %.0f ms)",
            len(audio) / SAMPLE_RATE,
            (time.perf_counter() - started) * 1000,
            (started - waited) * 1000,
        )
        return text.strip()


class TurnTranscriber:
    """Per-session ASR scheduling for one user turn at a time."""

    def __init__(self, asr: WhisperASR) -> None:
        self.asr = asr
        self.interval_s = asr.settings.partial_interval_ms / 1000.0
        self._partial_task: asyncio.Task[str] | None = None
        self._early_task: asyncio.Task[str] | None = None
        self._early_samples = 0
        self._last_partial_samples = 0
        self.last_partial = ""

    def reset(self) -> None:
        """Forget the current turn (its tasks finish in the background and are ignored)."""
        for task in (self._partial_task, self._early_task):
            if task is not None and not task.done():
                task.cancel()
        self._partial_task = None
        self._early_task = None
        self._early_samples = 0
        self._last_partial_samples = 0
        self.last_partial = ""

    def partial_due(self, samples: int) -> bool:
        """A partial is due when ~interval of new audio arrived and none is running."""
        if self._partial_task is not None and not self._partial_task.done():
            return False
        return samples - self._last_partial_samples >= self.interval_s * SAMPLE_RATE

    async def partial(self, audio: np.ndarray) -> str:
        self._last_partial_samples = len(audio)
        self._partial_task = asyncio.create_task(asyncio.to_thread(self.asr.transcribe, audio))
        text = await self._partial_task
        self.last_partial = text
        return text

    def start_early(self, audio: np.ndarray) -> asyncio.Task[str]:
        """Transcribe the utterance as of the first silent window after speech."""
        if self._early_task is not None and not self._early_task.done():
            self._early_task.cancel()
        self._early_samples = len(audio)
        self._early_task = asyncio.create_task(asyncio.to_thread(self.asr.transcribe, audio))
        return self._early_task

    def invalidate_early(self) -> None:
        """The user spoke again after the pause: the early result no longer covers the turn."""
        self._early_samples = 0

    def take_early(self) -> asyncio.Task[str] | None:
        """Hand the pause transcription over to the turn's response, if it still covers the turn.

        The transcriber then forgets it, so a new utterance starting meanwhile
        (which resets the transcriber) cannot cancel the finished turn's final.
        """
        task = self._early_task if self._early_samples else None
        self._early_task = None
        self._early_samples = 0
        return task if task is not None and not task.cancelled() else None

    async def final(self, audio: np.ndarray, early: asyncio.Task[str] | None = None) -> str:
        """The final transcript: the early pass when only silence followed it, else a new pass."""
        if early is not None:
            return await early
        return await asyncio.to_thread(self.asr.transcribe, audio)
