"""WebRTC signalling: ``POST /v1/webrtc/offer`` starts a call, ``DELETE /v1/webrtc/{id}`` ends it.

A render session (docs/protocol.md, "Render-only sessions") can be watched:
``POST /v1/webrtc/{session id}/viewers`` with the session's viewer token
answers a receive-only offer whose tracks carry the session's ticks, and
``DELETE /v1/webrtc/{session id}/viewers/{viewer id}`` stops watching. Both
paths start with the session id, so a balancer routes them to its node.

No trickle ICE: the page gathers its candidates before sending the offer and
the answer carries ours, so one request sets the call up.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Literal

from aiortc import RTCPeerConnection, RTCSessionDescription
from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field, field_validator

from avatalk.config import IceServer
from avatalk.server.admission import Refused, admit, release
from avatalk.server.services import services
from avatalk.server.webrtc import (
    Call,
    ViewerCall,
    WebRTCOutput,
    deliver_channel_message,
    discard_track,
    pump_microphone,
    rtc_configuration,
)
from avatalk.streaming.events import ErrorEvent
from avatalk.streaming.protocol import PersonaOptions, ProtocolError, SessionOptions
from avatalk.streaming.session import ConversationSession

logger = logging.getLogger(__name__)
router = APIRouter(tags=["webrtc"])

MAX_SDP_CHARS = 64 * 1024


class OfferIn(BaseModel):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]
    avatar: str | None = Field(None, description="avatar id (404 when it names no avatar); default: the server's default avatar")
    video_size: int | None = Field(None, ge=64, le=2048, description="longer side of the video in pixels (even)")
    greeting: bool = Field(True, description="speak the persona greeting once connected")
    persona: PersonaOptions | None = None

    @field_validator("video_size")
    @classmethod
    def _even(cls, size: int | None) -> int | None:
        if size is not None and size % 2:
            raise ValueError(f"video_size must be even, not {size}")
        return size


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


@router.get("/v1/webrtc/config", response_model=WebRTCConfigOut)
async def webrtc_config(request: Request) -> WebRTCConfigOut:
    """What the call page needs before making an offer: ICE servers and the avatars to pick from."""
    svc = services(request)
    store = svc.avatar_store
    manifests = [] if store is None else await asyncio.to_thread(store.list)
    return WebRTCConfigOut(
        ice_servers=svc.settings.webrtc.ice_servers,
        default_avatar=svc.settings.avatars.default_avatar,
        avatars=[AvatarChoice(id=m.id, display_name=m.display_name) for m in manifests],
    )


@router.post(
    "/v1/webrtc/offer",
    response_model=AnswerOut,
    responses={400: {"description": "bad SDP"}, 404: {"description": "unknown avatar"}, 503: {"description": "full"}},
)
async def webrtc_offer(body: OfferIn, request: Request) -> AnswerOut:
    """Answer a browser's offer (audio sendrecv + video recvonly + data channel ``events``)."""
    svc = services(request)
    settings = svc.settings
    if "m=audio" not in body.sdp or "m=video" not in body.sdp:
        raise HTTPException(400, "the offer must contain an audio (microphone) and a video (avatar) media section")
    try:
        session, output = admit(request, "webrtc", lambda _models: WebRTCOutput(settings.webrtc.output_sample_rate))
    except Refused as refused:
        raise HTTPException(503, refused.message, headers={"Retry-After": str(refused.retry_after_s)}) from refused
    pc = RTCPeerConnection(rtc_configuration(settings.webrtc.ice_servers))
    call = Call(session, pc, output)
    calls = svc.webrtc_calls

    async def hang_up(reason: str) -> None:
        if call.closed.is_set():
            return
        calls.pop(session.id, None)
        release(svc, session, f"webrtc {reason}")
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
    except ProtocolError as error:  # the caller's mistake (unknown avatar, no renderer): no traceback
        logger.warning("session %s webrtc offer refused: %s: %s", session.id, error.code, error.message[:200])
        await hang_up("offer rejected")
        raise HTTPException(404 if error.code == "unknown_avatar" else 422, error.message) from error

    @pc.on("datachannel")
    def on_datachannel(channel: object) -> None:
        channel.on(  # type: ignore[attr-defined]
            "message",
            lambda message: call.spawn(deliver_channel_message(message, session.handle_event, session.output)),
        )
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
        logger.info("session %s webrtc connection %s", session.id, state)
        if state in ("failed", "closed"):
            await hang_up(f"connection {state}")

    await _answer(pc, body.sdp, output, hang_up)

    calls[session.id] = call
    session.on_end = lambda: hang_up("session limit reached")
    svc.sessions.set_hang_up(session.id, lambda: hang_up("server shutdown"))

    async def connect_deadline() -> None:
        await asyncio.sleep(settings.webrtc.connect_timeout_s)
        if pc.connectionState != "connected":
            await hang_up("not connected in time")

    call.spawn(connect_deadline())
    logger.info("session %s webrtc call answered", session.id)
    return AnswerOut(sdp=pc.localDescription.sdp, type="answer", session_id=session.id)


