"""End to end through the real WebSocket, with the real embedded models."""

from __future__ import annotations

import asyncio
import signal
import logging
import re

import httpx
import numpy as np
import pytest
from cluster_parts import FakeLLMServer, Node
from fakes import free_port

from avatalk.client import AvatalkClient, talk
from avatalk.media.audio import rms_dbfs, write_wav
from avatalk.server.services import services
from avatalk.streaming.models import EngineModels

pytestmark = pytest.mark.slow

LONG_GREETING = (
    "Hello and welcome! I am your assistant for today, and I am going to talk for quite a while now, "
    "so that there is plenty of time to interrupt me in the middle of this rather long greeting. "
    "Feel free to say something whenever you like, and I will stop talking straight away."
)


def normalise(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", "", text.lower()).split()
    return " ".join({"2": "two", "4": "four"}.get(word, word) for word in words)


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(limits={"max_sessions": 6})


async def open_session(url: str, **session) -> AvatalkClient:
    client = AvatalkClient(url)
    await client.connect()
    await client.wait_for(lambda e: e["type"] == "session.created")
    configured = await client.configure(**session)
    assert configured["type"] == "session.updated", configured
    return client


async def test_health_and_readiness(server):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_spoken_question_gets_a_spoken_answer(server, speech, tmp_path):
    question = np.concatenate([np.zeros(8000, np.float32), speech("What is two plus two?")])
    wav = tmp_path / "question.wav"
    write_wav(wav, question, 16000)
    result = await talk(server.ws_url, wav, timeout=90)
    assert "what is two plus two" in normalise(result.transcript)
    assert result.reply.strip()
    assert result.audio_seconds > 0.5
    assert rms_dbfs(result.audio) > -35.0
    for mark in ("asr_final", "llm_first_token", "tts_first_audio", "first_audio"):
        assert result.latency_ms[mark] >= 0, mark
    assert result.latency_ms["first_audio"] >= result.latency_ms["tts_first_audio"]
    kinds = [event["type"] for event in result.events]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "latency", "state"):
        assert kind in kinds, kind


async def test_typed_input_and_greeting(server):
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": "Hi there, nice to meet you."})
    try:
        greeting = await client.wait_for(lambda e: e["type"] == "response.done", timeout=60)
        assert greeting["status"] == "completed" and greeting["text"] == "Hi there, nice to meet you."
        assert len(client.audio) > 10
        mark = len(client.events)
        await client.send_event("conversation.item.create", text="Say hello.")
        done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=60)
        assert done["status"] == "completed"
        deltas = [e["delta"] for e in client.events[mark:] if e["type"] == "response.text.delta"]
        assert "".join(deltas).strip()
        states = [e["state"] for e in client.events[mark:] if e["type"] == "state"]
        assert states[:3] == ["thinking", "speaking", "listening"]
    finally:
        await client.close()


async def test_barge_in_stops_reply_audio(server, speech):
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": LONG_GREETING})
    try:
        first = await client.wait_for(lambda e: e["type"] == "latency", timeout=60)
        while len(client.audio) < 25:  # a second of the reply played: the avatar is mid-sentence
            await asyncio.sleep(0.02)
        mark = len(client.events)
        interruption = asyncio.create_task(
            client.wait_for(lambda e: e["type"] == "response.interrupted", since=mark, timeout=30)
        )
        await client.stream_audio(speech("Stop, please wait a moment."), 16000)
        event = await interruption
        assert event["turn_id"] == first["turn_id"] and event["reason"] == "barge_in"
        spoken = event["spoken_text"]
        assert spoken and LONG_GREETING.startswith(spoken) and len(spoken) < len(LONG_GREETING)
        # Reply audio stops: between the interruption and the reply to the new turn, at most the
        # tick or two that were in flight arrive (socket order, not time).
        await client.stream_audio(np.zeros(16000, np.float32), 16000)  # the microphone stays open
        created = await client.wait_for(lambda e: e["type"] == "response.created", since=mark, timeout=60)
        assert created["turn_id"] != first["turn_id"]
        late = [c for c in client.audio if event["_received_at"] < c.received_at < created["_received_at"]]
        assert len(late) <= 2, len(late)
    finally:
        await client.close()


