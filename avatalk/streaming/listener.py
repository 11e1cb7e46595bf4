"""The listener stage: microphone audio in, typed turn messages out.

client PCM16 -> resample to 16 kHz -> VAD (``vad`` executor) -> turn detector
-> ASR partials while the user speaks, an early pass at each pause, the final
at the end of the turn (``asr`` executor); with the smart-turn model, its
verdict on each pause (``turn`` executor) tells the detector whether the user
has finished.

It knows nothing about replies: it reports what the user does
(``SpeechBegan``, ``PartialHeard``, ``BargeInSpeech``, ``PauseHeard``,
``SpeechResumed``, ``SpeechEnded``, ``UserTurn``) on its bounded ``messages`` queue, and the session decides what
that means for the conversation. Turn ids are the session's too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from avatalk.config import TurnSettings
from avatalk.executors import run_in
from avatalk.media.audio import StreamResampler, pcm16_to_float
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.asr import TurnTranscriber
from avatalk.streaming.stage import TaskSet
from avatalk.streaming.turns import TurnDetector, TurnEvent, TurnEventKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpeechBegan:
    """Voice detected: a new utterance starts."""

    at: float


@dataclass(frozen=True, slots=True)
class SpeechIgnoredBlip:
    """The utterance was too short to be a turn (a cough, a click)."""

    speech_ms: float


@dataclass(frozen=True, slots=True)
class PartialHeard:
    """A partial transcript of the utterance in progress."""

    text: str


@dataclass(frozen=True, slots=True)
class PauseHeard:
    """What the early pass heard at a pause: the final transcript, unless the user goes on (preemptive replies)."""

    text: str


@dataclass(frozen=True, slots=True)
class SpeechResumed:
    """The user spoke again after a pause: what ``PauseHeard`` said no longer covers the turn."""


@dataclass(frozen=True, slots=True)
class BargeInSpeech:
    """The utterance has lasted ``turns.barge_in_ms``: enough to interrupt a reply (sent once per utterance)."""

    speech_ms: float


@dataclass(frozen=True, slots=True)
class SpeechEnded:
    """End of the user's turn; its final transcript follows as a ``UserTurn``."""

    speech_end_at: float  # when the last voiced window arrived: the zero of the turn's latency marks


@dataclass(frozen=True, slots=True)
class UserTurn:
    """A finished turn and what was said (empty: noise that looked like speech)."""

    transcript: str
    speech_end_at: float
    transcribed_at: float
    error: str | None = None  # the recogniser failed; the transcript is empty


ListenerMessage = (
    SpeechBegan | SpeechIgnoredBlip | PartialHeard | PauseHeard | SpeechResumed | BargeInSpeech | SpeechEnded | UserTurn
)


class EndOfTurnModel(Protocol):
    """The semantic end-of-turn classifier (``SmartTurnModel``)."""

    def complete_probability(self, audio: np.ndarray) -> float: ...


class VoiceActivity(Protocol):
    """Per-session VAD state (``SileroVAD.stream()``)."""

    def process(self, samples: np.ndarray) -> list[tuple[np.ndarray, float]]: ...


