"""A self-hosted talking avatar for a Pipecat pipeline: ``AvatalkVideoService``, placed after the TTS.

    transport.input() -> STT -> LLM -> TTS -> AvatalkVideoService -> transport.output()

The processor opens a render-only session on an avatalk server
(docs/protocol.md, "Render-only sessions") and sends it the TTS audio over the
WebSocket. What comes back, one 40 ms tick at a time on the server's clock, is
pushed downstream in place of the TTS audio: for every tick an
``OutputImageRawFrame`` (idle or lip-synced, 25 fps, ``sync_with_audio`` so an
output transport shows it when the audio before it has played), followed by
the tick's audio as a ``TTSAudioRawFrame`` when the bot speaks. Frames the TTS
sent after some of its audio (its text, its ``TTSStoppedFrame``) are held
until that audio has come back, so they keep their place next to it.

Pacing: the TTS usually produces audio much faster than real time, and the
server refuses audio more than ``limits.render_buffer_s`` ahead of playback;
this processor never sends more than ``max_ahead_s`` ahead of what it got
back, waiting (cancellably) otherwise.

Interruptions: on Pipecat's ``InterruptionFrame`` the processor sends
``output_audio_buffer.clear`` at once, drops the frames it held, and drops
reply audio still in flight from the server (the tick or two already on their
way), so the avatar falls silent and closes its mouth within a tick.

When the server cannot be reached, or the connection drops, the TTS audio
passes through unchanged (the bot still speaks, without a face) while the
processor reconnects in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection

from avatalk.integrations.avatalk_render_client import (
    DEFAULT_URL,
    AvatalkError,
    Utterance,
    open_render_session,
    send_event,
)
from avatalk.media.audio import StreamResampler, float_to_pcm16, pcm16_to_float
from avatalk.media.images import decode_jpeg
from avatalk.media.timebase import SUPPORTED_SAMPLE_RATES
from avatalk.streaming.protocol import BinaryKind, decode_binary

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        StartFrame,
        SystemFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
except ModuleNotFoundError as error:  # pragma: no cover - depends on the install
    raise ImportError(
        "avatalk.integrations.pipecat needs Pipecat: pip install 'avatalk[pipecat]'"
    ) from error

logger = logging.getLogger(__name__)

SEND_PIECE_S = 0.1  # TTS audio goes out in pieces of at most this much (well under any frame limit)
# An utterance's first audio goes out once this much of it is there (or at its end): the server
# plays what it has at each tick, so a first frame shorter than a tick would leave the rest of
# that tick silent when the next frame comes a moment too late.
PREROLL_S = 0.12
# A held frame comes out when the audio before it has come back, give or take rounding: every audio
# tick counts 40 ms, padding included, so the count never falls short of what was played.
RELEASE_TOLERANCE_S = 0.005
RECONNECT_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0)


class AvatalkVideoService(FrameProcessor):
    """The avatar of an avatalk server for a Pipecat bot: TTS audio in, lip-synced video and audio out.

    Args:
        url: the server's WebSocket endpoint (``ws://HOST:PORT/v1/ws``).
        api_key: an API key or session token, for a server with keys (sent as a Bearer header).
        avatar: a prepared avatar's id; default the server's default avatar.
        video_size: the longer side of the video in pixels (even); default the server's.
        output_sample_rate: the rate of the audio pushed downstream; default the pipeline's output rate.
        max_ahead_s: most TTS audio sent ahead of what came back; keep it under the server's
            ``limits.render_buffer_s`` (5 s by default) minus a margin for the network.
        decode_threads: threads that decode the server's JPEG frames (one is plenty at 512 px).
        **kwargs: passed to ``FrameProcessor`` (``name``, ...).
    """

    def __init__(
        self,
        *,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        avatar: str | None = None,
        video_size: int | None = None,
        output_sample_rate: int | None = None,
        max_ahead_s: float = 2.0,
        decode_threads: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if output_sample_rate is not None and output_sample_rate not in SUPPORTED_SAMPLE_RATES:
            raise ValueError(f"output_sample_rate {output_sample_rate} is not one of {SUPPORTED_SAMPLE_RATES}")
        if max_ahead_s < 4 * SEND_PIECE_S:
            raise ValueError(f"max_ahead_s must be at least {4 * SEND_PIECE_S:.1f} s, not {max_ahead_s}")
        if video_size is not None and (video_size % 2 or not 64 <= video_size <= 2048):
            raise ValueError(f"video_size must be an even number from 64 to 2048, not {video_size}")
        self._url = url
        self._api_key = api_key
        self._avatar = avatar
        self._video_size = video_size
        self._requested_output_rate = output_sample_rate
        self._max_ahead_s = max_ahead_s
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="avatalk-jpeg")
        self._input_rate = 24000
        self._output_rate = 24000
        self._ws: ClientConnection | None = None
        self._session_id: str | None = None
        self._next_utterance_id = 1
        self._reader: asyncio.Task[None] | None = None
        self._connect_error: BaseException | None = None
        self._closing = False
        self._started = False
        self._warned_passthrough = False
        self._progress = asyncio.Event()  # set whenever audio came back, or the state was reset
        self._resampler: StreamResampler | None = None
        self._reset_stream_state()
        self._last_tick = -1
        self._last_image: tuple[int, OutputImageRawFrame] | None = None
        self._idle_image: OutputImageRawFrame | None = None

    # ---- what a pipeline sees --------------------------------------------------------------------

    @property
    def session_id(self) -> str | None:
        """The avatalk render session in use (None while not connected)."""
        return self._session_id if self._ws is not None else None

    @property
    def connected(self) -> bool:
        return self._ws is not None

    async def setup(self, setup: FrameProcessorSetup) -> None:
        """Connect while the pipeline sets up (processors set up concurrently); errors are told at start."""
        await super().setup(setup)
        rate = setup.audio_out_sample_rate
        self._input_rate = rate if rate in SUPPORTED_SAMPLE_RATES else 24000
        self._output_rate = self._requested_output_rate or self._input_rate
        try:
            await self._connect()
        except Exception as error:  # told when the StartFrame comes, when frames can be pushed
            self._connect_error = error
        self._reader = self.create_task(self._run(), f"{self}::avatalk-reader")

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._disconnect()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            self._started = True
            await self._report_connect_error()
        elif isinstance(frame, EndFrame):
            await self._finish()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._disconnect()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            await self._clear()
            await self.push_frame(frame, direction)
        elif direction is FrameDirection.UPSTREAM or isinstance(frame, SystemFrame):
            await self.push_frame(frame, direction)
        elif self._ws is None:
            self._note_passthrough()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame):
            await self._send_audio(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._commit()
            await self._hold_or_push(frame)
        else:
            await self._hold_or_push(frame)

    # ---- sending -------------------------------------------------------------------------------

    def _reset_stream_state(self) -> None:
        """Forget what was sent and played (a clear, a new connection): every count starts at zero."""
        self._open: Utterance | None = None
        self._utterances: deque[Utterance] = deque()  # sent and not yet over, oldest first
        self._sent_s = 0.0
        self._played_s = 0.0
        self._preroll: list[np.ndarray] | None = None  # the open utterance's first audio, not sent yet
        self._held: deque[tuple[float, Frame]] = deque()  # (seconds of audio that must play first, frame)
        self._clearing = False  # a clear was sent and not yet confirmed
        self._stale_until: int | None = None  # ticks up to this one may still carry cleared audio
        self._resampler = None
        self._progress.set()

    async def _send_audio(self, frame: TTSAudioRawFrame) -> None:
        samples = pcm16_to_float(frame.audio)
        if frame.num_channels > 1:
            samples = samples.reshape(-1, frame.num_channels).mean(axis=1)
        if frame.sample_rate != self._input_rate:
            if self._resampler is None or self._resampler.from_rate != frame.sample_rate:
                self._resampler = StreamResampler(frame.sample_rate, self._input_rate)
            samples = self._resampler.process(samples)
        if self._open is None:
            self._open = Utterance(self._next_utterance_id, frame.context_id)
            self._next_utterance_id += 1
            self._utterances.append(self._open)
            self._preroll = []
        if self._preroll is not None:
            self._preroll.append(samples)
            if self._preroll_s < PREROLL_S:
                return
            samples, self._preroll = np.concatenate(self._preroll), None
        await self._send_samples(samples, frame.context_id)

    @property
    def _preroll_s(self) -> float:
        return sum(len(part) for part in self._preroll or ()) / self._input_rate

    @property
    def _position_s(self) -> float:
        """Seconds of the TTS audio taken in since the last clear (sent, or waiting as pre-roll)."""
        return self._sent_s + self._preroll_s

    async def _send_samples(self, samples: np.ndarray, context_id: str | None) -> None:
        step = max(1, int(SEND_PIECE_S * self._input_rate))
        for start in range(0, len(samples), step):
            piece = samples[start : start + step]
            seconds = len(piece) / self._input_rate
            await self._wait_for_room(seconds)
            ws = self._ws
            if ws is None:  # the connection dropped meanwhile: the rest is heard without a face
                await self.push_frame(
                    TTSAudioRawFrame(float_to_pcm16(samples[start:]), self._input_rate, 1, context_id=context_id)
                )
                return
            try:
                await ws.send(float_to_pcm16(piece))
            except websockets.ConnectionClosed:
                continue  # the reader notices and reconnects; the next piece passes through
            self._sent_s += seconds

    async def _wait_for_room(self, seconds: float) -> None:
        """Wait until sending ``seconds`` more keeps the server at most ``max_ahead_s`` ahead of playback."""
        while self._ws is not None and self._sent_s - self._played_s + seconds > self._max_ahead_s:
            self._progress.clear()
            await self._progress.wait()

    async def _commit(self) -> None:
        utterance, self._open = self._open, None
        if utterance is None:
            return
        if self._preroll:  # a reply shorter than the pre-roll goes out whole now
            samples, self._preroll = np.concatenate(self._preroll), None
            await self._send_samples(samples, utterance.context_id)
        self._preroll = None
        utterance.end_s = self._sent_s
        self._resampler = None
        await send_event(self._ws, {"type": "output_audio_buffer.commit"})

    async def _hold_or_push(self, frame: Frame) -> None:
        """Push now, unless audio sent before it has not come back yet: then it waits for that audio."""
        position = self._position_s
        if not self._held and self._played_s + RELEASE_TOLERANCE_S >= position:
            await self.push_frame(frame)
        else:
            self._held.append((position, frame))

    async def _release_held(self) -> None:
        while self._held and self._held[0][0] <= self._played_s + RELEASE_TOLERANCE_S:
            _, frame = self._held.popleft()
            await self.push_frame(frame)

    async def _clear(self) -> None:
        """The bot was interrupted: the server drops everything queued, and so does this processor."""
        outstanding = bool(self._utterances or self._held)
        held = [frame for _, frame in self._held if not frame.interruptible]
        self._reset_stream_state()
        if outstanding and self._ws is not None:
            self._clearing = True
            await send_event(self._ws, {"type": "output_audio_buffer.clear"})
        for frame in held:  # what Pipecat itself would never drop on an interruption
            await self.push_frame(frame)

    async def _finish(self) -> None:
        """End of the pipeline: the last reply plays out to the end (bounded), then the session closes."""
        await self._commit()
        budget = self._sent_s - self._played_s + 5.0
        try:
            async with asyncio.timeout(budget):
                while self._ws is not None and (self._utterances or self._held):
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            logger.warning("avatalk: the last reply did not finish playing within %.1f s; ending anyway", budget)
        while self._held:
            await self.push_frame(self._held.popleft()[1])
        await self._disconnect()

    # ---- the connection ------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Open a render session; raises ``AvatalkError`` when the server refuses its configuration."""
        session: dict[str, Any] = {
            "mode": "render",
            "input_sample_rate": self._input_rate,
            "output_sample_rate": self._output_rate,
            "video": True,
        }
        if self._avatar is not None:
            session["avatar"] = self._avatar
        if self._video_size is not None:
            session["video_size"] = self._video_size
        ws, self._session_id = await open_render_session(self._url, self._api_key, session)
        self._next_utterance_id = 1
        self._reset_stream_state()
        self._ws = ws
        logger.info("avatalk render session %s open (%s)", self._session_id, self._url)

    async def _report_connect_error(self) -> None:
        error, self._connect_error = self._connect_error, None
        if error is None:
            return
        if isinstance(error, AvatalkError):
            await self.push_error(str(error), exception=error, force_treat_as_permanent=True)
        else:
            await self.push_error(
                f"avatalk at {self._url} is unreachable ({error}); the bot speaks without a face until it is back",
                exception=error if isinstance(error, Exception) else None,
            )

    def _note_passthrough(self) -> None:
        if not self._warned_passthrough:
            self._warned_passthrough = True
            logger.warning("avatalk is not connected: frames pass through without an avatar")

    async def _run(self) -> None:
        """Read the session's ticks and events; reconnect when the connection drops."""
        attempt = 0
        while not self._closing:
            ws = self._ws
            if ws is not None:
                attempt = 0
                try:
                    await self._read(ws)
                except websockets.ConnectionClosed:
                    pass
                if self._closing:
                    return
                logger.warning("avatalk connection to %s lost (%s); reconnecting", self._url, ws.close_reason or "closed")
                self._ws = None
                while self._held and self._started:  # their audio will never come back: they go on without it
                    await self.push_frame(self._held.popleft()[1])
                self._reset_stream_state()
                self._warned_passthrough = False
            if isinstance(self._connect_error, AvatalkError):
                return  # a configuration the server refuses: retrying cannot help
            await asyncio.sleep(RECONNECT_DELAYS_S[min(attempt, len(RECONNECT_DELAYS_S) - 1)])
            attempt += 1
            try:
                await self._connect()
            except AvatalkError as error:
                self._connect_error = error
                if self._started:
                    await self._report_connect_error()
            except (OSError, TimeoutError, ConnectionError, websockets.WebSocketException) as error:
                logger.info("avatalk at %s not reachable yet: %s", self._url, error)

    async def _read(self, ws: ClientConnection) -> None:
        async for message in ws:
            if isinstance(message, bytes):
                await self._on_binary(message)
            else:
                await self._on_event(json.loads(message))

    async def _on_binary(self, message: bytes) -> None:
        kind, tick, _pts_ms, payload = decode_binary(message)
        if tick != self._last_tick and self._last_image is not None and self._last_image[0] == self._last_tick:
            self._idle_image = self._last_image[1]  # the previous tick carried no audio: its picture was idle
        self._last_tick = tick
        stale = self._clearing or (self._stale_until is not None and tick <= self._stale_until)
        if kind is BinaryKind.VIDEO:
            if stale:  # cleared speech: the mouth closes now, the picture goes on
                idle = self._idle_image
                image = None if idle is None else OutputImageRawFrame(image=idle.image, size=idle.size, format=idle.format)
                if image is not None:
                    image.sync_with_audio = True
            else:
                loop = asyncio.get_running_loop()
                rgb = await loop.run_in_executor(self._decoder, decode_jpeg, payload)
                image = OutputImageRawFrame(image=rgb.tobytes(), size=(rgb.shape[1], rgb.shape[0]), format="RGB")
                image.sync_with_audio = True
                self._last_image = (tick, image)
            if image is not None and self._started:
                await self.push_frame(image)
        elif kind is BinaryKind.AUDIO:
            if self._last_image is not None and self._last_image[0] == tick:
                self._last_image = None  # a speaking picture, never an idle one
            if stale:
                return
            context_id = self._utterances[0].context_id if self._utterances else None
            if self._started:
                await self.push_frame(TTSAudioRawFrame(payload, self._output_rate, 1, context_id=context_id))
            self._played_s += len(payload) / 2 / self._output_rate
            await self._release_held()
            self._progress.set()

    async def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "output_audio_buffer.stopped":
            head = self._utterances[0] if self._utterances else None
            if head is not None and head.utterance_id == event.get("utterance_id") and head.end_s is not None:
                self._utterances.popleft()
                self._played_s = head.end_s  # the padding of its last tick was never sent
            await self._release_held()
            self._progress.set()
        elif kind == "output_audio_buffer.cleared":
            self._clearing = False
            self._stale_until = self._last_tick + 1  # a tick prepared before the clear may still come
        elif kind == "warning":
            logger.warning("avatalk: %s: %s", event.get("code"), event.get("message"))
        elif kind == "error":
            logger.warning("avatalk error %s: %s", event.get("code"), event.get("message"))
            if not event.get("fatal") and self._started:
                await self.push_error(f"avatalk: {event.get('code')}: {event.get('message')}")

    async def _disconnect(self) -> None:
        self._closing = True
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            await self.cancel_task(reader)
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
            logger.info("avatalk render session %s closed", self._session_id)
        self._progress.set()


__all__ = ["AvatalkError", "AvatalkVideoService"]