@router.delete("/v1/webrtc/{session_id}", status_code=204, responses={404: {"description": "no such call"}})
async def webrtc_hang_up(session_id: str, request: Request) -> Response:
    """End a call."""
    svc = services(request)
    call = svc.webrtc_calls.pop(session_id, None)
    if call is None:
        raise HTTPException(404, f"there is no call {session_id!r}")
    release(svc, call.session, "webrtc hung up by the client")
    await call.close()
    return Response(status_code=204)


class ViewerOfferIn(BaseModel):
    sdp: str = Field(min_length=1, max_length=MAX_SDP_CHARS)
    type: Literal["offer"]


class ViewerAnswerOut(BaseModel):
    sdp: str
    type: Literal["answer"]
    session_id: str
    viewer_id: str = Field(description="DELETE /v1/webrtc/{session_id}/viewers/{viewer_id} stops watching")


def viewable_render_session(request: Request, session_id: str) -> ConversationSession:
    """The live render session ``session_id`` with video, or the HTTP error that says why not.

    404 when this server has no such session (it ended, or never existed), 409
    when it is not a render session with video (nothing to watch).
    """
    svc = services(request)
    session = None if svc.sessions.draining else svc.sessions.get(session_id)
    if session is None:
        raise HTTPException(404, f"there is no render session {session_id[:80]!r} on this server (it ended, or never existed)")
    if session.mode != "render" or not session.configured:
        raise HTTPException(
            409, f"session {session_id!r} is not a render session: send session.update with mode 'render' first"
        )
    if session.video is None:
        raise HTTPException(409, f"render session {session_id!r} has no video to watch (configure it with video or an avatar)")
    return session


