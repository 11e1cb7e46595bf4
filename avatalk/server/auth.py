"""Access control: API keys, short-lived session tokens, and the loopback rule.

- Without configured keys the server is open, which is only allowed on a
  loopback address (or with ``auth.allow_open_network``): a kiosk on one
  machine needs no keys, a public server cannot start without them.
- With keys, every ``/v1`` route and ``/metrics`` need one (``Authorization:
  Bearer KEY`` or ``X-API-Key``), stored only as SHA-256 in the settings.
- A site's backend mints a session token with its key (``POST /v1/tokens``)
  and hands it to the browser; a token opens conversations (WebSocket, WebRTC
  signalling) and nothing else, for a few minutes. Tokens are HMAC-signed, so
  checking one needs no database.
- The agent of a render session mints a viewer token for it
  (``POST /v1/webrtc/{id}/viewer-token``): signed with a key of its own, it
  opens only that session's viewer routes (``/v1/webrtc/{id}/viewers``),
  which accept nothing else, on a server with keys or without.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from avatalk.config import ApiKey, Settings

OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/embed.js", "/static/")
SESSION_PATHS = ("/v1/ws", "/v1/webrtc/")
JOB_CREATING = (("POST", "/v1/avatars"), ("POST", "/v1/renders"))
#: Watching a render session over WebRTC: a viewer token for that session is the only credential.
VIEWER_PATH = re.compile(r"^/v1/webrtc/(?P<session>[^/]+)/viewers(?:/[^/]+)?$")
#: What a viewer's page also reads before its offer (the ICE servers): a viewer token of any session opens it.
VIEWER_READABLE = ("/v1/webrtc/config",)


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key, a token minted by a key, or anyone (open mode)."""

    name: str
    kind: str  # "key", "token", "viewer" or "open"
    max_sessions: int | None = None
    session_id: str | None = None  # a viewer: the one render session it may watch


#: Everyone, on a server without keys.
OPEN = Principal("open", "open")


def principal_of(connection: HTTPConnection) -> Principal:
    """Who made this request or WebSocket, as ``AuthMiddleware`` found it (``OPEN`` on open paths)."""
    principal: Principal = getattr(connection.state, "principal", OPEN)
    return principal


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve a non-loopback address with no keys unless explicitly overridden."""
    if settings.auth.api_keys or is_loopback(settings.host) or settings.auth.allow_open_network:
        return
    raise RuntimeError(
        f"refusing to serve {settings.host} without API keys: anyone who can reach it could use it. "
        "Configure auth.api_keys (see docs/deployment.md), bind 127.0.0.1, or set "
        "AVATALK_AUTH__ALLOW_OPEN_NETWORK=true for a trusted private network."
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authenticator:
    """Checks keys and tokens; mints tokens."""

    def __init__(self, settings: Settings) -> None:
        self.keys: dict[str, ApiKey] = {key.sha256: key for key in settings.auth.api_keys}
        self.by_name: dict[str, ApiKey] = {key.name: key for key in settings.auth.api_keys}
        secret = settings.auth.token_secret or secrets.token_urlsafe(32)
        self._secret = secret.encode()
        # Viewer tokens have their own signing key, so one can never pass for a session token.
        self._viewer_secret = hmac.new(self._secret, b"avatalk viewer token", hashlib.sha256).digest()
        self.default_ttl_s = settings.auth.token_ttl_s

    @property
    def open(self) -> bool:
        return not self.keys

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._secret, payload, hashlib.sha256).digest())

    def mint_token(self, principal: Principal, ttl_s: int | None = None) -> tuple[str, float]:
        expires = time.time() + (ttl_s or self.default_ttl_s)
        payload = json.dumps({"sub": principal.name, "exp": round(expires, 3), "scope": "session"}).encode()
        return f"{_b64(payload)}.{self._sign(payload)}", expires

    def verify_token(self, token: str) -> Principal:
        try:
            encoded, signature = token.split(".", 1)
            payload = _unb64(encoded)
        except (ValueError, TypeError) as error:
            raise AuthError(401, "malformed session token") from error
        if not hmac.compare_digest(signature, self._sign(payload)):
            raise AuthError(401, "invalid session token (bad signature)")
        claims = json.loads(payload)
        if claims.get("exp", 0) < time.time():
            raise AuthError(401, "the session token has expired; ask the site for a new one")
        key = self.by_name.get(claims.get("sub", ""))
        if key is None:
            raise AuthError(401, "the key that minted this session token no longer exists")
        return Principal(key.name, "token", key.max_sessions)

    def mint_viewer_token(self, session_id: str, ttl_s: int | None = None) -> tuple[str, float]:
        """A token that watches the render session ``session_id`` over WebRTC, and does nothing else."""
        expires = time.time() + (ttl_s or self.default_ttl_s)
        payload = json.dumps({"sid": session_id, "exp": round(expires, 3), "scope": "view"}).encode()
        signature = _b64(hmac.new(self._viewer_secret, payload, hashlib.sha256).digest())
        return f"{_b64(payload)}.{signature}", expires

    def verify_viewer_token(self, token: str | None, session_id: str | None) -> Principal:
        """The viewer of ``session_id`` (None: of any session) behind ``token``; ``AuthError`` for anything else."""
        if not token:
            raise AuthError(
                401, "watching a render session needs its viewer token (Authorization: Bearer TOKEN, or ?token=)"
            )
        try:
            encoded, signature = token.split(".", 1)
            payload = _unb64(encoded)
        except (ValueError, TypeError) as error:
            raise AuthError(401, "malformed viewer token") from error
        expected = _b64(hmac.new(self._viewer_secret, payload, hashlib.sha256).digest())
        if not hmac.compare_digest(signature, expected):
            raise AuthError(401, "invalid viewer token (bad signature, or not a viewer token)")
        claims = json.loads(payload)
        if claims.get("exp", 0) < time.time():
            raise AuthError(401, "the viewer token has expired; ask the render session's agent for a new one")
        watched = str(claims.get("sid", ""))
        if session_id is not None and watched != session_id:
            raise AuthError(403, "this viewer token is for another render session")
        return Principal(f"viewer:{watched}", "viewer", session_id=watched)

    def authenticate(self, credential: str | None, session_route: bool) -> Principal:
        """The caller behind ``credential`` (a key, or a token on session routes)."""
        if self.open:
            return Principal("open", "open")
        if not credential:
            raise AuthError(401, "an API key is required (Authorization: Bearer KEY, or X-API-Key)")
        key = self.keys.get(hash_key(credential))
        if key is not None:
            return Principal(key.name, "key", key.max_sessions)
        if "." in credential:
            principal = self.verify_token(credential)
            if not session_route:
                raise AuthError(403, "session tokens can only open conversations; use an API key for this route")
            return principal
        raise AuthError(401, "unknown API key")


@dataclass(frozen=True)
class Slot:
    """One job slot taken in a caller's window (given back when the request is refused)."""

    who: str
    at: float