async def test_bad_input_gets_clear_errors_and_the_session_lives_on(server):
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")

        async def expect_error(payload, code):
            mark = len(client.events)
            await client.send_raw(payload)
            error = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=10)
            assert error["code"] == code, error
            assert error["message"]

        await expect_error(b"\x00\x01" * 160, "audio_before_configuration")
        await expect_error(b"\x00" * 301, "audio_before_configuration")  # configuration is checked first
        await expect_error("this is not json", "invalid_json")
        await expect_error("[1, 2]", "invalid_json")  # JSON, but not an object
        await expect_error('{"type": 123}', "missing_type")
        await expect_error('{"type": "make.coffee"}', "unknown_event")
        await expect_error('{"type": "session.update", "session": 7}', "invalid_event")
        await expect_error('{"type": "conversation.item.create", "text": "   "}', "invalid_event")
        await expect_error('{"type": "session.update", "session": {}}', "invalid_session_config")
        await expect_error('{"type": "session.update", "session": {"input_sample_rate": 12345}}', "invalid_session_config")
        for bad in ('"video_size": 101', '"video_size": -4', '"video_size": 99999', '"video_size": "big"',
                    '"input_sample_rate": "fast"', '"persona": "grumpy"'):
            await expect_error('{"type": "session.update", "session": {"input_sample_rate": 16000, ' + bad + "}}",
                               "invalid_session_config")
        await expect_error('{"type": "conversation.item.create", "text": "hi"}', "not_configured")
        await expect_error('{"type": "conversation.item.create", "text": "' + "x" * (65 * 1024) + '"}', "frame_too_large")
        configured = await client.configure(16000, 24000)
        assert configured["type"] == "session.updated"
        await expect_error(b"\x00" * 301, "invalid_audio")
        await expect_error(b"\x00" * (300 * 1024), "frame_too_large")
        await expect_error('{"type": "session.update", "session": {"input_sample_rate": 48000}}', "invalid_session_config")
        await expect_error('{"type": "session.update", "session": {"video": true}}', "invalid_session_config")
        await expect_error('{"type": "conversation.item.create", "text": "' + "x" * 2001 + '"}', "text_too_long")
        await expect_error('{"type": "response.cancel"}', "no_response")
        # Still a working session.
        mark = len(client.events)
        await client.send_event("conversation.item.create", text="Hello!")
        done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=60)
        assert done["status"] == "completed"
    finally:
        await client.close()


@pytest.mark.parametrize("payload", [b"\x00" * (5 * 1024 * 1024), "x" * (5 * 1024 * 1024)], ids=["binary", "text"])
async def test_message_above_the_hard_cap_closes_cleanly(server, payload):
    """Over 4 MiB the hard cap wins over the 64 KiB / 256 KiB frame rules: a close with 1009, no error event."""
    client = await open_session(server.ws_url)
    mark = len(client.events)
    await client.send_raw(payload)
    await asyncio.wait_for(client.closed.wait(), 10)
    assert client.close_code == 1009
    assert [e for e in client.events[mark:] if e["type"] == "error"] == []
    other = await open_session(server.ws_url)
    await other.close()


class RecordsForTest(logging.Handler):
    """Keeps every record (uvicorn's loggers do not propagate to the root logger, so caplog misses them)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_invalid_utf8_closes_with_1007_and_logs_one_warning_line(server):
    """A client's mistake: uvicorn closes with 1007; the log has a WARNING without a traceback, no ERROR."""
    import websockets

    handler = RecordsForTest()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        async with websockets.connect(server.ws_url) as ws:
            await ws.recv()  # session.created
            await ws.send(b'{"type": "\xff\xfe"}', text=True)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await ws.recv()
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
    records = [r for r in handler.records if "UTF-8" in r.getMessage()]
    assert [(r.levelno, r.exc_info, r.exc_text) for r in records] == [(logging.WARNING, None, None)]
    assert [r.getMessage() for r in handler.records if r.levelno >= logging.ERROR] == []


