"""``POST /v1/tokens``: a site's backend mints a short-lived session token for a browser."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from avatalk.server.auth import principal_of
from avatalk.server.services import services

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