class RateLimiter:
    """A sliding one-minute window per caller, for job creation: only accepted jobs count.

    A job-creating request takes a slot before it runs, so concurrent requests
    cannot overshoot the limit, and gives it back unless it is answered with a
    2xx (the job was queued): a 422, 415, 404 or 413 costs the caller nothing.
    """

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: defaultdict[str, deque[float]] = defaultdict(deque)

    def take(self, who: str) -> Slot | float:
        """A slot in ``who``'s window, or the seconds until one frees up."""
        now = time.monotonic()
        hits = self._hits[who]
        while hits and hits[0] <= now - 60.0:
            hits.popleft()
        if len(hits) >= self.per_minute:
            return 60.0 - (now - hits[0])
        hits.append(now)
        return Slot(who, now)

    def give_back(self, slot: Slot) -> None:
        """The request did not create a job: its slot is free again."""
        hits = self._hits[slot.who]
        if slot.at in hits:
            hits.remove(slot.at)

    def allow(self, who: str) -> float | None:
        """None when allowed (the slot is kept), else seconds until the next slot."""
        taken = self.take(who)
        return None if isinstance(taken, Slot) else taken


def _credential(scope: Scope) -> str | None:
    headers = {name.decode().lower(): value.decode() for name, value in scope.get("headers", [])}
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    if "x-api-key" in headers:
        return headers["x-api-key"].strip()
    # Browsers cannot set headers on a WebSocket, and pages get their token in the URL.
    for part in scope.get("query_string", b"").decode().split("&"):
        name, _, value = part.partition("=")
        if name in ("token", "key") and value:
            return value
    return None


class AuthMiddleware:
    """Puts the caller (``scope['state']['principal']``) on every request, or refuses it."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator, limiter: RateLimiter) -> None:
        self.app = app
        self.authenticator = authenticator
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/" or path.startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        viewer = VIEWER_PATH.match(path)
        if viewer is not None:
            try:
                principal = self.authenticator.verify_viewer_token(_credential(scope), viewer["session"])
            except AuthError as error:
                await _refuse(scope, send, error)
                return
            scope.setdefault("state", {})["principal"] = principal
            await self.app(scope, receive, send)
            return
        session_route = path.startswith(SESSION_PATHS)
        slot: Slot | None = None
        try:
            principal = self._authenticate(_credential(scope), path, session_route)
            method = scope.get("method", "")
            if any(method == m and path.startswith(p) for m, p in JOB_CREATING):
                taken = self.limiter.take(principal.name)
                if not isinstance(taken, Slot):
                    raise AuthError(429, f"too many jobs: the limit is {self.limiter.per_minute} a minute; retry in {taken:.0f} s")
                slot = taken
        except AuthError as error:
            await _refuse(scope, send, error)
            return
        scope.setdefault("state", {})["principal"] = principal
        if slot is None:
            await self.app(scope, receive, send)
            return
        accepted = False

        async def send_noting_status(message: Message) -> None:
            nonlocal accepted
            if message["type"] == "http.response.start":
                accepted = 200 <= int(message["status"]) < 300
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            if not accepted:  # refused, failed or abandoned: no job was created
                self.limiter.give_back(slot)

    def _authenticate(self, credential: str | None, path: str, session_route: bool) -> Principal:
        """The caller; a viewer token also reads ``VIEWER_READABLE`` (the page needs the ICE servers)."""
        try:
            return self.authenticator.authenticate(credential, session_route)
        except AuthError:
            if path in VIEWER_READABLE and credential:
                with contextlib.suppress(AuthError):
                    return self.authenticator.verify_viewer_token(credential, None)
            raise


async def _refuse(scope: Scope, send: Send, error: AuthError) -> None:
    if scope["type"] == "websocket":
        # Close before accepting: the client sees HTTP 403 on the upgrade (1008 = policy violation).
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
        return
    body = json.dumps({"detail": error.message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if error.status == 429:
        headers.append((b"retry-after", b"60"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