async def test_protocol_mistakes_are_logged_as_warnings_without_tracebacks(server, caplog):
    client = await open_session(server.ws_url)
    try:
        with caplog.at_level(logging.WARNING):
            mark = len(client.events)
            await client.send_raw('{"type": "make.coffee"}')
            await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=10)
    finally:
        await client.close()
    mistakes = [r for r in caplog.records if "unknown_event" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in mistakes] == [(logging.WARNING, None)]


async def test_client_disconnecting_mid_reply_frees_its_slot(server):
    sessions = services(server.app).sessions
    before = sessions.active
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": LONG_GREETING})
    await client.wait_for(lambda e: e["type"] == "latency", timeout=60)
    assert sessions.active == before + 1
    client._ws.transport.abort()  # vanish without a closing handshake
    await client.close()
    for _ in range(600):  # a guard against hanging, not a deadline the server must meet
        if sessions.active == before:
            break
        await asyncio.sleep(0.05)
    assert sessions.active == before
    survivor = await open_session(server.ws_url)
    mark = len(survivor.events)
    await survivor.send_event("conversation.item.create", text="Are you still there?")
    done = await survivor.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=60)
    assert done["status"] == "completed"
    await survivor.close()


async def test_full_server_refuses_clearly(live_server_factory):
    small = live_server_factory(limits={"max_sessions": 1})
    first = await open_session(small.ws_url)
    refused = AvatalkClient(small.ws_url)
    await refused.connect()
    error = await refused.wait_for(lambda e: e["type"] == "error")
    assert error["code"] == "server_full" and "limit of 1" in error["message"]
    await asyncio.wait_for(refused.closed.wait(), 10)
    assert refused.close_code == 1013
    await first.close()




async def test_dead_llm_server_is_an_error_event_not_a_crash(live_server_factory, engine_models):
    from avatalk.llm.openai_compatible import OpenAICompatibleLLM

    dead = OpenAICompatibleLLM(base_url=f"http://127.0.0.1:{free_port()}/v1", model="x", timeout_s=2.0)
    models = EngineModels(vad=engine_models.vad, asr=engine_models.asr, llm=dead, tts=engine_models.tts)
    server = live_server_factory(models=models)
    client = await open_session(server.ws_url)
    try:
        for _attempt in range(2):
            mark = len(client.events)
            await client.send_event("conversation.item.create", text="Hello?")
            error = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=30)
            assert error["code"] == "llm_error" and "127.0.0.1" in error["message"]
            failed = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=30)
            assert failed["status"] == "failed"
            # The user hears the persona's fallback instead of silence.
            fallback = await client.wait_for(
                lambda e: e["type"] == "response.done" and e["turn_id"] != failed["turn_id"], since=mark, timeout=30
            )
            assert fallback["status"] == "completed" and fallback["text"].startswith("Sorry")
    finally:
        await client.close()


class SilentLLMForTest:
    """An LLM that never answers: the session must fail over, not hang."""

    name = "silent"

    async def stream(self, messages, session_key=None):
        await asyncio.sleep(3600)
        yield ""

    def count_tokens(self, text: str) -> int:
        return len(text) // 4 + 1

    async def aclose(self) -> None:
        return None


async def test_slow_llm_times_out_to_the_fallback(live_server_factory, engine_models):
    models = EngineModels(vad=engine_models.vad, asr=engine_models.asr, llm=SilentLLMForTest(), tts=engine_models.tts)
    server = live_server_factory(models=models, llm={"first_token_timeout_s": 1.0})
    client = await open_session(server.ws_url)
    try:
        await client.send_event("conversation.item.create", text="Hello?")
        error = await client.wait_for(lambda e: e["type"] == "error", timeout=30)
        assert error["code"] == "llm_error" and "within" in error["message"]
        spoken = await client.wait_for(lambda e: e["type"] == "response.done" and e["status"] == "completed", timeout=30)
        assert spoken["text"].startswith("Sorry") and client.audio
    finally:
        await client.close()


