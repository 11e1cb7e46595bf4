"""WebRTC signalling: ``POST /v1/webrtc/offer`` starts a call, ``DELETE /v1/webrtc/{id}`` ends it.

No trickle ICE: the page gathers its candidates before sending the offer and
the answer carries ours, so one request sets the call up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Literal

from aiortc import RTCPeerConnection, RTCSessionDescription
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from avatalk.config import IceServer, Settings
from avatalk.server.sessions import OPEN, SessionRegistry
from avatalk.streaming.protocol import PersonaOptions, ProtocolError, SessionOptions
from avatalk.streaming.session import ConversationSession
from avatalk.streaming.webrtc import WebRTCOutput, close_peer, handle_channel_message, pump_microphone, rtc_configuration

logger = logging.getLogger(__name__)
router = APIRouter(tags=["webrtc"])

MAX_SDP_CHARS = 64 * 1024


class OfferIn(BaseModel):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    avatar: str | None = Field(None, max_length=64, description="avatar id; default: the server's default avatar")
    video_size: int | None = Field(None, ge=64, le=2048, description="longer side of the video in pixels (even)")
    greeting: bool = Field(True, description="speak the persona greeting once connected")
    persona: PersonaOptions | None = None


class AnswerOut(BaseModel):
    sdp: str
    type: Literal["answer"]
    session_id: str


class AvatarChoice(BaseModel):
    id: str
    display_name: str


class WebRTCConfigOut(BaseModel):
    ice_servers: list[IceServer]
    default_avatar: str
    avatars: list[AvatarChoice]


class Call:
    """One WebRTC call: its peer connection, session and background tasks."""

    def __init__(self, session: ConversationSession, pc: RTCPeerConnection, output: WebRTCOutput) -> None:
        self.session = session
        self.pc = pc
        self.output = output
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        await self.session.close()
        self.output.stop()
        await close_peer(self.pc)


def _calls(request: Request) -> dict[str, Call]:
    return request.app.state.webrtc_calls  # type: ignore[no-any-return]


async def close_all_calls(calls: dict[str, Call]) -> None:
    for call in list(calls.values()):
        with contextlib.suppress(Exception):
            await call.close()
    calls.clear()


@router.get("/v1/webrtc/config", response_model=WebRTCConfigOut)
async def webrtc_config(request: Request) -> WebRTCConfigOut:
    """What the call page needs before making an offer: ICE servers and the avatars to pick from."""
    settings: Settings = request.app.state.settings
    store = request.app.state.avatar_store
    manifests = await asyncio.to_thread(store.list)
    return WebRTCConfigOut(
        ice_servers=settings.webrtc.ice_servers,
        default_avatar=settings.avatars.default_avatar,
        avatars=[AvatarChoice(id=m.id, display_name=m.display_name) for m in manifests],
    )


@router.post(
    "/v1/webrtc/offer",
    response_model=AnswerOut,
    responses={400: {"description": "bad SDP"}, 404: {"description": "unknown avatar"}, 503: {"description": "full"}},
)
async def webrtc_offer(body: OfferIn, request: Request) -> AnswerOut:
    """Answer a browser's offer (audio sendrecv + video recvonly + data channel ``events``)."""
    settings: Settings = request.app.state.settings
    registry: SessionRegistry = request.app.state.sessions
    models = request.app.state.models
    if models is None:
        raise HTTPException(503, "the server is still loading its models", headers={"Retry-After": "10"})
    if "m=audio" not in body.sdp or "m=video" not in body.sdp:
        raise HTTPException(400, "the offer must contain an audio (microphone) and a video (avatar) media section")

    pc = RTCPeerConnection(rtc_configuration(settings.webrtc.ice_servers))
    output = WebRTCOutput(settings.webrtc.output_sample_rate)
    metrics = request.app.state.metrics
    session = ConversationSession(
        uuid.uuid4().hex[:12], models, settings, metrics.observe(output), request.app.state.avatar_store
    )
    refusal = registry.try_add(session, getattr(request.state, "principal", OPEN))
    if refusal is not None:
        metrics.record_error("server_full")
        await close_peer(pc)
        raise HTTPException(503, refusal, headers={"Retry-After": "30"})
    metrics.session_started("webrtc")
    call = Call(session, pc, output)
    calls = _calls(request)

    async def hang_up(reason: str) -> None:
        if calls.pop(session.id, None) is not None or not call.closed.is_set():
            logger.info("webrtc call %s ended: %s", session.id, reason)
        registry.remove(session.id)
        await call.close()

    try:
        await session.configure(
            SessionOptions(
                input_sample_rate=settings.webrtc.input_sample_rate,
                output_sample_rate=settings.webrtc.output_sample_rate,
                video=True,
                avatar=body.avatar,
                video_size=body.video_size,
                persona=body.persona,
                greeting=False,  # spoken once the page can hear it (data channel open)
            )
        )
    except ProtocolError as error:
        await hang_up("rejected")
        raise HTTPException(404 if error.code == "unknown_avatar" else 422, error.message) from error

    @pc.on("datachannel")
    def on_datachannel(channel: object) -> None:
        channel.on("message", lambda message: handle_channel_message(message, session.handle_event, session.output))  # type: ignore[attr-defined]
        output.attach_channel(channel)
        if body.greeting:
            session.greet()

    @pc.on("track")
    def on_track(track: object) -> None:
        if getattr(track, "kind", None) == "audio":
            call.spawn(pump_microphone(track, session.push_audio, settings.webrtc.input_sample_rate))  # type: ignore[arg-type]

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        logger.info("webrtc call %s connection %s", session.id, state)
        if state in ("failed", "closed"):
            await hang_up(f"connection {state}")

    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body.sdp, type="offer"))
        pc.addTrack(output.audio)
        pc.addTrack(output.video)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as error:  # aiortc raises ValueError, InvalidStateError, ... for unusable SDP
        await hang_up("bad offer")
        raise HTTPException(400, f"the SDP offer could not be used: {error or error.__class__.__name__}") from error

    calls[session.id] = call
    session.on_end = lambda: hang_up("session limit reached")

    async def connect_deadline() -> None:
        await asyncio.sleep(settings.webrtc.connect_timeout_s)
        if pc.connectionState != "connected":
            await hang_up("not connected in time")

    call.spawn(connect_deadline())
    logger.info("webrtc call %s answered (%d sessions)", session.id, registry.active)
    return AnswerOut(sdp=pc.localDescription.sdp, type="answer", session_id=session.id)


@router.delete("/v1/webrtc/{session_id}", status_code=204, responses={404: {"description": "no such call"}})
async def webrtc_hang_up(session_id: str, request: Request) -> Response:
    """End a call."""
    call = _calls(request).pop(session_id, None)
    if call is None:
        raise HTTPException(404, f"there is no call {session_id!r}")
    request.app.state.sessions.remove(session_id)
    await call.close()
    return Response(status_code=204)
