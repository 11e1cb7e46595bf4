"""A real aiortc client calls the server over loopback: microphone in, avatar audio + video out."""

from __future__ import annotations

import asyncio
import fractions
import json
import re
import time

import av
import httpx
import numpy as np
import pytest
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCSessionDescription

from avatalk.media.audio import float_to_pcm16

pytestmark = pytest.mark.slow


class SpeechTrackForTest(MediaStreamTrack):
    """A microphone that says one thing at real-time pace, then stays silent."""

    kind = "audio"

    def __init__(self, audio_48k: np.ndarray) -> None:
        super().__init__()
        self.pcm = np.frombuffer(float_to_pcm16(audio_48k), dtype=np.int16)
        self.offset = 0
        self.started: float | None = None

    async def recv(self) -> av.AudioFrame:
        samples = 960  # 20 ms at 48 kHz
        if self.started is None:
            self.started = time.monotonic()
        due = self.started + self.offset / 48000
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = self.pcm[self.offset : self.offset + samples]
        chunk = np.pad(chunk, (0, samples - len(chunk)))
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.offset
        frame.time_base = fractions.Fraction(1, 48000)
        self.offset += samples
        return frame


class CallerForTest:
    """The browser's side of a call, in Python."""

    def __init__(self, microphone: MediaStreamTrack) -> None:
        self.pc = RTCPeerConnection()  # host candidates come from the server's loopback setting
        self.events: list[dict] = []
        self.audio: list[np.ndarray] = []
        self.frames: list[np.ndarray] = []
        self.tasks: list[asyncio.Task] = []
        self.pc.addTransceiver(microphone, direction="sendrecv")
        self.pc.addTransceiver("video", direction="recvonly")
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", lambda message: self.events.append(json.loads(message)))
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        async def pull() -> None:
            while True:
                try:
                    frame = await track.recv()
                except Exception:
                    return
                if track.kind == "audio":
                    self.audio.append(frame.to_ndarray().astype(np.float32).reshape(-1) / 32768.0)
                else:
                    self.frames.append(frame.to_ndarray(format="rgb24"))

        self.tasks.append(asyncio.create_task(pull()))

    async def offer(self) -> RTCSessionDescription:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription

    async def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if predicate(event):
                    return event
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no matching event; got {[e['type'] for e in self.events]}")

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.pc.close()


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(webrtc={"host_addresses": ["127.0.0.1"]}, limits={"max_sessions": 2})


def normalise(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", "", text.lower()).split()
    return " ".join({"2": "two", "4": "four"}.get(word, word) for word in words)


async def test_call_over_loopback(server, speech):
    question = np.concatenate([np.zeros(48000, np.float32), speech("What is two plus two?", 48000)])
    caller = CallerForTest(SpeechTrackForTest(question))
    try:
        offer = await caller.offer()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            reply = await http.post(
                "/v1/webrtc/offer", json={"sdp": offer.sdp, "type": offer.type, "greeting": False, "video_size": 256}
            )
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            assert "a=candidate" in answer["sdp"] and "127.0.0.1" in answer["sdp"]
            await caller.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

            final = await caller.wait_for(lambda e: e["type"] == "input_audio_transcription.completed", timeout=60)
            assert "what is two plus two" in normalise(final["transcript"])
            latency = await caller.wait_for(lambda e: e["type"] == "latency", timeout=60)
            assert latency["marks_ms"]["first_frame"] >= 0
            frames_at_speech = len(caller.frames)
            audio_at_speech = len(caller.audio)
            await caller.wait_for(lambda e: e["type"] == "response.done", timeout=60)
            speaking_frames = caller.frames[frames_at_speech:]
            reply_audio = np.concatenate(caller.audio[audio_at_speech:])
            assert np.sqrt(np.mean(reply_audio**2)) > 0.01  # the reply is audible
            assert len(speaking_frames) > 10
            assert max(speaking_frames[0].shape[:2]) == 256
            changes = [np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(speaking_frames, speaking_frames[1:])]
            assert max(changes) > 0.5  # the picture moves while the avatar speaks

            assert (await http.delete(f"/v1/webrtc/{answer['session_id']}")).status_code == 204
            assert (await http.delete(f"/v1/webrtc/{answer['session_id']}")).status_code == 404
    finally:
        await caller.close()


async def test_typed_message_over_the_data_channel(server):
    caller = CallerForTest(SpeechTrackForTest(np.zeros(48000, np.float32)))
    try:
        offer = await caller.offer()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            answer = (await http.post("/v1/webrtc/offer", json={"sdp": offer.sdp, "type": "offer", "greeting": False})).json()
        await caller.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        for _ in range(200):
            if caller.channel.readyState == "open":
                break
            await asyncio.sleep(0.05)
        caller.channel.send(json.dumps({"type": "conversation.item.create", "text": "Say hello."}))
        caller.channel.send("not json at all")
        error = await caller.wait_for(lambda e: e["type"] == "error")
        assert error["code"] == "invalid_json"
        caller.channel.send(b'{"type": "response.cancel"}')  # binary: not JSON text either
        second = await caller.wait_for(lambda e: e["type"] == "error" and e is not error)
        assert second["code"] == "invalid_json" and "binary" in second["message"]
        done = await caller.wait_for(lambda e: e["type"] == "response.done", timeout=60)
        assert done["status"] == "completed"
    finally:
        await caller.close()


async def test_signalling_errors_are_clear(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        config = (await http.get("/v1/webrtc/config")).json()
        assert config["ice_servers"] == [] and config["default_avatar"] == "ava"
        bad = await http.post("/v1/webrtc/offer", json={"sdp": "v=0\r\nm=audio 9\r\nm=video 9\r\ngarbage", "type": "offer"})
        assert bad.status_code == 400 and "SDP" in bad.json()["detail"]
        incomplete = await http.post("/v1/webrtc/offer", json={"sdp": "v=0\r\n", "type": "offer"})
        assert incomplete.status_code == 400
        caller = CallerForTest(SpeechTrackForTest(np.zeros(4800, np.float32)))
        try:
            offer = await caller.offer()
            unknown = await http.post("/v1/webrtc/offer", json={"sdp": offer.sdp, "type": "offer", "avatar": "nobody"})
            assert unknown.status_code == 404 and "nobody" in unknown.json()["detail"]
        finally:
            await caller.close()


async def test_one_call_too_many_is_refused(server):
    callers = [CallerForTest(SpeechTrackForTest(np.zeros(4800, np.float32))) for _ in range(3)]
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            statuses = []
            for caller in callers:
                offer = await caller.offer()
                response = await http.post("/v1/webrtc/offer", json={"sdp": offer.sdp, "type": "offer", "greeting": False})
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert "limit of 2" in response.json()["detail"]
                else:
                    answer = response.json()
                    await caller.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            assert statuses == [200, 200, 503]
    finally:
        for caller in callers:
            await caller.close()
