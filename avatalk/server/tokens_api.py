"""Short-lived tokens: ``POST /v1/tokens`` (a session token a site's backend gives a browser) and
``POST /v1/webrtc/{session id}/viewer-token`` (a render session's agent lets someone watch it)."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from avatalk.server.auth import principal_of
from avatalk.server.services import services
from avatalk.server.webrtc_api import viewable_render_session

router = APIRouter(tags=["auth"])


class TokenRequest(BaseModel):
    ttl_s: int | None = Field(None, ge=10, le=86400, description="lifetime; default auth.token_ttl_s")


class TokenOut(BaseModel):
    token: str = Field(description="pass as ?token= to the page, embed.js, /v1/ws, or as a Bearer header")
    expires_at: datetime


@router.post("/v1/tokens", response_model=TokenOut, responses={403: {"description": "not an API key"}})
async def mint_token(body: TokenRequest, request: Request) -> TokenOut:
    """A token that opens conversations (WebSocket, WebRTC) for a few minutes, and nothing else."""
    principal = principal_of(request)
    authenticator = services(request).authenticator
    if authenticator.open:
        raise HTTPException(400, "this server has no API keys configured, so it needs no tokens")
    if principal.kind != "key":
        raise HTTPException(403, "only an API key can mint session tokens")
    token, expires = authenticator.mint_token(principal, body.ttl_s)
    return TokenOut(token=token, expires_at=datetime.fromtimestamp(expires, tz=timezone.utc))


class ViewerTokenOut(BaseModel):
    token: str = Field(description="the viewer's credential: Authorization: Bearer TOKEN, or ?token=")
    expires_at: datetime = Field(description="the viewer must connect before then; a connected viewer stays")
    session_id: str
    viewers_path: str = Field(description="where the viewer POSTs its offer (with the token)")
    page_path: str = Field(description="the call page in viewer mode, ready to open (relative to the server)")


@router.post(
    "/v1/webrtc/{session_id}/viewer-token",
    response_model=ViewerTokenOut,
    responses={
        403: {"description": "not an API key, or not the key that opened the session"},
        404: {"description": "no such render session"},
        409: {"description": "not a render session with video"},
    },
)
async def mint_viewer_token(session_id: str, body: TokenRequest, request: Request) -> ViewerTokenOut:
    """A token that watches this render session over WebRTC (the call page with ``?view=``), and nothing else.

    Only the key that opened the session may ask (a session opened with a
    token counts as the key's that minted it), or anyone on a server without
    keys (loopback only). Session tokens cannot mint tokens of any kind.
    """
    principal = principal_of(request)
    svc = services(request)
    if principal.kind not in ("key", "open"):
        raise HTTPException(403, "only an API key can mint viewer tokens")
    viewable_render_session(request, session_id)
    owner = svc.sessions.owner(session_id)
    if principal.kind == "key" and (owner is None or owner.name != principal.name):
        raise HTTPException(403, f"render session {session_id!r} was opened with another key")
    token, expires = svc.authenticator.mint_viewer_token(session_id, body.ttl_s)
    return ViewerTokenOut(
        token=token,
        expires_at=datetime.fromtimestamp(expires, tz=timezone.utc),
        session_id=session_id,
        viewers_path=f"/v1/webrtc/{session_id}/viewers",
        page_path=f"/?view={session_id}&token={token}",
    )
