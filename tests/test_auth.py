"""Access control and limits: keys, session tokens, the loopback rule, CORS, rates, timeouts."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import websockets

from avatalk.client import AvatalkClient
from avatalk.config import Settings
from avatalk.server.auth import AuthError, Authenticator, Principal, RateLimiter, Slot, check_exposure, hash_key

KEY = "site-backend-key-0123456789"
OTHER_KEY = "another-key-abcdefghijklmnop"


def keyed_settings(**overrides) -> Settings:
    return Settings(
        auth={
            "api_keys": [
                {"name": "site", "sha256": hash_key(KEY), "max_sessions": 1},
                {"name": "other", "sha256": hash_key(OTHER_KEY)},
            ],
            "token_secret": "a-test-secret-of-some-length",
            "cors_origins": ["https://tutor.example"],
        },
        **overrides,
    )


def test_keys_are_checked_by_hash():
    auth = Authenticator(keyed_settings())
    assert auth.authenticate(KEY, session_route=False) == Principal("site", "key", 1)
    with pytest.raises(AuthError) as missing:
        auth.authenticate(None, session_route=False)
    assert missing.value.status == 401
    with pytest.raises(AuthError, match="unknown API key"):
        auth.authenticate("wrong", session_route=False)


def test_tokens_open_sessions_only_and_expire():
    auth = Authenticator(keyed_settings())
    token, expires = auth.mint_token(Principal("site", "key", 1), ttl_s=60)
    assert expires > time.time()
    assert auth.authenticate(token, session_route=True).kind == "token"
    with pytest.raises(AuthError) as management:
        auth.authenticate(token, session_route=False)
    assert management.value.status == 403
    expired, _ = auth.mint_token(Principal("site", "key", 1), ttl_s=-1)
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(expired, session_route=True)


def test_forged_tokens_are_refused():
    auth = Authenticator(keyed_settings())
    token, _ = auth.mint_token(Principal("site", "key", 1))
    payload, signature = token.split(".")
    with pytest.raises(AuthError, match="signature"):
        auth.verify_token(f"{payload}.{signature[:-2]}AA")
    other_settings = keyed_settings()
    other_settings.auth.token_secret = "a-different-secret-entirely"
    other_server = Authenticator(other_settings)
    forged, _ = other_server.mint_token(Principal("site", "key"))
    with pytest.raises(AuthError):
        auth.verify_token(forged)
    with pytest.raises(AuthError, match="malformed"):
        auth.verify_token("no-dot-here")


def test_open_server_only_on_loopback():
    check_exposure(Settings(host="127.0.0.1"))
    check_exposure(Settings(host="::1"))
    with pytest.raises(RuntimeError, match="without API keys"):
        check_exposure(Settings(host="0.0.0.0"))
    check_exposure(Settings(host="0.0.0.0", auth={"allow_open_network": True}))
    check_exposure(keyed_settings(host="0.0.0.0"))


def test_rate_limiter_window():
    limiter = RateLimiter(2)
    assert limiter.allow("a") is None and limiter.allow("a") is None
    assert limiter.allow("a") > 0
    assert limiter.allow("b") is None


@pytest.fixture(scope="module")
def server(live_server_factory):
    settings = keyed_settings()
    return live_server_factory(auth=settings.auth.model_dump(), limits={"jobs_per_minute": 2, "max_sessions": 4})


async def test_rest_needs_a_key(server):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/")).status_code == 200  # the page itself is public
        refused = await http.get("/v1/avatars")
        assert refused.status_code == 401 and "API key" in refused.json()["detail"]
        assert (await http.get("/v1/avatars", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await http.get("/v1/avatars", headers={"X-API-Key": KEY})).status_code == 200


async def test_tokens_minted_by_a_key_open_a_websocket(server):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        minted = await http.post("/v1/tokens", json={"ttl_s": 60}, headers={"Authorization": f"Bearer {KEY}"})
        assert minted.status_code == 200, minted.text
        token = minted.json()["token"]
        # A token cannot mint tokens or manage avatars.
        assert (await http.post("/v1/tokens", json={}, headers={"Authorization": f"Bearer {token}"})).status_code == 403
        assert (await http.get("/v1/avatars", headers={"Authorization": f"Bearer {token}"})).status_code == 403
        assert (await http.get("/v1/webrtc/config", params={"token": token})).status_code == 200

    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(server.ws_url):
            pass
    assert refused.value.response.status_code == 403

    client = AvatalkClient(f"{server.ws_url}?token={token}")
    await client.connect()
    try:
        assert (await client.configure())["type"] == "session.updated"
        # The key allows one session at a time.
        second = AvatalkClient(f"{server.ws_url}?token={token}")
        await second.connect()
        error = await second.wait_for(lambda e: e["type"] == "error")
        assert error["code"] == "server_full" and "'site'" in error["message"]
        await second.close()
        # Another key is not affected by that limit.
        third = AvatalkClient(f"{server.ws_url}?key={OTHER_KEY}")
        await third.connect()
        assert (await third.configure())["type"] == "session.updated"
        await third.close()
    finally:
        await client.close()


def test_rate_limiter_gives_back_the_slot_of_a_refused_request():
    limiter = RateLimiter(1)
    slot = limiter.take("a")
    assert isinstance(slot, Slot)
    assert isinstance(limiter.take("a"), float)  # the one slot is taken: seconds to wait
    limiter.give_back(slot)
    assert isinstance(limiter.take("a"), Slot)


async def test_only_accepted_jobs_count_toward_the_job_rate_limit(server):
    """jobs_per_minute is 2: refused requests (404, 415, 422) cost nothing; the third accepted job is 429."""
    headers = {"X-API-Key": OTHER_KEY}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as http:
        refused = []
        for _ in range(3):
            refused.append((await http.post("/v1/renders", json={"avatar": "nobody", "text": "hi"})).status_code)
            refused.append((await http.post("/v1/renders", json={"avatar": "ava", "text": "hi", "size": 101})).status_code)
            not_media = await http.post(
                "/v1/avatars", data={"id": "notes"}, files={"file": ("notes.txt", b"just some text " * 20, "text/plain")}
            )
            refused.append(not_media.status_code)
        assert refused == [404, 422, 415] * 3
        accepted = [
            (await http.post("/v1/renders", json={"avatar": "ava", "text": "Hi.", "size": 64})).status_code
            for _ in range(2)
        ]
        assert accepted == [202, 202]
        response = await http.post("/v1/renders", json={"avatar": "ava", "text": "Hi.", "size": 64})
        assert response.status_code == 429
        assert "limit" in response.json()["detail"] and response.headers["retry-after"]
        # Another key has its own window.
        other = await http.post(
            "/v1/renders", json={"avatar": "ava", "text": "Hi.", "size": 64}, headers={"X-API-Key": KEY}
        )
        assert other.status_code == 202


async def test_cors_allow_list(server):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        allowed = await http.options(
            "/v1/tokens", headers={"Origin": "https://tutor.example", "Access-Control-Request-Method": "POST"}
        )
        assert allowed.headers.get("access-control-allow-origin") == "https://tutor.example"
        other = await http.options(
            "/v1/tokens", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert other.headers.get("access-control-allow-origin") is None


async def test_idle_sessions_are_closed(live_server_factory):
    server = live_server_factory(limits={"idle_timeout_s": 1.0})
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.configure()
        error = await client.wait_for(lambda e: e["type"] == "error", timeout=10)
        assert error["code"] == "idle_timeout" and error["fatal"]
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 1008
    finally:
        await client.close()


async def test_an_expired_token_is_refused_when_connecting(server):
    """Checked at connection time: the WebSocket upgrade gets 403, WebRTC signalling 401."""
    expired, _ = Authenticator(keyed_settings()).mint_token(Principal("site", "key", 1), ttl_s=-1)
    fresh, _ = Authenticator(keyed_settings()).mint_token(Principal("site", "key", 1), ttl_s=60)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}?token={expired}"):
            pass
    assert refused.value.response.status_code == 403
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        offer = {"type": "offer", "sdp": "v=0\r\nm=audio 9\r\nm=video 9\r\n"}
        config = await http.get("/v1/webrtc/config", params={"token": expired})
        assert config.status_code == 401 and "expired" in config.json()["detail"]
        answer = await http.post("/v1/webrtc/offer", params={"token": expired}, json=offer)
        assert answer.status_code == 401 and "expired" in answer.json()["detail"]
        # The same request with a token that has not expired passes the check (and fails on the fake SDP).
        assert (await http.get("/v1/webrtc/config", params={"token": fresh})).status_code == 200
        assert (await http.post("/v1/webrtc/offer", params={"token": fresh}, json=offer)).status_code == 400
    # A session outlives its token: the token is only checked when connecting.
    short, expires = Authenticator(keyed_settings()).mint_token(Principal("site", "key", 1), ttl_s=1)
    client = AvatalkClient(f"{server.ws_url}?token={short}")
    await client.connect()
    try:
        while time.time() <= expires:
            await asyncio.sleep(0.1)
        assert (await client.configure())["type"] == "session.updated"
        assert not client.closed.is_set()
    finally:
        await client.close()


async def test_a_server_without_keys_mints_no_tokens(live_server_factory):
    open_server = live_server_factory()
    async with httpx.AsyncClient(base_url=open_server.base_url) as http:
        response = await http.post("/v1/tokens", json={"ttl_s": 60})
        assert response.status_code == 400 and "no API keys" in response.json()["detail"]
    client = AvatalkClient(open_server.ws_url)  # and needs none
    await client.connect()
    try:
        assert (await client.configure())["type"] == "session.updated"
    finally:
        await client.close()
