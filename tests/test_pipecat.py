"""The Pipecat processor in real Pipecat pipelines, against a live avatalk server.

    RecorderForTest(upstream) -> ToneTTSForTest -> AvatalkVideoService -> RecorderForTest(downstream)

The TTS is a real Pipecat ``TTSService`` whose synthesis is a test double (a
220 Hz tone, 0.2 s per word, produced much faster than real time); the sink
records every frame that reaches the end of the pipeline, in order. Pipecat
itself (pipeline, worker, runner, frames, interruptions) is the real thing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import av
import numpy as np
import pytest
from fakes import free_port

pipecat = pytest.importorskip("pipecat", reason="the Pipecat integration needs avatalk[pipecat]")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.settings import TTSSettings  # noqa: E402
from pipecat.services.tts_service import TTSService  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from avatalk.integrations.pipecat import AvatalkVideoService  # noqa: E402

pytestmark = pytest.mark.slow

RATE = 24000
TICK_BYTES = RATE // 25 * 2  # one 40 ms tick of PCM16 at 24 kHz
SECONDS_PER_WORD = 0.2


def tone(seconds: float, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class ToneTTSForTest(TTSService):
    """A Pipecat TTS service whose voice is a tone: 0.2 s per word ("blip": 0.08 s), in 20 ms chunks, as fast as it can."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            settings=TTSSettings(model=None, voice=None, language=None),
            **kwargs,
        )
        self.spoken: list[str] = []

    def can_generate_metrics(self) -> bool:
        return False

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        self.spoken.append(text)
        seconds = sum(0.08 if word == "blip" else SECONDS_PER_WORD for word in text.split())
        pcm = (tone(seconds) * 32767).astype(np.int16).tobytes()

        async def chunks() -> AsyncIterator[bytes]:
            step = RATE // 50 * 2
            for start in range(0, len(pcm), step):
                yield pcm[start : start + step]

        async for frame in self._stream_audio_frames_from_iterator(chunks(), in_sample_rate=RATE, context_id=context_id):
            yield frame


class RecorderForTest(FrameProcessor):
    """Passes every frame on and records, in order, those going one way.

    At the end of the pipeline (the output transport's place) it records what
    flows downstream; at the start, what comes back upstream (errors).
    """

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__()
        self._direction = direction
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is self._direction:
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def of(self, kind: type) -> list:
        return [frame for frame in self.frames if isinstance(frame, kind)]

    def index(self, predicate: Callable[[Frame], bool], start: int = 0) -> int:
        return next(i for i in range(start, len(self.frames)) if predicate(self.frames[i]))


