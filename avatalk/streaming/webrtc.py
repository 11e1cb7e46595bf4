"""WebRTC transport (aiortc): the microphone track in, avatar audio + video tracks out.

Both outgoing tracks are fed by the session's media clock, one 40 ms tick at a
time, and stamp their frames from the tick index (audio at 48 kHz, video at
90 kHz) from one start: they cannot drift apart however long the call is.
Events travel over a data channel labelled ``events`` as the same JSON the
WebSocket protocol uses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import TYPE_CHECKING

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from avatalk.config import IceServer

if TYPE_CHECKING:
    from avatalk.streaming.session import SessionOutput
from avatalk.media.audio import float_to_pcm16
from avatalk.streaming.protocol import ProtocolError, encode_event, parse_client_event

logger = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90000
TICK_QUEUE = 4  # ticks buffered per track: a stalled sender drops old ticks instead of adding delay
EVENT_BACKLOG = 256  # events kept until the data channel opens

_original_host_addresses = aioice.ice.get_host_addresses


def set_host_addresses(addresses: list[str]) -> None:
    """Make aioice offer exactly ``addresses`` as host candidates (empty: the interface addresses).

    aioice never offers 127.0.0.1 and has no option for it, and behind NAT the
    public address must be advertised; it looks its addresses up through this
    one module-level function, so the server replaces it (process-wide, like
    the setting it comes from).
    """

    def configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = configured if addresses else _original_host_addresses


def rtc_configuration(ice_servers: list[IceServer]) -> RTCConfiguration:
    """Only the configured ICE servers: an empty list means none, never aiortc's public default."""
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in ice_servers]
    )


class _TickTrack(MediaStreamTrack):
    """A track that plays whatever the clock puts into it, in order."""

    def __init__(self) -> None:
        super().__init__()
        self._queue: collections.deque[av.AudioFrame | av.VideoFrame] = collections.deque(maxlen=TICK_QUEUE)
        self._ready = asyncio.Event()

    def put(self, frame: av.AudioFrame | av.VideoFrame) -> None:
        self._queue.append(frame)  # the oldest tick falls off when the sender is not keeping up
        self._ready.set()

    async def recv(self) -> av.AudioFrame | av.VideoFrame:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        return self._queue.popleft()

    def stop(self) -> None:
        super().stop()
        self._ready.set()


class ClockAudioTrack(_TickTrack):
    kind = "audio"


class ClockVideoTrack(_TickTrack):
    kind = "video"


class WebRTCOutput:
    """A session's output over WebRTC: ticks to the two tracks, events to the data channel."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.samples_per_tick = sample_rate // 25
        self.audio = ClockAudioTrack()
        self.video = ClockVideoTrack()
        self.channel: object | None = None
        self._backlog: collections.deque[str] = collections.deque(maxlen=EVENT_BACKLOG)
        self._silence = np.zeros(self.samples_per_tick, dtype=np.float32)

    def attach_channel(self, channel: object) -> None:
        self.channel = channel
        while self._backlog:
            self._send_text(self._backlog.popleft())

    def _send_text(self, text: str) -> None:
        channel = self.channel
        if channel is not None and getattr(channel, "readyState", "") == "open":
            channel.send(text)  # type: ignore[attr-defined]
        else:
            self._backlog.append(text)

    async def send_event(self, kind: str, **fields: object) -> None:
        self._send_text(encode_event(kind, **fields))

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """Silence is sent too: RTP audio runs continuously, stamped by tick."""
        pcm = np.frombuffer(float_to_pcm16(self._silence if audio is None else audio), dtype=np.int16)
        audio_frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        audio_frame.sample_rate = self.sample_rate
        audio_frame.pts = tick * self.samples_per_tick
        audio_frame.time_base = Fraction(1, self.sample_rate)
        self.audio.put(audio_frame)
        if frame is not None:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = tick * (VIDEO_CLOCK_RATE // 25)
            video_frame.time_base = Fraction(1, VIDEO_CLOCK_RATE)
            self.video.put(video_frame)

    def stop(self) -> None:
        self.audio.stop()
        self.video.stop()


async def pump_microphone(track: MediaStreamTrack, push: Callable[[bytes], Awaitable[None]], rate: int) -> None:
    """Decoded microphone frames -> mono PCM16 at ``rate`` -> the session, until the track ends."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        for converted in resampler.resample(frame):
            await push(converted.to_ndarray().tobytes())


def handle_channel_message(message: object, handle: Callable[[object], object], output: SessionOutput) -> None:
    """Decode one data-channel message and hand it to the session; errors go back as events."""

    async def run() -> None:
        try:
            if not isinstance(message, str):
                raise ProtocolError("invalid_event", "data channel messages must be JSON text")
            await handle(parse_client_event(message))  # type: ignore[misc]
        except ProtocolError as error:
            await output.send_event("error", code=error.code, message=error.message)

    task = asyncio.get_running_loop().create_task(run())
    task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("data channel message handling failed", exc_info=task.exception())


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection, whatever state it is in."""
    with contextlib.suppress(Exception):
        await pc.close()