async def test_slow_renderer_degrades_to_idle_frames(live_server_factory, engine_models):
    """A renderer slower than real time: idle frames go out on time, audio is complete, a warning arrives."""
    import time as clock

    from avatalk.avatars.renderers import create_renderer
    from avatalk.avatars.renderers.base import RendererSession

    class SlowRendererForTest:
        name = "slow"

        def __init__(self) -> None:
            self.inner = create_renderer("classic")

        def open(self, avatar, output_size):
            session = self.inner.open(avatar, output_size)

            class Slow(RendererSession):
                output_shape = session.output_shape
                idle_frame = staticmethod(session.idle_frame)
                reset = staticmethod(session.reset)

                @staticmethod
                def render(tick, audio):
                    clock.sleep(0.2)  # five times slower than real time
                    return session.render(tick, audio)

            return Slow()

    models = EngineModels(
        vad=engine_models.vad, asr=engine_models.asr, llm=engine_models.llm, tts=engine_models.tts,
        renderer=SlowRendererForTest(),
    )
    server = live_server_factory(models=models)
    client = await open_session(server.ws_url, video=True, video_size=128, greeting=True, persona={"greeting": "Hello there, how are you?"})
    try:
        done = await client.wait_for(lambda e: e["type"] == "response.done", timeout=60)
        assert done["status"] == "completed"
        warning = await client.wait_for(lambda e: e["type"] == "warning", timeout=5)
        assert warning["code"] == "renderer_behind" and warning["late_frames"] > 0
        audio_ticks = {chunk.tick for chunk in client.audio}
        frame_ticks = {frame.tick for frame in client.frames}
        assert audio_ticks <= frame_ticks  # every audio tick still has a frame, sent on time
    finally:
        await client.close()
        await client.close()


async def test_video_session_sends_one_frame_per_audio_tick(server, speech, tmp_path):
    import av


    question = np.concatenate([np.zeros(8000, np.float32), speech("What is two plus two?")])
    wav = tmp_path / "question.wav"
    write_wav(wav, question, 16000)
    video = tmp_path / "reply.mp4"
    result = await talk(server.ws_url, wav, timeout=90, video_out=video, video_size=256)
    assert result.latency_ms["first_frame"] >= result.latency_ms["tts_first_audio"]
    # 25 frames per second of reply audio: every reply tick carries one frame.
    reply_ticks = round(result.audio_seconds * 25)
    assert result.frames == reply_ticks > 10
    with av.open(str(video)) as container:
        streams = {stream.type: stream for stream in container.streams}
        assert set(streams) == {"video", "audio"}
        assert streams["video"].codec_context.width == 256 or streams["video"].codec_context.height == 256
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == result.frames


async def test_video_frames_follow_the_clock_while_idle(server):
    from avatalk.media.images import decode_jpeg

    client = await open_session(server.ws_url, video=True, video_size=128)
    try:
        while len(client.frames) < 25:  # a second of idle frames (a guard, not a measurement)
            await asyncio.sleep(0.02)
        ticks = [frame.tick for frame in client.frames]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))  # one frame per tick, none skipped
        image = decode_jpeg(client.frames[-1].jpeg)
        assert max(image.shape[:2]) == 128 and image.shape[2] == 3
        assert not client.audio  # idle: pictures but no sound
    finally:
        await client.close()


async def test_unknown_avatar_is_a_clear_error(server):
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")
        error = await client.configure(avatar="nobody-here")
        assert error["type"] == "error" and error["code"] == "unknown_avatar"
        error = await client.configure(avatar="../etc")  # cannot be an avatar id: names no avatar either
        assert error["type"] == "error" and error["code"] == "unknown_avatar"
        error = await client.configure(avatar="x" * 500)
        assert error["type"] == "error" and error["code"] == "unknown_avatar"
        # Still not configured, and a good update works.
        assert (await client.configure(avatar="ava", video_size=128))["type"] == "session.updated"
    finally:
        await client.close()