class PipelineForTest:
    """A running Pipecat pipeline around ``avatar``, driven like a bot's: frames queued at its start."""

    def __init__(self, avatar: AvatalkVideoService) -> None:
        self.recorder = RecorderForTest(FrameDirection.UPSTREAM)
        self.tts = ToneTTSForTest()
        self.avatar = avatar
        self.sink = RecorderForTest(FrameDirection.DOWNSTREAM)
        self.worker = PipelineWorker(
            Pipeline([self.recorder, self.tts, avatar, self.sink]),
            params=PipelineParams(audio_out_sample_rate=RATE),
            cancel_on_idle_timeout=False,
        )
        self.runner = WorkerRunner(handle_sigint=False)
        self.started = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

        @self.worker.event_handler("on_pipeline_started")
        async def _started(_worker: object, _frame: Frame) -> None:
            self.started.set()

    async def __aenter__(self) -> PipelineForTest:
        await self.runner.add_workers(self.worker)
        self.task = asyncio.create_task(self.runner.run())
        await asyncio.wait_for(self.started.wait(), 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        if not self.task.done():
            await self.worker.queue_frame(EndFrame())
            try:
                await asyncio.wait_for(asyncio.shield(self.task), 30)
            except TimeoutError:
                await self.worker.cancel()
                await asyncio.wait_for(self.task, 10)

    async def say(self, words: int) -> None:
        await self.worker.queue_frame(TTSSpeakFrame(" ".join(["word"] * words)))

    async def until(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                kinds = sorted({type(frame).__name__ for frame in self.sink.frames})
                raise TimeoutError(f"not met; the sink got {len(self.sink.frames)} frames of kinds {kinds}")
            await asyncio.sleep(0.02)


def ticks(frames: list[Frame]) -> list[TTSAudioRawFrame]:
    return [frame for frame in frames if isinstance(frame, TTSAudioRawFrame)]


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(limits={"render_buffer_s": 2.0})


async def test_tts_audio_comes_back_as_ticks_each_after_its_frame_and_idle_frames_flow(server) -> None:
    avatar = AvatalkVideoService(url=server.ws_url, video_size=128)
    async with PipelineForTest(avatar) as bot:
        assert avatar.connected and avatar.session_id
        await bot.until(lambda: len(bot.sink.of(OutputImageRawFrame)) >= 5)  # idle frames before anyone speaks
        assert not ticks(bot.sink.frames)
        await bot.say(5)  # 1.0 s of tone: exactly 25 ticks
        await bot.until(lambda: bool(bot.sink.of(TTSStoppedFrame)))
        await bot.until(lambda: len(bot.sink.frames) > bot.sink.index(lambda f: isinstance(f, TTSStoppedFrame)) + 10)
    frames = bot.sink.frames
    audio = ticks(frames)
    assert len(audio) == 25 and all(len(tick.audio) == TICK_BYTES and tick.sample_rate == RATE for tick in audio)
    received = np.concatenate([np.frombuffer(tick.audio, np.int16) for tick in audio]).astype(np.float32) / 32767
    np.testing.assert_allclose(received, tone(1.0), atol=0.02)  # the TTS audio itself, re-cut into ticks
    started = bot.sink.of(TTSStartedFrame)[0]
    assert {tick.context_id for tick in audio} == {started.context_id}
    # Every tick's picture comes just before its audio, marked to be shown when the audio before it has played.
    for i, frame in enumerate(frames):
        if isinstance(frame, TTSAudioRawFrame):
            assert isinstance(frames[i - 1], OutputImageRawFrame) and frames[i - 1].sync_with_audio
    first, last = frames.index(audio[0]), frames.index(audio[-1])
    pictures = bot.sink.of(OutputImageRawFrame)
    assert pictures[0].size == (128, 128) or max(pictures[0].size) == 128
    assert frames.index(started) < first  # the TTS's own control frames keep their place around the audio
    assert bot.sink.index(lambda f: isinstance(f, TTSStoppedFrame)) > last
    after = [frame for frame in frames[last + 1 :] if isinstance(frame, OutputImageRawFrame)]
    assert len(after) >= 10  # idle frames go on once the bot is silent
    speaking = np.frombuffer(frames[first - 1].image, np.uint8).astype(int)
    idle = np.frombuffer(after[-1].image, np.uint8).astype(int)
    assert np.abs(speaking - idle).mean() > 0.5  # the mouth moved while it spoke
    assert not [frame for frame in bot.recorder.frames if isinstance(frame, ErrorFrame)]


async def test_an_interruption_mid_utterance_silences_the_avatar_within_a_tick(server) -> None:
    avatar = AvatalkVideoService(url=server.ws_url, video_size=128)
    async with PipelineForTest(avatar) as bot:
        await bot.say(20)  # 4 s of tone
        await bot.until(lambda: len(ticks(bot.sink.frames)) >= 10)
        await bot.worker.queue_frame(InterruptionFrame())
        await bot.until(lambda: bool(bot.sink.of(InterruptionFrame)))
        at_interruption = bot.sink.index(lambda f: isinstance(f, InterruptionFrame))
        await bot.until(lambda: len(bot.sink.of(OutputImageRawFrame)) > len(bot.sink.frames[:at_interruption]) + 15)
        first_reply = len(ticks(bot.sink.frames))
        late = ticks(bot.sink.frames[at_interruption:])
        assert len(late) <= 1  # at most the tick that was being pushed when the interruption came
        assert first_reply < 60  # the rest of the 4 s (100 ticks) was dropped, not played
        pictures_after = bot.sink.of(OutputImageRawFrame)[-10:]
        assert all(not picture.image == b"" for picture in pictures_after)  # idle frames keep flowing

        await bot.say(2)  # the bot speaks again: 0.4 s, 10 ticks, all of them
        await bot.until(lambda: len(ticks(bot.sink.frames)) >= first_reply + 10)
        await asyncio.sleep(0.3)
    assert len(ticks(bot.sink.frames)) == first_reply + 10
    assert not [frame for frame in bot.recorder.frames if isinstance(frame, ErrorFrame)]


async def test_a_reply_shorter_than_the_pre_roll_plays_whole(server) -> None:
    avatar = AvatalkVideoService(url=server.ws_url, video_size=64)
    async with PipelineForTest(avatar) as bot:
        await bot.worker.queue_frame(TTSSpeakFrame("blip"))  # 80 ms: sent at once when the TTS stops
        await bot.until(lambda: bool(bot.sink.of(TTSStoppedFrame)))
    audio = ticks(bot.sink.frames)
    assert len(audio) == 2
    assert bot.sink.index(lambda f: isinstance(f, TTSStoppedFrame)) > bot.sink.frames.index(audio[-1])


async def test_tts_faster_than_real_time_is_paced_under_the_servers_buffer(server) -> None:
    """The server refuses audio more than 2 s ahead (render_buffer_s); the TTS makes 5 s at once."""
    avatar = AvatalkVideoService(url=server.ws_url, video_size=64, max_ahead_s=1.5)
    async with PipelineForTest(avatar) as bot:
        await bot.say(25)
        await bot.until(lambda: bool(bot.sink.of(TTSStoppedFrame)), timeout=60)
    assert len(ticks(bot.sink.frames)) == 125
    assert not [frame for frame in bot.recorder.frames if isinstance(frame, ErrorFrame)]


async def test_without_a_server_the_voice_passes_through_and_the_error_is_reported() -> None:
    avatar = AvatalkVideoService(url=f"ws://127.0.0.1:{free_port()}/v1/ws")
    async with PipelineForTest(avatar) as bot:
        await bot.say(2)
        await bot.until(lambda: bool(bot.sink.of(TTSStoppedFrame)))
    assert not avatar.connected
    [error] = [frame for frame in bot.recorder.frames if isinstance(frame, ErrorFrame)]
    assert "unreachable" in error.error
    audio = ticks(bot.sink.frames)
    assert sum(len(frame.audio) for frame in audio) == int(0.4 * RATE) * 2  # the TTS's own audio, unchanged
    assert not bot.sink.of(OutputImageRawFrame)


async def test_a_session_the_server_refuses_is_a_permanent_error(server) -> None:
    avatar = AvatalkVideoService(url=server.ws_url, avatar="nobody-here")
    async with PipelineForTest(avatar) as bot:
        await bot.until(lambda: any(isinstance(f, ErrorFrame) for f in bot.recorder.frames))
    [error] = [frame for frame in bot.recorder.frames if isinstance(frame, ErrorFrame)]
    assert "unknown_avatar" in error.error and not avatar.connected


def test_bad_settings_are_refused_when_the_processor_is_built() -> None:
    with pytest.raises(ValueError, match="output_sample_rate"):
        AvatalkVideoService(output_sample_rate=12345)
    with pytest.raises(ValueError, match="video_size"):
        AvatalkVideoService(video_size=101)
    with pytest.raises(ValueError, match="max_ahead_s"):
        AvatalkVideoService(max_ahead_s=0.1)


def load_example():
    """examples/pipecat_avatar.py as a module (examples/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / "pipecat_avatar.py"
    spec = importlib.util.spec_from_file_location("pipecat_avatar_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_the_example_speaks_with_piper_and_records_the_avatar(server, tmp_path) -> None:
    example = load_example()
    sentence = "Hello! I am a self-hosted avatar, and my lips follow this voice."
    options = {"url": server.ws_url, "video_size": 128, "handle_sigint": False}
    full = await example.run([sentence], tmp_path / "full.mp4", **options)
    cut = await example.run([sentence], tmp_path / "cut.mp4", interrupt_after_s=0.8, **options)
    assert full.spoken_s > 2.0 and cut.spoken_s < full.spoken_s - 0.8  # the interruption cut the sentence short
    with av.open(str(full.output)) as container:
        video = container.streams.video[0]
        assert container.streams.audio and max(video.width, video.height) == 128
        assert sum(1 for _ in container.decode(video=0)) == full.frames > full.spoken_s * 25
