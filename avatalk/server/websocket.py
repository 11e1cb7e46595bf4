"""The ``/v1/ws`` endpoint: one conversation per WebSocket (protocol in docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from avatalk.config import Settings
from avatalk.media.audio import float_to_pcm16
from avatalk.media.images import encode_jpeg
from avatalk.server.sessions import OPEN, SessionRegistry
from avatalk.streaming.protocol import BinaryKind, ProtocolError, encode_binary, encode_event, parse_client_event
from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)
router = APIRouter()

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY = 1008


class WebSocketOutput:
    """Serialises sends from the session's tasks onto one socket; a gone client is not an error."""

    def __init__(self, websocket: WebSocket, jpeg_quality: int = 80) -> None:
        self.websocket = websocket
        self.jpeg_quality = jpeg_quality
        self._lock = asyncio.Lock()
        self.open = True

    async def _send(self, text: str | None = None, data: bytes | None = None) -> None:
        if not self.open:
            return
        async with self._lock:
            try:
                if text is not None:
                    await self.websocket.send_text(text)
                else:
                    await self.websocket.send_bytes(data or b"")
            except (WebSocketDisconnect, RuntimeError, OSError):
                self.open = False

    async def send_event(self, kind: str, **fields: object) -> None:
        await self._send(text=encode_event(kind, **fields))

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """The frame first, then its audio: a client has the picture when the sound starts."""
        if not self.open:
            return
        if frame is not None:
            jpeg = await asyncio.to_thread(encode_jpeg, frame, self.jpeg_quality)
            await self._send(data=encode_binary(BinaryKind.VIDEO, tick, jpeg))
        if audio is not None:
            await self._send(data=encode_binary(BinaryKind.AUDIO, tick, float_to_pcm16(audio)))


@router.websocket("/v1/ws")
async def conversation(websocket: WebSocket) -> None:
    settings: Settings = websocket.app.state.settings
    registry: SessionRegistry = websocket.app.state.sessions
    await websocket.accept()
    output = WebSocketOutput(websocket, settings.avatars.jpeg_quality)
    models = websocket.app.state.models
    metrics = websocket.app.state.metrics
    if models is None:
        metrics.record_error("not_ready")
        await output.send_event("error", code="not_ready", message="the server is still loading its models")
        await websocket.close(CLOSE_TRY_AGAIN_LATER)
        return
    avatars = getattr(websocket.app.state, "avatar_store", None)
    session = ConversationSession(uuid.uuid4().hex[:12], models, settings, metrics.observe(output), avatars)
    refusal = registry.try_add(session, websocket.scope.get("state", {}).get("principal", OPEN))
    if refusal is not None:
        metrics.record_error("server_full")
        await output.send_event("error", code="server_full", message=refusal)
        await websocket.close(CLOSE_TRY_AGAIN_LATER, "server full")
        return
    metrics.session_started("ws")
    logger.info("session %s opened (%d active)", session.id, registry.active)

    async def end() -> None:
        output.open = False
        with contextlib.suppress(RuntimeError, OSError):
            await websocket.close(CLOSE_POLICY, "session limit reached")

    session.on_end = end
    await output.send_event("session.created", session=session.describe())
    try:
        await _serve(websocket, session, output, settings)
    finally:
        registry.remove(session.id)
        await session.close()
        logger.info("session %s closed (%d active)", session.id, registry.active)
        if websocket.client_state is WebSocketState.CONNECTED:
            try:
                await websocket.close()
            except (RuntimeError, OSError):
                pass


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
                if len(text.encode()) > limits.max_text_frame_bytes:
                    raise ProtocolError(
                        "frame_too_large",
                        f"text frame of {len(text)} characters exceeds the limit of {limits.max_text_frame_bytes} bytes",
                    )
                await session.handle_event(parse_client_event(text))
        except ProtocolError as error:
            await session.output.send_event("error", code=error.code, message=error.message)
        except Exception:  # a bug must cost one message, not the session
            logger.exception("session %s: a client message failed", session.id)
            await session.output.send_event(
                "error", code="internal_error", message="the server could not handle that message"
            )
        if not output.open:
            return