class Listener:
    """Turns one client's microphone stream into turn messages."""

    def __init__(
        self,
        *,
        input_sample_rate: int,
        vad: VoiceActivity,
        vad_executor: Executor,
        transcriber: TurnTranscriber,
        turns: TurnSettings,
        detector: TurnDetector,
        queue_size: int,
        end_of_turn: EndOfTurnModel | None = None,
        turn_executor: Executor | None = None,
        name: str = "listener",
    ) -> None:
        self._resampler = StreamResampler(input_sample_rate, ENGINE_SAMPLE_RATE)
        self._vad = vad
        self._vad_executor = vad_executor
        self._transcriber = transcriber
        self._barge_in_ms = turns.barge_in_ms
        self._detector = detector
        self._end_of_turn = end_of_turn
        self._turn_executor = turn_executor
        self._complete_threshold = turns.semantic_threshold
        self._inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self.messages: asyncio.Queue[ListenerMessage] = asyncio.Queue(maxsize=queue_size)
        self._tasks = TaskSet(name)
        self._barge_in_sent = False
        self._last_final: asyncio.Task[None] | None = None

    @property
    def transcribing(self) -> bool:
        """A finished turn is still being transcribed."""
        return self._last_final is not None and not self._last_final.done()

    @property
    def user_holds_the_floor(self) -> bool:
        """The user is speaking now, for at least ``turns.barge_in_ms`` (enough to interrupt a reply)."""
        return self._detector.in_speech and self._barge_in_sent

    async def push(self, pcm16: bytes) -> None:
        """Queue one frame of client audio (waits while the stage is behind: the queue is bounded)."""
        await self._inbox.put(pcm16)

    async def commit(self) -> None:
        """End the user's turn now (push-to-talk)."""
        event = self._detector.force_end(time.monotonic())
        if event is not None:
            await self._on_turn_event(event)

    async def run(self) -> None:
        """Process queued audio until cancelled."""
        while True:
            data = await self._inbox.get()
            arrived = time.monotonic()
            samples = self._resampler.process(pcm16_to_float(data))
            if len(samples) == 0:
                continue
            windows = await run_in(self._vad_executor, self._vad.process, samples)
            for window, probability in windows:
                for event in self._detector.push(window, probability, arrived):
                    await self._on_turn_event(event)
                if self._detector.in_speech:
                    await self._while_speaking()
                if self._detector.verdict_due:
                    pause = self._detector.request_verdict()
                    self._tasks.spawn(self._verdict(pause, self._detector.utterance()), "end-of-turn")

    async def close(self) -> None:
        self._transcriber.reset()
        await self._tasks.close()

    async def _while_speaking(self) -> None:
        if not self._barge_in_sent and self._detector.speech_ms >= self._barge_in_ms:
            self._barge_in_sent = True
            await self.messages.put(BargeInSpeech(self._detector.speech_ms))
        # No partials during a pause: the pause's own early pass must get the recogniser at once.
        if self._detector.silence_ms == 0 and self._transcriber.partial_due(self._detector.utterance_samples):
            self._tasks.spawn(self._partial(self._detector.utterance()), "asr-partial")

    async def _partial(self, audio: np.ndarray) -> None:
        text = await self._transcriber.partial(audio)
        if text and self._detector.in_speech:
            self._detector.note_transcript(text)
            await self.messages.put(PartialHeard(text))

    async def _early(self, task: asyncio.Task[str]) -> None:
        """The pause transcription may say the sentence is finished (the turn then ends sooner) and lets a reply start."""
        text = await task
        if text and self._detector.paused:
            self._detector.note_transcript(text)
            await self.messages.put(PauseHeard(text))

    async def _verdict(self, pause: int, audio: np.ndarray) -> None:
        """Ask the end-of-turn model about this pause; its answer may end the turn at once."""
        assert self._end_of_turn is not None and self._turn_executor is not None
        complete: bool | None
        try:
            probability = await run_in(self._turn_executor, self._end_of_turn.complete_probability, audio)
            complete = probability >= self._complete_threshold
            logger.debug("end-of-turn model: %.2f complete", probability)
        except Exception:  # the silence rules take over for this pause
            logger.exception("the end-of-turn model failed")
            complete = None
        event = self._detector.note_verdict(pause, complete, time.monotonic())
        if event is not None:
            await self._on_turn_event(event)

    async def _on_turn_event(self, event: TurnEvent) -> None:
        if event.kind is TurnEventKind.SPEECH_STARTED:
            self._transcriber.reset()
            self._barge_in_sent = False
            await self.messages.put(SpeechBegan(event.at))
        elif event.kind is TurnEventKind.SPEECH_PAUSED:
            task = self._transcriber.start_early(self._detector.utterance())
            self._tasks.spawn(self._early(task), "asr-early")
        elif event.kind is TurnEventKind.SPEECH_RESUMED:
            self._transcriber.invalidate_early()
            await self.messages.put(SpeechResumed())
        elif event.kind is TurnEventKind.BLIP:
            logger.debug("ignored a %.0f ms blip", event.speech_ms)
            self._transcriber.reset()
            await self.messages.put(SpeechIgnoredBlip(event.speech_ms))
        elif event.kind is TurnEventKind.TURN_ENDED:
            assert event.audio is not None
            speech_end_at = event.speech_end_at or event.at
            await self.messages.put(SpeechEnded(speech_end_at))
            early = self._transcriber.take_early()
            self._transcriber.reset()
            self._last_final = self._tasks.spawn(
                self._final(event.audio, early, speech_end_at, self._last_final), "asr-final"
            )

    async def _final(
        self,
        audio: np.ndarray,
        early: asyncio.Task[str] | None,
        speech_end_at: float,
        previous: asyncio.Task[None] | None,
    ) -> None:
        """Transcribe a finished turn; turns are reported in the order they were spoken."""
        error: str | None = None
        try:
            text = await self._transcriber.final(audio, early)
        except Exception as failure:  # one turn's recogniser failure never ends the session
            logger.exception("the final transcription failed")
            text, error = "", f"the speech could not be transcribed: {failure}"
        if previous is not None:
            await asyncio.wait({previous})
        await self.messages.put(UserTurn(text, speech_end_at, time.monotonic(), error))
