"""The WebSocket output alone: a saturated encode pool delays pictures, never the audio of a tick."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from avatalk.media.images import decode_jpeg
from avatalk.server.websocket import WebSocketOutput
from avatalk.streaming.protocol import BinaryKind, decode_binary


class RecordingSocket:
    """Test double of a Starlette WebSocket: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def send_text(self, text: str) -> None:
        raise AssertionError("no events in this test")


async def test_a_busy_encoder_repeats_the_previous_picture_and_the_audio_goes_out() -> None:
    socket = RecordingSocket()
    with ThreadPoolExecutor(1, thread_name_prefix="test-encode") as pool:
        output = WebSocketOutput(socket, pool)  # type: ignore[arg-type]
        audio = np.zeros(960, np.float32)
        black, white = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8)
        await output.send_tick(0, audio, black)
        release = threading.Event()
        pool.submit(release.wait)  # another session's encode occupies the only thread
        await output.send_tick(1, audio, white)
        await output.send_tick(2, audio, white)
        release.set()
        # The pool is one thread, first come first served: once this no-op ran, the white encode is done.
        await asyncio.wrap_future(pool.submit(lambda: None))
        await output.send_tick(3, audio, white)
    frames = [decode_binary(data) for data in socket.sent]
    assert [(kind, tick) for kind, tick, _, _ in frames] == [
        (kind, tick) for tick in range(4) for kind in (BinaryKind.VIDEO, BinaryKind.AUDIO)
    ]
    pictures = [decode_jpeg(payload).mean() for kind, _, _, payload in frames if kind is BinaryKind.VIDEO]
    assert pictures[0] < 10 and pictures[1] < 10 and pictures[2] < 10  # ticks 1-2 repeat the last picture
    assert pictures[3] > 245  # the encoder caught up
