"""The ``/v1/ws`` endpoint: one conversation per WebSocket (protocol in docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from avatalk.config import Settings
from avatalk.executors import run_in
from avatalk.media.audio import float_to_pcm16
from avatalk.media.images import encode_jpeg
from avatalk.server.admission import Refused, admit, release
from avatalk.server.services import services
from avatalk.streaming.events import (
    ErrorEvent,
    ServerEvent,
    SessionCreated,
    encode_event,
)
from avatalk.streaming.protocol import (
    BinaryKind,
    ProtocolError,
    encode_binary,
    parse_client_event,
)
from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)
router = APIRouter()


class ClientUTF8Filter(logging.Filter):
    """uvicorn's record of a text frame that is not UTF-8, as what it is: a client's mistake.

    uvicorn (``websockets-sansio``) closes such a connection with 1007 itself,
    before the app sees the frame, and logs it with ``logger.exception`` on
    ``uvicorn.error``: an ERROR with a traceback for something the server
    handled. This filter turns that one record into a one-line WARNING, as
    every other client mistake is logged; anything else passes unchanged.
    """

    MESSAGE = "Invalid UTF-8 sequence received from client."

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.MESSAGE and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg = "a client sent a text frame that is not UTF-8; closed with 1007"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_utf8_errors() -> None:
    """Install ``ClientUTF8Filter`` on uvicorn's error logger (once; the app serving /v1/ws does it on import)."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, ClientUTF8Filter) for existing in uvicorn_errors.filters):
        uvicorn_errors.addFilter(ClientUTF8Filter())


quiet_client_utf8_errors()

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY = 1008
CLOSE_SERVICE_RESTART = 1012  # the server is shutting down (after the drain)
ENCODE_BUDGET_S = 0.020  # longest a tick waits for its JPEG before repeating the previous picture
_SEND_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)  # what sending to a client that is gone raises


class WebSocketOutput:
    """Serialises sends from the session's tasks onto one socket; a gone client is not an error.

    Frames are JPEG-encoded on ``encoder`` (the models' ``encode`` pool), not
    on asyncio's default pool, so encoding under load queues behind other
    encodes only, never behind model work or file I/O. When the pool is so
    busy that a frame is not encoded within ``ENCODE_BUDGET_S``, the tick
    carries the previous picture again and its audio leaves on time: a
    saturated machine degrades video, never the pace of the sound.
    """

    def __init__(self, websocket: WebSocket, encoder: Executor, jpeg_quality: int = 80) -> None:
        self.websocket = websocket
        self.encoder = encoder
        self.jpeg_quality = jpeg_quality
        self._lock = asyncio.Lock()
        self.open = True
        self._encoding: asyncio.Future[bytes] | None = None
        self._last_jpeg: bytes | None = None

    async def _send(self, text: str | None = None, data: bytes | None = None) -> None:
        if not self.open:
            return
        async with self._lock:
            try:
                if text is not None:
                    await self.websocket.send_text(text)
                else:
                    await self.websocket.send_bytes(data or b"")
            except _SEND_ERRORS:
                self.open = False

    async def send_event(self, event: ServerEvent) -> None:
        await self._send(text=encode_event(event))

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """The frame first, then its audio: a client has the picture when the sound starts."""
        if not self.open:
            return
        if frame is not None:
            jpeg = await self._jpeg(frame)
            await self._send(data=encode_binary(BinaryKind.VIDEO, tick, jpeg))
        if audio is not None:
            await self._send(data=encode_binary(BinaryKind.AUDIO, tick, float_to_pcm16(audio)))


    async def _jpeg(self, frame: np.ndarray) -> bytes:
        """This frame as JPEG, or the previous picture when the encoder is behind (never two encodes at once)."""
        if self._encoding is None or self._encoding.done():
            self._encoding = asyncio.ensure_future(run_in(self.encoder, encode_jpeg, frame, self.jpeg_quality))
            self._encoding.add_done_callback(self._keep_jpeg)
            if self._last_jpeg is None:  # the first picture is always waited for
                return await self._encoding
        done, _ = await asyncio.wait({self._encoding}, timeout=ENCODE_BUDGET_S)
        if done:
            return self._encoding.result()
        assert self._last_jpeg is not None
        return self._last_jpeg

    def _keep_jpeg(self, encoding: asyncio.Future[bytes]) -> None:
        if not encoding.cancelled() and encoding.exception() is None:
            self._last_jpeg = encoding.result()


@router.websocket("/v1/ws")
async def conversation(websocket: WebSocket) -> None:
    settings = services(websocket).settings
    await websocket.accept()
    try:
        session, output = admit(
            websocket,
            "ws",
            lambda models: WebSocketOutput(websocket, models.executors.encode, settings.avatars.jpeg_quality),
        )
    except Refused as refused:
        await _refuse(websocket, refused)
        return

    async def end() -> None:
        output.open = False
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(CLOSE_POLICY, "session limit reached")

    async def shut_down() -> None:  # after the drain: the server_shutdown event went out, the reply finished
        output.open = False
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(CLOSE_SERVICE_RESTART, "server shutting down")

    session.on_end = end
    services(websocket).sessions.set_hang_up(session.id, shut_down)
    await output.send_event(SessionCreated(session=session.describe()))
    try:
        await _serve(websocket, session, output, settings)
    finally:
        release(services(websocket), session, "websocket closed")
        await session.close()
        if websocket.client_state is WebSocketState.CONNECTED:
            with contextlib.suppress(RuntimeError, OSError):
                await websocket.close()


async def _refuse(websocket: WebSocket, refused: Refused) -> None:
    """Tell the client why there is no session (an error event), then close with "try again later"."""
    with contextlib.suppress(*_SEND_ERRORS):
        await websocket.send_text(encode_event(ErrorEvent(code=refused.code, message=refused.message)))
        await websocket.close(CLOSE_TRY_AGAIN_LATER, "server full" if refused.code == "server_full" else None)


async def _serve(websocket: WebSocket, session: ConversationSession, output: WebSocketOutput, settings: Settings) -> None:
    limits = settings.limits
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            if message.get("bytes") is not None:
                data: bytes = message["bytes"]
                if len(data) > limits.max_audio_frame_bytes:
                    raise ProtocolError(
                        "frame_too_large",
                        f"audio frame of {len(data)} bytes exceeds the limit of {limits.max_audio_frame_bytes}; dropped",
                    )
                await session.push_audio(data)
            elif message.get("text") is not None:
                text: str = message["text"]
                size = len(text.encode())
                if size > limits.max_text_frame_bytes:
                    raise ProtocolError(
                        "frame_too_large",
                        f"text frame of {size} bytes exceeds the limit of {limits.max_text_frame_bytes}; dropped",
                    )
                await session.handle_event(parse_client_event(text))
        except ProtocolError as error:  # the client's mistake: one line at WARNING, no traceback
            logger.warning("session %s: %s: %s", session.id, error.code, error.message[:200])
            await session.output.send_event(ErrorEvent(code=error.code, message=error.message))
        except Exception:  # a bug must cost one message, not the session
            logger.exception("session %s could not handle a client message", session.id)
            await session.output.send_event(
                ErrorEvent(code="internal_error", message="the server could not handle that message")
            )
        if not output.open:
            return
