"""Watching a render session over WebRTC: the agent speaks over the WebSocket, a viewer (aiortc) watches.

The viewer here is a real aiortc peer on loopback (as in tests/test_webrtc.py)
and the agent the reference WebSocket client: the render session's ticks go
to both. Viewer tokens are checked on servers with and without API keys.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import websockets
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription
from test_auth import KEY, OTHER_KEY, keyed_settings

from avatalk.client import AvatalkClient
from avatalk.server.auth import Authenticator, Principal

pytestmark = pytest.mark.slow

RATE = 24000
LOUD_RMS = 0.05  # an audio frame this loud carries the agent's tone; silence is far below


def tone(seconds: float, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


class ViewerForTest:
    """The viewer's browser, in Python: receive-only audio and video, nothing sent back."""

    def __init__(self) -> None:
        self.pc = RTCPeerConnection()
        self.audio: list[np.ndarray] = []  # one decoded 20 ms frame each, mono float32
        self.frames: list[np.ndarray] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.pc.addTransceiver("audio", direction="recvonly")
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def pull() -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                if track.kind == "audio":
                    samples = frame.to_ndarray().astype(np.float32).reshape(-1, len(frame.layout.channels))
                    self.audio.append(samples[:, 0] / 32768.0)
                else:
                    self.frames.append(frame.to_ndarray(format="rgb24"))

        self.tasks.append(asyncio.create_task(pull()))

    async def offer(self) -> dict[str, str]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"sdp": self.pc.localDescription.sdp, "type": "offer"}

    async def answer(self, answer: dict[str, str]) -> None:
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    def loud_frames(self, since: int = 0) -> int:
        return sum(1 for chunk in self.audio[since:] if np.sqrt(np.mean(chunk**2)) > LOUD_RMS)

    async def until(self, condition, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                loud = self.loud_frames()
                raise TimeoutError(f"viewer: not met after {len(self.frames)} frames, {len(self.audio)} audio ({loud} loud)")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


async def open_render_session(url: str, **session: object) -> tuple[AvatalkClient, str]:
    agent = AvatalkClient(url)
    await agent.connect()
    created = await agent.wait_for(lambda e: e["type"] == "session.created")
    configured = await agent.configure(RATE, RATE, mode="render", **session)
    assert configured["type"] == "session.updated", configured
    return agent, created["session"]["id"]


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(webrtc={"host_addresses": ["127.0.0.1"], "max_viewers": 1})


async def test_a_viewer_watches_what_the_agent_sends_and_is_hung_up_when_the_session_ends(server) -> None:
    agent, session_id = await open_render_session(server.ws_url, video=True, video_size=128)
    viewer = ViewerForTest()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            minted = await http.post(f"/v1/webrtc/{session_id}/viewer-token", json={"ttl_s": 60})
            assert minted.status_code == 200, minted.text
            grant = minted.json()
            assert grant["viewers_path"] == f"/v1/webrtc/{session_id}/viewers" and grant["token"] in grant["page_path"]
            bearer = {"Authorization": f"Bearer {grant['token']}"}
            answered = await http.post(grant["viewers_path"], json=await viewer.offer(), headers=bearer)
            assert answered.status_code == 200, answered.text
            await viewer.answer(answered.json())

            # One viewer is this server's limit (webrtc.max_viewers): a second one is refused, clearly.
            second = ViewerForTest()
            try:
                refused = await http.post(grant["viewers_path"], json=await second.offer(), headers=bearer)
                assert refused.status_code == 409 and "max_viewers" in refused.json()["detail"]
            finally:
                await second.close()

            # Idle frames flow while the agent is silent, and the sound is silence.
            await viewer.until(lambda: len(viewer.frames) >= 10 and len(viewer.audio) >= 10)
            assert viewer.loud_frames() == 0
            idle = viewer.frames[-1].astype(int)
            audio_before, frames_before = len(viewer.audio), len(viewer.frames)

            speech = tone(1.0)
            for start in range(0, len(speech), 480):  # 20 ms frames, as fast as the agent likes
                await agent.send_audio(speech[start : start + 480])
            await agent.send_event("output_audio_buffer.commit")
            stopped = await agent.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
            assert stopped["end_tick"] - stopped["start_tick"] == 25  # the agent gets its ticks as before

            # The viewer hears the second of tone (20 ms Opus frames) and sees the avatar speak.
            await viewer.until(lambda: viewer.loud_frames(audio_before) >= 45)
            await asyncio.sleep(0.5)
            assert 45 <= viewer.loud_frames(audio_before) <= 55
            moved = [np.abs(frame.astype(int) - idle).mean() for frame in viewer.frames[frames_before:]]
            assert max(moved) > 1.0

            # The agent hangs up: the session ends, and its viewer is hung up by the server.
            await agent.close()
            await viewer.until(lambda: viewer.pc.connectionState in ("closed", "failed"), timeout=30)
            gone = await http.delete(f"/v1/webrtc/{session_id}/viewers/{answered.json()['viewer_id']}", headers=bearer)
            assert gone.status_code == 404
    finally:
        await viewer.close()
        await agent.close()


async def test_viewer_tokens_are_checked_and_only_render_sessions_with_video_are_watched(server) -> None:
    conversation = AvatalkClient(server.ws_url)
    await conversation.connect()
    created = await conversation.wait_for(lambda e: e["type"] == "session.created")
    await conversation.configure(16000, RATE)
    silent_agent, silent_id = await open_render_session(server.ws_url)  # no video: nothing to watch
    agent, session_id = await open_render_session(server.ws_url, video=True, video_size=128)
    viewer = ViewerForTest()
    authenticator: Authenticator = server.app.state.services.authenticator
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            unknown = await http.post("/v1/webrtc/nobody.123/viewer-token", json={})
            assert unknown.status_code == 404 and "no render session" in unknown.json()["detail"]
            not_render = await http.post(f"/v1/webrtc/{created['session']['id']}/viewer-token", json={})
            assert not_render.status_code == 409 and "not a render session" in not_render.json()["detail"]
            no_video = await http.post(f"/v1/webrtc/{silent_id}/viewer-token", json={})
            assert no_video.status_code == 409 and "no video" in no_video.json()["detail"]

            offer = await viewer.offer()
            path = f"/v1/webrtc/{session_id}/viewers"
            missing = await http.post(path, json=offer)
            assert missing.status_code == 401 and "viewer token" in missing.json()["detail"]
            other, _ = authenticator.mint_viewer_token(silent_id)
            wrong_session = await http.post(path, json=offer, params={"token": other})
            assert wrong_session.status_code == 403 and "another render session" in wrong_session.json()["detail"]
            expired, _ = authenticator.mint_viewer_token(session_id, ttl_s=-1)
            late = await http.post(path, json=offer, params={"token": expired})
            assert late.status_code == 401 and "expired" in late.json()["detail"]
            token, _ = authenticator.mint_viewer_token(session_id)
            forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
            bad = await http.post(path, json=offer, params={"token": forged})
            assert bad.status_code == 401 and "signature" in bad.json()["detail"]
            session_token, _ = authenticator.mint_token(Principal("open", "key"))  # a session token is no viewer token
            not_viewer = await http.post(path, json=offer, params={"token": session_token})
            assert not_viewer.status_code == 401

            audio_only = await http.post(path, json={"type": "offer", "sdp": "v=0\r\nm=audio 9\r\n"}, params={"token": token})
            assert audio_only.status_code == 400 and "video" in audio_only.json()["detail"]
            garbage = await http.post(
                path, json={"type": "offer", "sdp": "v=0\r\nm=audio 9\r\nm=video 9\r\ngarbage"}, params={"token": token}
            )
            assert garbage.status_code == 400 and "SDP" in garbage.json()["detail"]
            assert not server.app.state.services.webrtc_viewers  # nothing was left behind by the refusals

            answered = await http.post(path, json=offer, params={"token": token})
            assert answered.status_code == 200, answered.text
            viewer_id = answered.json()["viewer_id"]
            assert (await http.delete(f"{path}/{viewer_id}", params={"token": other})).status_code == 403
            assert (await http.delete(f"{path}/{viewer_id}", params={"token": token})).status_code == 204
            assert (await http.delete(f"{path}/{viewer_id}", params={"token": token})).status_code == 404
    finally:
        await viewer.close()
        for client in (agent, silent_agent, conversation):
            await client.close()


@pytest.fixture(scope="module")
def keyed_server(live_server_factory):
    settings = keyed_settings()
    return live_server_factory(auth=settings.auth.model_dump(), webrtc={"host_addresses": ["127.0.0.1"]})


async def test_with_api_keys_only_the_sessions_key_mints_and_a_viewer_token_opens_nothing_else(keyed_server) -> None:
    agent, session_id = await open_render_session(f"{keyed_server.ws_url}?key={KEY}", video=True, video_size=128)
    try:
        async with httpx.AsyncClient(base_url=keyed_server.base_url, timeout=30) as http:
            mint = f"/v1/webrtc/{session_id}/viewer-token"
            assert (await http.post(mint, json={})).status_code == 401
            stranger = await http.post(mint, json={}, headers={"X-API-Key": OTHER_KEY})
            assert stranger.status_code == 403 and "another key" in stranger.json()["detail"]
            session_token = (await http.post("/v1/tokens", json={}, headers={"X-API-Key": KEY})).json()["token"]
            by_token = await http.post(mint, json={}, params={"token": session_token})
            assert by_token.status_code == 403 and "API key" in by_token.json()["detail"]
            minted = await http.post(mint, json={"ttl_s": 30}, headers={"X-API-Key": KEY})
            assert minted.status_code == 200, minted.text
            token = minted.json()["token"]

            # The page may read the ICE servers with it; nothing else opens.
            assert (await http.get("/v1/webrtc/config", params={"token": token})).status_code == 200
            assert (await http.get("/v1/avatars", params={"token": token})).status_code == 401
            offer = {"type": "offer", "sdp": "v=0\r\nm=audio 9\r\nm=video 9\r\n"}
            assert (await http.post("/v1/webrtc/offer", json=offer, params={"token": token})).status_code == 401
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(f"{keyed_server.ws_url}?token={token}"):
                    pass
            assert refused.value.response.status_code == 403
            # A key is no viewer token either: the viewer routes take that session's viewer token only.
            viewers = f"/v1/webrtc/{session_id}/viewers"
            assert (await http.post(viewers, json=offer, headers={"X-API-Key": KEY})).status_code == 401
            viewer = ViewerForTest()
            try:
                answered = await http.post(viewers, json=await viewer.offer(), params={"token": token})
                assert answered.status_code == 200, answered.text
            finally:
                await viewer.close()
    finally:
        await agent.close()
