"""Turn-taking: when the user starts, pauses and ends a turn.

The detector is pure logic over 32 ms VAD windows, so it is cheap and
deterministic to test. It owns all of its inputs: VAD windows through
``push``, what the recogniser heard through ``note_transcript`` and, in
semantic mode, the smart-turn model's verdict on a pause through
``note_verdict``.

End-of-turn silence:
- semantic mode (the smart-turn model is loaded): after
  ``semantic_silence_ms`` of silence the caller asks the model once per pause
  (``verdict_due`` / ``request_verdict``); "complete" ends the turn at once,
  "incomplete" waits up to ``semantic_max_silence_ms`` for more speech
  (``end_silence_ms`` when the latest transcript ends a sentence: the model
  and the words disagree, and a finished question should not wait 1.5 s); a
  failed verdict falls back to the silence rules below;
- silence rules: ``end_silence_ms``, or ``sentence_end_silence_ms`` when the
  latest transcript ends a sentence. Durations are counted in audio time (windows), not wall
time; the caller passes the wall-clock time of each window so that latency
marks refer to when the audio actually arrived.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np

from avatalk.config import TurnSettings, VADSettings
from avatalk.streaming.asr import ends_sentence

WINDOW_MS = 32.0

Verdict = Literal["unasked", "pending", "complete", "incomplete", "failed"]


class TurnEventKind(str, Enum):
    SPEECH_STARTED = "speech_started"
    SPEECH_PAUSED = "speech_paused"  # first silent window after speech: a chance to transcribe early
    SPEECH_RESUMED = "speech_resumed"
    TURN_ENDED = "turn_ended"
    BLIP = "blip"  # speech too short to be a turn; dropped


@dataclass(slots=True)
class TurnEvent:
    kind: TurnEventKind
    at: float  # monotonic time of the window that caused it
    speech_ms: float = 0.0  # voiced length of the utterance so far
    audio: np.ndarray | None = None  # the whole utterance (pre-roll included) on TURN_ENDED
    speech_end_at: float | None = None  # wall time the last voiced window arrived (TURN_ENDED)


class TurnDetector:
    """Endpointing with hysteresis, pre-roll and a sentence-aware silence."""

    def __init__(self, turns: TurnSettings, vad: VADSettings, semantic: bool = False) -> None:
        self.turns = turns
        self.vad = vad
        self.semantic = semantic
        self._pause_id = 0
        self._preroll: deque[np.ndarray] = deque(maxlen=max(1, round(vad.preroll_ms / WINDOW_MS)))
        self._reset_utterance()

    def _reset_utterance(self) -> None:
        self.in_speech = False
        self._windows: list[np.ndarray] = []
        self._voiced_windows = 0
        self._silent_run = 0
        self._last_voiced_at = 0.0
        self._paused = False
        self._sentence_complete = False
        self._verdict: Verdict = "unasked"  # the model's word on the current pause

    @property
    def speech_ms(self) -> float:
        """Voiced length of the current utterance."""
        return self._voiced_windows * WINDOW_MS

    @property
    def paused(self) -> bool:
        """In an utterance, in silence since the last voiced window."""
        return self.in_speech and self._paused

    @property
    def utterance_samples(self) -> int:
        return sum(len(window) for window in self._windows)

    @property
    def silence_ms(self) -> float:
        return self._silent_run * WINDOW_MS

    def utterance(self) -> np.ndarray:
        """The audio of the current utterance so far (pre-roll included)."""
        if not self._windows:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._windows)

    def note_transcript(self, text: str) -> None:
        """What the recogniser heard of the current utterance: a finished sentence shortens the end silence."""
        if self.in_speech and text:
            self._sentence_complete = ends_sentence(text)

    @property
    def verdict_due(self) -> bool:
        """Semantic mode: this pause has lasted ``semantic_silence_ms`` and the model has not been asked yet."""
        return (
            self.semantic
            and self._paused
            and self._verdict == "unasked"
            and self.silence_ms >= self.turns.semantic_silence_ms
        )

    def request_verdict(self) -> int:
        """Mark the model as asked about this pause; returns the pause's id for ``note_verdict``."""
        self._verdict = "pending"
        return self._pause_id

    def note_verdict(self, pause_id: int, complete: bool | None, now: float) -> TurnEvent | None:
        """The model's verdict on pause ``pause_id`` (None: it failed); returns TURN_ENDED if that ends the turn now.

        A verdict on an earlier pause (the user spoke again meanwhile) is ignored.
        """
        if not self._paused or pause_id != self._pause_id:
            return None
        self._verdict = "failed" if complete is None else "complete" if complete else "incomplete"
        if self.silence_ms >= self._end_silence_ms():
            return self._finish(now)
        return None

    def _end_silence_ms(self) -> float:
        if self.semantic and self._verdict != "failed":
            if self._verdict == "complete":
                return self.turns.semantic_silence_ms
            if self._verdict == "incomplete" and self._sentence_complete:
                # The model doubts but the words end a sentence ("Can you recommend a good book?"):
                # the plain silence rule, not the long wait for a trailing thought.
                return min(self.turns.end_silence_ms, self.turns.semantic_max_silence_ms)
            return self.turns.semantic_max_silence_ms  # incomplete, or the verdict is still to come
        if self._sentence_complete:
            return min(self.turns.sentence_end_silence_ms, self.turns.end_silence_ms)
        return self.turns.end_silence_ms

    def push(self, window: np.ndarray, probability: float, now: float) -> list[TurnEvent]:
        """Feed one 32 ms window and its speech probability."""
        events: list[TurnEvent] = []
        if not self.in_speech:
            if probability >= self.vad.threshold:
                self.in_speech = True
                self._windows = list(self._preroll)
                self._preroll.clear()
                self._windows.append(window)
                self._voiced_windows = 1
                self._last_voiced_at = now
                events.append(TurnEvent(TurnEventKind.SPEECH_STARTED, now, self.speech_ms))
            else:
                self._preroll.append(window)
            return events

        self._windows.append(window)
        voiced = probability >= self.vad.negative_threshold if self._silent_run == 0 else probability >= self.vad.threshold
        if voiced:
            if self._paused:
                self._paused = False
                self._sentence_complete = False
                events.append(TurnEvent(TurnEventKind.SPEECH_RESUMED, now, self.speech_ms))
            self._voiced_windows += 1
            self._silent_run = 0
            self._last_voiced_at = now
        else:
            self._silent_run += 1
            if not self._paused:
                self._paused = True
                self._pause_id += 1
                self._verdict = "unasked"
                events.append(TurnEvent(TurnEventKind.SPEECH_PAUSED, now, self.speech_ms))

        utterance_s = len(self._windows) * WINDOW_MS / 1000.0
        if self._paused and self.silence_ms >= self._end_silence_ms():
            events.append(self._finish(now))
        elif utterance_s >= self.turns.max_turn_s:
            events.append(self._finish(now))
        return events

    def force_end(self, now: float) -> TurnEvent | None:
        """End the turn now (push-to-talk commit); None when nobody is speaking."""
        if not self.in_speech:
            return None
        return self._finish(now)

    def _finish(self, now: float) -> TurnEvent:
        speech_ms = self.speech_ms
        if speech_ms < self.turns.min_speech_ms:
            event = TurnEvent(TurnEventKind.BLIP, now, speech_ms)
        else:
            event = TurnEvent(
                TurnEventKind.TURN_ENDED,
                now,
                speech_ms,
                audio=self.utterance(),
                speech_end_at=self._last_voiced_at,
            )
        self._reset_utterance()
        return event

    def reset(self) -> None:
        self._preroll.clear()
        self._reset_utterance()
