"""Test doubles for the engine's stages (no models, no server), and a harness to collect what a stage emits.

Every class here is a fake, named as such: they stand in for silero, Whisper,
the LLM, the TTS and the renderer so a stage can be driven with typed input
and its output checked, like Pipecat's ``run_test`` does for a processor.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from avatalk.avatars.renderers.base import RendererSession
from avatalk.config import ASRSettings, Settings
from avatalk.executors import Executors
from avatalk.llm.base import LLM, ChatMessage
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.events import ServerEvent
from avatalk.streaming.vad import WINDOW_SAMPLES
from avatalk.tts.base import TTS

LOUD = 0.3  # amplitude the fake VAD calls speech


class FakeVADStream:
    """Speech probability from loudness: 0.9 for a loud 32 ms window, 0.0 otherwise."""

    def __init__(self) -> None:
        self._pending = np.zeros(0, np.float32)

    def process(self, samples: np.ndarray) -> list[tuple[np.ndarray, float]]:
        self._pending = np.concatenate([self._pending, samples])
        out = []
        while len(self._pending) >= WINDOW_SAMPLES:
            window, self._pending = self._pending[:WINDOW_SAMPLES], self._pending[WINDOW_SAMPLES:]
            out.append((window, 0.9 if float(np.abs(window).mean()) > LOUD / 2 else 0.0))
        return out


class FakeVAD:
    def stream(self) -> FakeVADStream:
        return FakeVADStream()


class FakeASR:
    """Hears ``text`` in any audio of at least 0.1 s; counts its calls."""

    def __init__(self, text: str = "What is two plus two?", delay_s: float = 0.0) -> None:
        self.text = text
        self.delay_s = delay_s
        self.settings = ASRSettings()
        self.calls = 0

    def transcribe(self, audio: np.ndarray) -> str:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.text if len(audio) >= ENGINE_SAMPLE_RATE // 10 else ""


class FakeEndOfTurn:
    """Calls an utterance complete when it is at least ``complete_after_s`` long; counts its calls."""

    def __init__(self, complete_after_s: float = 0.0) -> None:
        self.complete_after_s = complete_after_s
        self.calls = 0

    def complete_probability(self, audio: np.ndarray) -> float:
        self.calls += 1
        return 0.9 if len(audio) >= self.complete_after_s * ENGINE_SAMPLE_RATE else 0.1


class FakeLLM(LLM):
    """Streams ``reply`` word by word; ``hold_s`` keeps a worker thread busy first, like a model prefilling.

    The model is shared: replies take turns through an asyncio lock, so
    waiting sessions wait in asyncio, as the real backends must.
    """

    name = "fake"

    def __init__(self, reply: str = "One two three four. Five six seven eight.", hold_s: float = 0.0,
                 executor: object | None = None) -> None:
        self.reply = reply
        self.hold_s = hold_s
        self.executor = executor
        self.calls: list[list[ChatMessage]] = []
        self.prefills: list[list[ChatMessage]] = []  # prefill calls; ``prefill_s`` each, counted when done
        self.prefill_s = 0.0
        self.prefills_done = 0
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> FakeLLM:
        return cls(executor=executors.llm)

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        self.calls.append(messages)
        async with self._lock:
            if self.hold_s:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self.executor, time.sleep, self.hold_s)  # type: ignore[arg-type]
            for word in self.reply.split(" "):
                yield word + " "

    async def prefill(self, messages: list[ChatMessage], session_key: str) -> None:
        self.prefills.append(messages)
        await asyncio.sleep(self.prefill_s)
        self.prefills_done += 1

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class FakeTTS(TTS):
    """``seconds_per_word`` of a 200 Hz tone per word, at 16 kHz, in one chunk."""

    name = "fake"

    def __init__(self, seconds_per_word: float = 0.2) -> None:
        self.seconds_per_word = seconds_per_word

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> FakeTTS:
        return cls()

    @property
    def sample_rate(self) -> int:
        return ENGINE_SAMPLE_RATE

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        samples = int(len(text.split()) * self.seconds_per_word * ENGINE_SAMPLE_RATE)
        yield (0.3 * np.sin(np.arange(samples) * 2 * np.pi * 200 / ENGINE_SAMPLE_RATE)).astype(np.float32)


class FakeRendererSession(RendererSession):
    """Idle frames are grey, speaking frames white; ``render_s`` makes each speaking frame that slow."""

    def __init__(self, render_s: float = 0.0) -> None:
        self.render_s = render_s
        self.idle = np.full((8, 8, 3), 128, np.uint8)
        self.speaking = np.full((8, 8, 3), 255, np.uint8)
        self.renders = 0
        self.resets = 0
        self._busy = threading.Lock()

    @property
    def output_shape(self) -> tuple[int, int]:
        return (8, 8)

    def idle_frame(self, tick: int) -> np.ndarray:
        return self.idle

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        assert self._busy.acquire(blocking=False), "render called from two threads at once"
        try:
            time.sleep(self.render_s)
            self.renders += 1
            return self.speaking
        finally:
            self._busy.release()

    def reset(self) -> None:
        self.resets += 1


class FakeRenderer:
    name = "fake"

    def __init__(self, render_s: float = 0.0) -> None:
        self.render_s = render_s

    def open(self, avatar: object, output_size: int) -> FakeRendererSession:
        return FakeRendererSession(self.render_s)


class FakeAvatarStore:
    def load(self, avatar_id: str) -> str:
        return avatar_id


@dataclass
class FakeModels:
    """Stands in for ``EngineModels``."""

    llm: LLM = field(default_factory=FakeLLM)
    tts: TTS = field(default_factory=FakeTTS)
    asr: FakeASR = field(default_factory=FakeASR)
    vad: FakeVAD = field(default_factory=FakeVAD)
    renderer: FakeRenderer | None = None
    turn: FakeEndOfTurn | None = None
    executors: Executors = field(default_factory=lambda: Executors.create(Settings().executors))


class Collector:
    """A session output (or a stage's ``emit``) that keeps every event and tick it is given."""

    def __init__(self) -> None:
        self.events: list[ServerEvent] = []
        self.ticks: list[tuple[int, np.ndarray | None, np.ndarray | None]] = []
        self.tick_times: list[float] = []

    async def send_event(self, event: ServerEvent) -> None:
        self.events.append(event)

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        self.ticks.append((tick, audio, frame))
        self.tick_times.append(time.monotonic())

    def of_type(self, kind: type) -> list:
        return [event for event in self.events if isinstance(event, kind)]

    async def wait_for(self, kind: type, timeout: float = 10.0) -> ServerEvent:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of_type(kind)
            if found:
                return found[0]
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {kind.__name__} within {timeout} s; got {[type(e).__name__ for e in self.events]}")


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def tone(seconds: float, amplitude: float = LOUD, rate: int = ENGINE_SAMPLE_RATE) -> np.ndarray:
    return (amplitude * np.sin(np.arange(int(seconds * rate)) * 2 * np.pi * 220 / rate)).astype(np.float32)


def silence(seconds: float, rate: int = ENGINE_SAMPLE_RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


async def drain(queue: asyncio.Queue, settle_s: float = 0.3) -> list:
    """Everything a stage puts on ``queue`` until it has been quiet for ``settle_s``."""
    items = []
    while True:
        try:
            items.append(await asyncio.wait_for(queue.get(), settle_s))
        except TimeoutError:
            return items
