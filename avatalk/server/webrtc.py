"""WebRTC transport (aiortc): the microphone track in, avatar audio + video tracks out.

Both outgoing tracks are fed by the session's media clock, one 40 ms tick at a
time, and stamp their frames from the tick index (audio at 48 kHz, video at
90 kHz) from one start: they cannot drift apart however long the call is.
Each tick's audio leaves as two 20 ms frames at 48 kHz, one Opus packet each:
aiortc gives every packet encoded from one frame the same RTP timestamp, so a
40 ms frame would become two packets the receiver takes for one (half the
sound lost).
Events travel over a data channel labelled ``events`` as the same JSON the
WebSocket protocol uses. A ``Call`` ties one peer connection to its session
and the tasks started for it, so hanging up ends all of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from fractions import Fraction

import aioice.ice
import av
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError

from avatalk.config import IceServer
from avatalk.logs import task_context
from avatalk.media.audio import StreamResampler, float_to_pcm16
from avatalk.media.timebase import FPS, samples_per_tick
from avatalk.streaming.events import ErrorEvent, ServerEvent, encode_event
from avatalk.streaming.protocol import ClientEvent, ProtocolError, parse_client_event
from avatalk.streaming.session import ConversationSession, SessionOutput

logger = logging.getLogger(__name__)

VIDEO_CLOCK_RATE = 90000
OPUS_RATE = 48000  # what aiortc's Opus encoder runs at
OPUS_FRAME_SAMPLES = 960  # 20 ms at 48 kHz: one audio frame, one Opus packet
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

    frames_per_tick = 1

    def __init__(self) -> None:
        super().__init__()
        self._queue: collections.deque[av.AudioFrame | av.VideoFrame] = collections.deque(
            maxlen=TICK_QUEUE * self.frames_per_tick
        )
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
    frames_per_tick = 2  # 20 ms frames


class ClockVideoTrack(_TickTrack):
    kind = "video"


class WebRTCOutput:
    """A session's output over WebRTC: ticks to the two tracks, events to the data channel."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.samples_per_tick = samples_per_tick(sample_rate)
        self._to_opus_rate = StreamResampler(sample_rate, OPUS_RATE)
        self._pending = np.zeros(0, dtype=np.float32)  # 48 kHz audio not yet cut into 20 ms frames
        self._audio_pts: int | None = None
        # aiortc's senders encode these tracks (Opus, VP8) with ``run_in_executor(None, ...)``, on the
        # event loop's default executor, and have no option for another pool: that work stays there,
        # off avatalk's named executors (the default pool is otherwise left to short file I/O).
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

    async def send_event(self, event: ServerEvent) -> None:
        self._send_text(encode_event(event))

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """Silence is sent too: RTP audio runs continuously, stamped by tick."""
        if self._audio_pts is None:
            self._audio_pts = tick * samples_per_tick(OPUS_RATE)
        samples = self._to_opus_rate.process(self._silence if audio is None else audio)
        self._pending = np.concatenate([self._pending, samples])
        while len(self._pending) >= OPUS_FRAME_SAMPLES:
            part, self._pending = self._pending[:OPUS_FRAME_SAMPLES], self._pending[OPUS_FRAME_SAMPLES:]
            pcm = np.frombuffer(float_to_pcm16(part), dtype=np.int16)
            audio_frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
            audio_frame.sample_rate = OPUS_RATE
            audio_frame.pts = self._audio_pts
            audio_frame.time_base = Fraction(1, OPUS_RATE)
            self._audio_pts += OPUS_FRAME_SAMPLES
            self.audio.put(audio_frame)
        if frame is not None:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = tick * (VIDEO_CLOCK_RATE // FPS)
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


async def discard_track(track: MediaStreamTrack) -> None:
    """Read and drop a track's frames until it ends: aiortc queues unread frames without bound."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return


async def deliver_channel_message(
    message: object, handle: Callable[[ClientEvent], Awaitable[None]], output: SessionOutput
) -> None:
    """Decode one data-channel message and hand it to the session; errors go back as events.

    A client's mistake is logged as one line at WARNING (no traceback), as on the WebSocket.
    """
    try:
        if not isinstance(message, str):
            raise ProtocolError("invalid_json", "data channel messages must be JSON text, not binary")
        await handle(parse_client_event(message))
    except ProtocolError as error:
        logger.warning("webrtc data channel: %s: %s", error.code, error.message[:200])
        await output.send_event(ErrorEvent(code=error.code, message=error.message))


async def close_peer(pc: RTCPeerConnection) -> None:
    """Close a peer connection, whatever state it is in."""
    with contextlib.suppress(Exception):
        await pc.close()


class Call:
    """One WebRTC call: its peer connection, its session and the tasks started for it."""

    def __init__(self, session: ConversationSession, pc: RTCPeerConnection, output: WebRTCOutput) -> None:
        self.session = session
        self.pc = pc
        self.output = output
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    def spawn(self, coro: Coroutine[object, object, None]) -> None:
        """Run ``coro`` for this call; it is cancelled on hang-up, and a failure is logged.

        aiortc calls back in its own context, so the task is labelled with the
        session explicitly for the logs.
        """
        if self.closed.is_set():  # e.g. a data-channel message arriving while the call hangs up
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro, context=task_context(self.session.id))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("session %s webrtc call task failed", self.session.id, exc_info=task.exception())

    async def close(self) -> None:
        """Stop the call's tasks (waiting until they have stopped), then the session, tracks and peer."""
        if self.closed.is_set():
            return
        self.closed.set()
        others = {task for task in self.tasks if task is not asyncio.current_task()}
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others)  # never raises for the tasks; a cancellation of this task propagates
        await self._release_session()
        self.output.stop()
        await close_peer(self.pc)

    async def _release_session(self) -> None:
        """A call owns its session: hanging up ends it."""
        await self.session.close()


class ViewerCall(Call):
    """Someone watching a render session: its ticks go to this call's tracks too, nothing comes back.

    The session belongs to its agent's WebSocket: hanging up a viewer only
    stops the copy of the ticks, and the session's end hangs up its viewers.
    """

    def __init__(self, viewer_id: str, session: ConversationSession, pc: RTCPeerConnection, output: WebRTCOutput) -> None:
        super().__init__(session, pc, output)
        self.viewer_id = viewer_id

    async def _release_session(self) -> None:
        self.session.viewers.remove(self.output)


async def close_all_calls(calls: dict[str, Call]) -> None:
    """Shutdown: hang up every call; one that fails to close does not keep the others open."""
    for call in list(calls.values()):
        try:
            await call.close()
        except Exception:
            logger.exception("session %s webrtc call did not close cleanly", call.session.id)
    calls.clear()
