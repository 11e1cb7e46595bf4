"""An async Python client for the avatalk WebSocket protocol.

Used by the tests, the benchmarks and ``avatalk talk``; also a reference for
anyone writing a client in another language (see docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import websockets

from avatalk.media.audio import float_to_pcm16, pcm16_to_float, read_wav, resample
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.protocol import BinaryKind, decode_binary

Event = dict[str, Any]


@dataclass
class ReceivedAudio:
    tick: int
    received_at: float
    samples: np.ndarray  # float32 at the output rate


@dataclass
class ReceivedFrame:
    tick: int
    received_at: float
    jpeg: bytes


@dataclass
class TalkResult:
    """What ``talk`` returns and ``avatalk talk --json`` prints."""

    transcript: str
    reply: str
    audio_seconds: float
    latency_ms: dict[str, float]
    status: str
    frames: int = 0
    events: list[Event] = field(default_factory=list, repr=False)
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), repr=False)
    sample_rate: int = 24000

    def summary(self) -> dict[str, Any]:
        return {
            "transcript": self.transcript,
            "reply": self.reply,
            "audio_seconds": round(self.audio_seconds, 3),
            "latency_ms": self.latency_ms,
            "status": self.status,
            "frames": self.frames,
        }


class AvatalkClient:
    """One WebSocket conversation; events and audio are collected by a background reader."""

    def __init__(self, url: str, max_size: int = 8 * 1024 * 1024) -> None:
        self.url = url
        self.max_size = max_size
        self.events: list[Event] = []
        self.audio: list[ReceivedAudio] = []
        self.frames: list[ReceivedFrame] = []
        self.input_sample_rate = ENGINE_SAMPLE_RATE
        self.output_sample_rate = 24000
        self.closed: asyncio.Event = asyncio.Event()
        self.close_code: int | None = None
        self._ws: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def __aenter__(self) -> AvatalkClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._ws = await websockets.connect(self.url, max_size=self.max_size, open_timeout=30)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            # Waits for the reader to see the close; a cancellation of the caller still propagates.
            await asyncio.wait({self._reader})
            if not self._reader.cancelled():
                self._reader.exception()  # retrieved: a reader that failed on the close is not an error

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    kind, tick, _pts, payload = decode_binary(message)
                    if kind is BinaryKind.AUDIO:
                        self.audio.append(ReceivedAudio(tick, now, pcm16_to_float(payload)))
                    elif kind is BinaryKind.VIDEO:
                        self.frames.append(ReceivedFrame(tick, now, payload))
                else:
                    event = json.loads(message)
                    event["_received_at"] = now
                    self.events.append(event)
                async with self._changed:
                    self._changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = getattr(self._ws, "close_code", None)
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def send_event(self, kind: str, **fields: Any) -> None:
        await self._ws.send(json.dumps({"type": kind, **fields}))

    async def send_raw(self, data: str | bytes) -> None:
        await self._ws.send(data)

    async def configure(
        self,
        input_sample_rate: int = ENGINE_SAMPLE_RATE,
        output_sample_rate: int = 24000,
        greeting: bool = False,
        **session: Any,
    ) -> Event:
        """Send ``session.update`` and wait for ``session.updated``."""
        self.input_sample_rate = input_sample_rate
        self.output_sample_rate = output_sample_rate
        start = len(self.events)
        await self.send_event(
            "session.update",
            session={
                "input_sample_rate": input_sample_rate,
                "output_sample_rate": output_sample_rate,
                "greeting": greeting,
                **session,
            },
        )
        return await self.wait_for(lambda e: e["type"] in ("session.updated", "error"), since=start)

    async def send_audio(self, samples: np.ndarray) -> None:
        await self._ws.send(float_to_pcm16(samples))

    async def stream_audio(
        self, samples: np.ndarray, sample_rate: int, chunk_ms: int = 20, realtime: bool = True
    ) -> float:
        """Send audio in chunks at real-time pace; returns the monotonic time the last chunk went out."""
        if sample_rate != self.input_sample_rate:
            samples = resample(samples, sample_rate, self.input_sample_rate)
        step = self.input_sample_rate * chunk_ms // 1000
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(samples), step)):
            if realtime:
                delay = started + index * chunk_ms / 1000.0 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await self.send_audio(samples[offset : offset + step])
        return time.monotonic()

    async def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = 60.0, since: int = 0
    ) -> Event:
        """Wait for an event (searching from index ``since``) that matches."""
        deadline = time.monotonic() + timeout
        async with self._changed:
            while True:
                for event in self.events[since:]:
                    if predicate(event):
                        return event
                if self.closed.is_set():
                    raise ConnectionError(f"connection closed (code {self.close_code}) while waiting for an event")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("timed out waiting for an event")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def events_of(self, kind: str) -> list[Event]:
        return [event for event in self.events if event["type"] == kind]

    def reply_ticks(self, since: float = 0.0) -> tuple[int, int] | None:
        """First and last tick (inclusive) of reply audio received after ``since``."""
        ticks = [chunk.tick for chunk in self.audio if chunk.received_at >= since]
        return (min(ticks), max(ticks)) if ticks else None

    def timeline(self, first: int, last: int) -> tuple[list[bytes | None], np.ndarray]:
        """Frames and audio of ticks ``first..last`` on one timeline (missing audio = silence)."""
        samples_per_tick = self.output_sample_rate // 25
        audio = np.zeros((last - first + 1) * samples_per_tick, dtype=np.float32)
        for chunk in self.audio:
            if first <= chunk.tick <= last:
                at = (chunk.tick - first) * samples_per_tick
                audio[at : at + len(chunk.samples)] = chunk.samples[:samples_per_tick]
        by_tick = {frame.tick: frame.jpeg for frame in self.frames}
        return [by_tick.get(tick) for tick in range(first, last + 1)], audio

    def reply_audio(self, since: float = 0.0) -> np.ndarray:
        """Concatenated reply audio received after ``since`` (monotonic time)."""
        chunks = [chunk.samples for chunk in sorted(self.audio, key=lambda c: c.tick) if chunk.received_at >= since]
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


async def talk(
    url: str,
    wav_path: Path,
    output_sample_rate: int = 24000,
    greeting: bool = False,
    timeout: float = 60.0,
    silence_chunk_ms: int = 20,
    video_out: Path | None = None,
    avatar: str | None = None,
    video_size: int | None = None,
) -> TalkResult:
    """Speak a WAV file to the server at real-time pace and collect the reply to it.

    With ``video_out`` (or ``avatar``) the session asks for video, and the reply
    is also saved as an MP4 whose frames and audio come from the same ticks.
    """
    samples, rate = read_wav(wav_path)
    video: dict[str, Any] = {}
    if video_out is not None or avatar is not None:
        video = {"video": True, "avatar": avatar, "video_size": video_size}
        video = {key: value for key, value in video.items() if value is not None}
    async with AvatalkClient(url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        configured = await client.configure(ENGINE_SAMPLE_RATE, output_sample_rate, greeting=greeting, **video)
        if configured["type"] == "error":
            raise RuntimeError(f"server refused the session: {configured['message']}")
        if greeting:
            await client.wait_for(lambda e: e["type"] == "response.done", timeout=timeout)
        mark = len(client.events)
        await client.stream_audio(samples, rate)
        # Keep the microphone open (silence) until the reply to this turn is done.
        silence = np.zeros(ENGINE_SAMPLE_RATE * silence_chunk_ms // 1000, dtype=np.float32)

        async def reply_done() -> tuple[Event, Event]:
            heard = await client.wait_for(
                lambda e: e["type"] == "input_audio_transcription.completed" and bool(e["transcript"].strip()),
                timeout=timeout,
                since=mark,
            )
            done = await client.wait_for(
                lambda e: e["type"] == "response.done" and e["turn_id"] == heard["turn_id"], timeout=timeout, since=mark
            )
            return heard, done

        done_task = asyncio.create_task(reply_done())
        while not done_task.done():
            await client.send_audio(silence)
            await asyncio.sleep(silence_chunk_ms / 1000.0)
        heard, done = done_task.result()
        turn_id, transcript = heard["turn_id"], heard["transcript"]
        created = next(
            e["_received_at"] for e in client.events[mark:] if e["type"] == "response.created" and e["turn_id"] == turn_id
        )
        reply = "".join(
            e["delta"] for e in client.events[mark:] if e["type"] == "response.text.delta" and e["turn_id"] == turn_id
        )
        audio = client.reply_audio(since=created)
        frame_count = 0
        ticks = client.reply_ticks(since=created)
        if video and ticks is not None:
            jpegs, audio = client.timeline(*ticks)
            frame_count = sum(1 for jpeg in jpegs if jpeg is not None)
            if video_out is not None:
                await asyncio.to_thread(_write_reply_video, video_out, jpegs, audio, output_sample_rate)
        return TalkResult(
            transcript=transcript,
            reply=done.get("text") or reply,
            audio_seconds=len(audio) / output_sample_rate,
            latency_ms=done.get("latency_ms", {}),
            status=done.get("status", ""),
            frames=frame_count,
            events=list(client.events),
            audio=audio,
            sample_rate=output_sample_rate,
        )


def _write_reply_video(path: Path, jpegs: list[bytes | None], audio: np.ndarray, sample_rate: int) -> None:
    """Decode the received frames (repeating the previous one for a lost tick) and write an MP4."""
    from avatalk.media.images import decode_jpeg
    from avatalk.media.mp4 import write_mp4

    def frames() -> Any:
        previous = None
        for jpeg in jpegs:
            if jpeg is not None:
                previous = decode_jpeg(jpeg)
            if previous is not None:
                yield previous

    write_mp4(path, frames(), audio, sample_rate)
