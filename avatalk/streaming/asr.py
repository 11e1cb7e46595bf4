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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from avatalk.config import ASRSettings
from avatalk.executors import run_in
from avatalk.media.timebase import ENGINE_SAMPLE_RATE as SAMPLE_RATE

logger = logging.getLogger(__name__)

FULL_WINDOW_FRAMES = 3000  # Whisper's 30 s window in 10 ms feature frames
MAX_SHORT_SAMPLES = 28 * SAMPLE_RATE  # longer audio (with its padding) needs the full window
SHORT_CONTEXT_PAD_S = 2.0  # trailing silence lets the decoder see that speech has ended
MAX_TOKENS_PER_SECOND = 8  # fast speech is ~4 tokens/s; the bound stops runaway repetition
_SENTENCE_END = re.compile(r"[.!?…]['\")\]]*\s*$")


def ends_sentence(text: str) -> bool:
    """True when a transcript looks like a finished sentence."""
    return bool(_SENTENCE_END.search(text.strip()))


class WhisperASR:
    """A faster-whisper model shared by every session.

    CTranslate2 calls are thread-safe; how many run at once is the size of the
    ``asr`` executor they are submitted to (one by default: on a small CPU two
    concurrent decodes are slower than two in a row).
    """

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
        logger.info("loaded faster-whisper model from %s", model_path)

    def transcribe(self, audio: np.ndarray) -> str:
        """Transcribe 16 kHz float32 audio. Blocking: run it on the ``asr`` executor."""
        if len(audio) < SAMPLE_RATE // 10:
            return ""
        audio = audio.astype(np.float32, copy=False)
        started = time.perf_counter()
        if self.settings.short_context and self.settings.language and len(audio) < MAX_SHORT_SAMPLES:
            text = self._transcribe_short(audio)
        else:
            segments, _info = self.model.transcribe(
                audio,
                language=self.settings.language or None,
                beam_size=self.settings.beam_size,
                condition_on_previous_text=False,
                without_timestamps=True,
                vad_filter=False,
                temperature=0.0,
            )
            text = " ".join(segment.text.strip() for segment in segments)
        logger.debug(
            "transcribed %.2f s of audio in %.0f ms", len(audio) / SAMPLE_RATE, (time.perf_counter() - started) * 1000
        )
        return text.strip()

    def _transcribe_short(self, audio: np.ndarray) -> str:
        """Encode only the utterance (plus trailing silence), not a 30 s window.

        faster-whisper always pads the encoder input to 30 s, which makes a
        one-second question cost as much as thirty seconds of speech. The
        CTranslate2 encoder accepts shorter input (like whisper.cpp's
        ``audio_ctx``); trained on 30 s windows, the decoder then tends to
        repeat itself instead of ending, so the output is bounded by the audio
        length and cut where it starts to loop.
        """
        from faster_whisper.tokenizer import Tokenizer

        padded = np.concatenate([audio, np.zeros(int(SHORT_CONTEXT_PAD_S * SAMPLE_RATE), dtype=np.float32)])
        features = self.model.feature_extractor(padded)[:, :FULL_WINDOW_FRAMES]
        tokenizer = Tokenizer(
            self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe", language=self.settings.language
        )
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        max_length = len(prompt) + int(len(audio) / SAMPLE_RATE * MAX_TOKENS_PER_SECOND) + 8
        result = self.model.model.generate(
            self.model.encode(features), [prompt], beam_size=self.settings.beam_size, max_length=max_length,
            suppress_blank=True,
        )
        tokens = [token for token in result[0].sequences_ids[0] if token < tokenizer.eot]
        return tokenizer.decode(cut_repetition(tokens))


def same_words(first: str, second: str) -> bool:
    """Whether two transcripts say the same words, ignoring case and punctuation."""
    return _words(first) == _words(second)


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def cut_repetition(tokens: list[int], min_period: int = 3) -> list[int]:
    """Drop a tail that restarts the text from its beginning ("Hi there. Hi there. Hi")."""
    for period in range(min_period, len(tokens) - 1):
        overlap = min(period, len(tokens) - period)
        if overlap >= 2 and tokens[period : period + overlap] == tokens[:overlap]:
            return tokens[:period]
    return tokens


class TurnTranscriber:
    """Per-session ASR scheduling for one user turn at a time, on the shared ``asr`` executor."""

    def __init__(self, asr: WhisperASR, executor: ThreadPoolExecutor) -> None:
        self.asr = asr
        self._executor = executor
        self.interval_s = asr.settings.partial_interval_ms / 1000.0
        self._partial_task: asyncio.Task[str] | None = None
        self._early_task: asyncio.Task[str] | None = None
        self._early_valid = False
        self._last_partial_samples = 0

    def reset(self) -> None:
        """Forget the current turn (its tasks finish in the background and are ignored)."""
        for task in (self._partial_task, self._early_task):
            if task is not None and not task.done():
                task.cancel()
        self._partial_task = None
        self._early_task = None
        self._early_valid = False
        self._last_partial_samples = 0

    def partial_due(self, samples: int) -> bool:
        """A partial is due when ~interval of new audio arrived and none is running."""
        if self._partial_task is not None and not self._partial_task.done():
            return False
        return samples - self._last_partial_samples >= self.interval_s * SAMPLE_RATE

    async def partial(self, audio: np.ndarray) -> str:
        self._last_partial_samples = len(audio)
        self._partial_task = asyncio.create_task(self._transcribe(audio))
        text = await self._partial_task
        return text

    def start_early(self, audio: np.ndarray) -> asyncio.Task[str]:
        """Transcribe the utterance as of the first silent window after speech."""
        if self._early_task is not None and not self._early_task.done():
            self._early_task.cancel()
        self._early_valid = True
        self._early_task = asyncio.create_task(self._transcribe(audio))
        return self._early_task

    def invalidate_early(self) -> None:
        """The user spoke again after the pause: the early result no longer covers the turn."""
        self._early_valid = False

    def take_early(self) -> asyncio.Task[str] | None:
        """Hand the pause transcription over to the turn's response, if it still covers the turn.

        The transcriber then forgets it, so a new utterance starting meanwhile
        (which resets the transcriber) cannot cancel the finished turn's final.
        """
        task = self._early_task if self._early_valid else None
        self._early_task = None
        self._early_valid = False
        return task if task is not None and not task.cancelled() else None

    async def final(self, audio: np.ndarray, early: asyncio.Task[str] | None = None) -> str:
        """The final transcript: the early pass when only silence followed it, else a new pass."""
        if early is not None:
            return await early
        return await self._transcribe(audio)

    async def _transcribe(self, audio: np.ndarray) -> str:
        return await run_in(self._executor, self.asr.transcribe, audio)