@router.post(
    "/v1/webrtc/{session_id}/viewers",
    response_model=ViewerAnswerOut,
    responses={
        400: {"description": "bad SDP"},
        401: {"description": "no, expired or forged viewer token"},
        403: {"description": "a viewer token of another session"},
        404: {"description": "no such render session"},
        409: {"description": "not a render session with video, or it has webrtc.max_viewers viewers"},
    },
)
async def watch_render_session(session_id: str, body: ViewerOfferIn, request: Request) -> ViewerAnswerOut:
    """Answer a receive-only offer (audio + video) with the render session's ticks.

    The auth middleware has already checked the viewer token (``Authorization:
    Bearer`` or ``?token=``) against ``session_id``. The viewer sends nothing:
    a microphone track is read and dropped, a data-channel message is answered
    with ``wrong_mode``; the agent keeps every event on its WebSocket.
    """
    svc = services(request)
    settings = svc.settings
    session = viewable_render_session(request, session_id)
    if len(session.viewers) >= settings.webrtc.max_viewers:
        raise HTTPException(
            409, f"render session {session_id!r} already has {len(session.viewers)} viewers (webrtc.max_viewers)"
        )
    if "m=audio" not in body.sdp or "m=video" not in body.sdp:
        raise HTTPException(400, "the offer must contain an audio and a video media section (receive-only is enough)")
    assert session.output_sample_rate is not None  # a configured session has its rates
    output = WebRTCOutput(session.output_sample_rate)
    pc = RTCPeerConnection(rtc_configuration(settings.webrtc.ice_servers))
    viewer_id = uuid.uuid4().hex
    viewer = ViewerCall(viewer_id, session, pc, output)
    viewers = svc.webrtc_viewers

    async def hang_up(reason: str) -> None:
        if viewer.closed.is_set():
            return
        viewers.pop(viewer_id, None)
        logger.info("session %s viewer %s left: %s", session_id, viewer_id, reason)
        await viewer.close()

    @pc.on("datachannel")
    def on_datachannel(channel: object) -> None:
        output.attach_channel(channel)
        refusal = ErrorEvent(
            code="wrong_mode",
            message="a viewer only watches: the render session's agent sends its audio and events over its WebSocket",
        )
        channel.on("message", lambda _message: viewer.spawn(output.send_event(refusal)))  # type: ignore[attr-defined]

    @pc.on("track")
    def on_track(track: object) -> None:
        viewer.spawn(discard_track(track))  # type: ignore[arg-type]

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        logger.info("session %s viewer %s webrtc connection %s", session_id, viewer_id, state)
        if state in ("failed", "closed"):
            await hang_up(f"connection {state}")

    await _answer(pc, body.sdp, output, hang_up)
    try:
        session.viewers.add(output, lambda: hang_up("render session ended"))
    except RuntimeError as error:  # the session closed while the offer was answered
        await hang_up("render session ended")
        raise HTTPException(404, f"render session {session_id!r} has ended") from error
    viewers[viewer_id] = viewer

    async def connect_deadline() -> None:
        await asyncio.sleep(settings.webrtc.connect_timeout_s)
        if pc.connectionState != "connected":
            await hang_up("not connected in time")

    viewer.spawn(connect_deadline())
    logger.info("session %s viewer %s answered (%d watching)", session_id, viewer_id, len(session.viewers))
    return ViewerAnswerOut(sdp=pc.localDescription.sdp, type="answer", session_id=session_id, viewer_id=viewer_id)


@router.delete(
    "/v1/webrtc/{session_id}/viewers/{viewer_id}",
    status_code=204,
    responses={
        401: {"description": "no, expired or forged viewer token"},
        403: {"description": "a viewer token of another session"},
        404: {"description": "no such viewer"},
    },
)
async def stop_watching(session_id: str, viewer_id: str, request: Request) -> Response:
    """Stop watching a render session (the session itself goes on)."""
    viewers = services(request).webrtc_viewers
    viewer = viewers.get(viewer_id)
    if viewer is None or viewer.session.id != session_id:
        raise HTTPException(404, f"render session {session_id!r} has no viewer {viewer_id[:80]!r}")
    viewers.pop(viewer_id, None)
    logger.info("session %s viewer %s left: hung up by the viewer", session_id, viewer_id)
    await viewer.close()
    return Response(status_code=204)


async def _answer(
    pc: RTCPeerConnection, sdp: str, output: WebRTCOutput, hang_up: Callable[[str], Awaitable[None]]
) -> None:
    """Take the offer, add the two clock-fed tracks, make the answer; an unusable offer hangs up with 400."""
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        pc.addTrack(output.audio)
        pc.addTrack(output.video)
        await pc.setLocalDescription(await pc.createAnswer())
    except Exception as error:  # aiortc raises ValueError, InvalidStateError, ... for unusable SDP
        await hang_up("bad offer")
        raise HTTPException(400, f"the SDP offer could not be used: {error or error.__class__.__name__}") from error