SHUTDOWN_GREETING = (
    "Hello and welcome! I am going to keep talking for a few more seconds, "
    "so that the server is asked to stop in the middle of this sentence."
)


async def test_sigterm_drains_a_reply_in_progress_then_closes(tmp_path):
    """``avatalk serve`` gets SIGTERM during a reply: the event, the rest of the reply's audio, then close 1012.

    A real server process and a real signal: uvicorn alone would close the
    socket with 1012 at once, before any event or audio.
    """
    llm = FakeLLMServer()  # the greeting is fixed text: the LLM is only warmed up
    settings = {
        "AVATALK_DATA_DIR": str(tmp_path / "data"),
        "AVATALK_LIMITS__DRAIN_S": "60",
        "AVATALK_LLM__BACKEND": "openai",
        "AVATALK_LLM__OPENAI__BASE_URL": llm.base_url,
    }
    node = Node("solo", tmp_path / "node", settings)
    node.start()
    try:
        await asyncio.to_thread(node.wait_ready)
        client = await open_session(node.ws_url, greeting=True, persona={"greeting": SHUTDOWN_GREETING})
        for _ in range(3000):  # until the reply is playing
            if client.audio:
                break
            await asyncio.sleep(0.02)
        assert client.audio, "the greeting never started playing"
        node.signal(signal.SIGTERM)
        notice = await client.wait_for(lambda e: e["type"] == "error" and e["code"] == "server_shutdown", timeout=30)
        async with httpx.AsyncClient(base_url=node.base_url) as http:  # the node takes no new session now
            ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        late = AvatalkClient(node.ws_url)
        await late.connect()
        refused = await late.wait_for(lambda e: e["type"] == "error", timeout=30)
        assert refused["code"] == "server_shutdown"
        await asyncio.wait_for(late.closed.wait(), 30)
        await asyncio.wait_for(client.closed.wait(), 90)
        assert client.close_code == 1012  # service restart, sent by the app after the drain
        kinds = [e["type"] for e in client.events]
        at_notice = client.events.index(notice)
        done = [i for i, e in enumerate(client.events) if e["type"] == "response.done"]
        assert len(done) == 1 and done[0] > at_notice, kinds  # the reply ended after the notice...
        finished = client.events[done[0]]
        assert finished["status"] == "completed" and finished["text"] == SHUTDOWN_GREETING  # ...whole
        after_notice = [chunk for chunk in client.audio if chunk.received_at > notice["_received_at"]]
        assert len(after_notice) > 10  # its audio went on playing after the notice
        assert await asyncio.to_thread(node.wait_exit, 60) in (0, -signal.SIGTERM)
    finally:
        node.stop()
        llm.stop()


def test_cli_talk_json_prints_one_json_object(server, speech, tmp_path):
    """``avatalk talk --json``: exactly one JSON object with the documented fields, and the reply saved with --out."""
    import json

    from typer.testing import CliRunner

    from avatalk.cli import app as cli_app
    from avatalk.media.audio import read_wav

    question = np.concatenate([np.zeros(8000, np.float32), speech("What is two plus two?")])
    wav, out = tmp_path / "question.wav", tmp_path / "reply.wav"
    write_wav(wav, question, 16000)
    result = CliRunner().invoke(
        cli_app, ["talk", "--wav", str(wav), "--url", server.ws_url, "--json", "--out", str(out), "--timeout", "90"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout is one object
    assert set(summary) == {"transcript", "reply", "audio_seconds", "latency_ms", "status", "frames"}
    assert "what is two plus two" in normalise(summary["transcript"])
    assert summary["status"] == "completed" and summary["reply"].strip() and summary["frames"] == 0
    for mark in ("asr_final", "llm_first_token", "tts_first_audio", "first_audio"):
        assert summary["latency_ms"][mark] >= 0, mark
    reply, rate = read_wav(out)
    assert abs(len(reply) / rate - summary["audio_seconds"]) < 0.01
