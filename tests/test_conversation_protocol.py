"""Documented conversation behaviour over the real WebSocket (docs/protocol.md), with the real embedded models.

Where a test needs a backend to fail, stall or hear nothing, that one model is
replaced by a test double defined here (named ``...ForTest``); everything
else (the server, the session, the other models) is the real thing. Nothing
here asserts a duration: what must not happen is checked by the order of the
events on the socket (e.g. no reply audio between an interruption and the next
reply's ``response.created``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from fakes import LiveServer

from avatalk.client import AvatalkClient, Event
from avatalk.config import ASRSettings, Settings
from avatalk.executors import Executors
from avatalk.llm.base import LLM, ChatMessage
from avatalk.streaming.models import EngineModels
from avatalk.tts.base import TTS, TTSError

pytestmark = pytest.mark.slow

GREETING = (
    "Hello and welcome! I am your assistant for today, and I will keep talking for a little while, "
    "so that there is time to do something in the middle of what I am saying."
)
#: Reply audio that may still be in flight when the server stops a reply ("a tick or two", docs/protocol.md).
TICKS_IN_FLIGHT = 2
#: 40 ms ticks of reply audio that make one second.
ONE_SECOND_OF_TICKS = 25


def words(text: str) -> str:
    spelled = {"2": "two", "3": "three", "4": "four", "6": "six"}
    return " ".join(spelled.get(word, word) for word in re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def trimmed(audio: np.ndarray, level: float = 0.02) -> np.ndarray:
    """``audio`` without its quiet tail: it ends in the middle of voice."""
    loud = np.flatnonzero(np.abs(audio) > level)
    return audio[: loud[-1] + 1]


def blip(speech: Callable[..., np.ndarray]) -> np.ndarray:
    """100 ms of a spoken word: voiced, but far below turns.min_speech_ms and turns.barge_in_ms."""
    word = speech("Hey.")
    start = int(np.flatnonzero(np.abs(word) > 0.05)[0])
    return word[start : start + 1600]


async def open_session(url: str, **session: Any) -> AvatalkClient:
    client = AvatalkClient(url)
    await client.connect()
    await client.wait_for(lambda e: e["type"] == "session.created")
    configured = await client.configure(**session)
    assert configured["type"] == "session.updated", configured
    return client


async def wait_for_audio(client: AvatalkClient, ticks: int, timeout: float = 60.0) -> None:
    """Until ``ticks`` ticks of reply audio have arrived (a guard, not a measurement)."""
    deadline = time.monotonic() + timeout
    while len(client.audio) < ticks:
        if time.monotonic() > deadline or client.closed.is_set():
            raise TimeoutError(f"only {len(client.audio)} ticks of reply audio arrived")
        await asyncio.sleep(0.02)


async def speak(
    client: AvatalkClient, audio: np.ndarray, until: Callable[[Event], bool], timeout: float = 90.0
) -> Event:
    """Stream ``audio`` at real-time pace, then silence, as an open microphone does, until an event matches."""
    mark = len(client.events)
    await client.stream_audio(audio, 16000)
    deadline = time.monotonic() + timeout
    while True:
        found = [event for event in client.events[mark:] if until(event)]
        if found:
            return found[0]
        if time.monotonic() > deadline or client.closed.is_set():
            raise TimeoutError(f"no such event; got {[event['type'] for event in client.events[mark:]]}")
        await client.stream_audio(silence(0.1), 16000)


def audio_between(client: AvatalkClient, first: Event, last: Event) -> int:
    """Ticks of audio the client received after event ``first`` and before event ``last`` (socket order)."""
    return sum(1 for chunk in client.audio if first["_received_at"] < chunk.received_at < last["_received_at"])


@pytest.fixture(scope="module")
def server(live_server_factory: Callable[..., LiveServer]) -> LiveServer:
    return live_server_factory()


# --- Test doubles (one model each; the rest of the server is real) -------------------------


class EchoLLMForTest(LLM):
    """Replies with what it was asked: the last user message (``echo="user"``) or the system prompt."""

    name = "echo"

    def __init__(self, echo: str = "user") -> None:
        self.echo = echo
        self.asked: list[list[ChatMessage]] = []

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> EchoLLMForTest:
        return cls()

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        self.asked.append(list(messages))
        role = "user" if self.echo == "user" else "system"
        text = [message.content for message in messages if message.role == role][-1]
        for word in text.split(" "):
            yield word + " "

    def count_tokens(self, text: str) -> int:
        return len(text.split())


class BrokenTTSForTest(TTS):
    """A speech backend that fails on every sentence."""

    name = "broken"

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> BrokenTTSForTest:
        return cls()

    @property
    def sample_rate(self) -> int:
        return 16000

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        raise TTSError("the voice model crashed (a test double)")
        yield np.zeros(0, np.float32)  # pragma: no cover - makes this an async generator


class DeafASRForTest:
    """A recogniser that hears nothing in any audio: noise the VAD took for speech."""

    def __init__(self, settings: ASRSettings) -> None:
        self.settings = settings

    def transcribe(self, audio: np.ndarray) -> str:
        return ""


class GatedASRForTest:
    """The real recogniser, held until the test opens ``gate``: a turn is being transcribed as long as it likes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.settings = inner.settings
        self.gate = threading.Event()

    def transcribe(self, audio: np.ndarray) -> str:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return str(self.inner.transcribe(audio))


def with_models(engine_models: EngineModels, **replaced: Any) -> EngineModels:
    return dataclasses.replace(engine_models, **replaced)


# --- Interrupting a reply ------------------------------------------------------------------


async def test_response_cancel_stops_the_reply_with_client_cancel(server: LiveServer) -> None:
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": GREETING})
    try:
        await wait_for_audio(client, ONE_SECOND_OF_TICKS)  # mid-sentence
        greeting_turn = client.events_of("response.created")[0]["turn_id"]
        mark = len(client.events)
        await client.send_event("response.cancel")
        interrupted = await client.wait_for(lambda e: e["type"] == "response.interrupted", since=mark, timeout=10)
        done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=10)
        assert interrupted["turn_id"] == done["turn_id"] == greeting_turn
        assert interrupted["reason"] == "client_cancel" and done["status"] == "interrupted"
        spoken = interrupted["spoken_text"]
        assert spoken and GREETING.startswith(spoken) and len(spoken) < len(GREETING)
        assert done["text"] == spoken
        state = await client.wait_for(lambda e: e["type"] == "state", since=client.events.index(interrupted))
        assert state["state"] == "listening"
        # Nothing of the cancelled reply plays on: no audio until the next reply starts.
        await client.send_event("conversation.item.create", text="Are you there?")
        created = await client.wait_for(lambda e: e["type"] == "response.created", since=mark, timeout=60)
        assert created["turn_id"] != greeting_turn
        assert audio_between(client, interrupted, created) <= TICKS_IN_FLIGHT
        # Nothing left to cancel once the reply is over.
        await client.wait_for(lambda e: e["type"] == "response.done" and e["turn_id"] == created["turn_id"], timeout=90)
        mark = len(client.events)
        await client.send_event("response.cancel")
        error = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=10)
        assert error["code"] == "no_response"
    finally:
        await client.close()


async def test_typed_text_interrupts_a_reply_with_new_input(server: LiveServer) -> None:
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": GREETING})
    try:
        await wait_for_audio(client, ONE_SECOND_OF_TICKS)
        greeting_turn = client.events_of("response.created")[0]["turn_id"]
        mark = len(client.events)
        await client.send_event("conversation.item.create", text="Say hello.")
        reply_done = await client.wait_for(
            lambda e: e["type"] == "response.done" and e["turn_id"] != greeting_turn, since=mark, timeout=90
        )
        sequence = [(e["type"], e.get("turn_id")) for e in client.events[mark:] if e["type"].startswith("response.")]
        reply_turn = reply_done["turn_id"]
        assert sequence[:3] == [
            ("response.interrupted", greeting_turn),
            ("response.done", greeting_turn),
            ("response.created", reply_turn),
        ]
        interrupted = client.events_of("response.interrupted")[0]
        assert interrupted["reason"] == "new_input"
        assert interrupted["spoken_text"] and GREETING.startswith(interrupted["spoken_text"])
        assert reply_done["status"] == "completed" and reply_done["text"].strip()
        # The typed message goes straight to thinking: no "listening" between the two replies.
        created = client.events_of("response.created")[-1]
        states = [e["state"] for e in client.events[client.events.index(interrupted) : client.events.index(created)] if e["type"] == "state"]
        assert "listening" not in states
        assert audio_between(client, interrupted, created) <= TICKS_IN_FLIGHT
    finally:
        await client.close()


# --- Turn-taking -----------------------------------------------------------------------------


async def test_commit_ends_the_turn_without_waiting_for_silence(live_server_factory, engine_models, speech) -> None:
    """Push-to-talk: end-of-turn silences of 3 s, 1 s of silence sent, then the commit ends the turn."""
    server = live_server_factory(
        models=with_models(engine_models, turn=None),  # no smart-turn model: only the 3 s silences end a turn
        turns={"end_silence_ms": 3000, "sentence_end_silence_ms": 3000},
    )
    client = await open_session(server.ws_url)
    try:
        await client.stream_audio(np.concatenate([silence(0.3), trimmed(speech("What is two plus two?")), silence(1.0)]), 16000)
        started = await client.wait_for(lambda e: e["type"] == "input_audio_buffer.speech_started", timeout=10)
        assert not client.events_of("input_audio_buffer.speech_stopped")  # the silence did not end the turn
        mark = len(client.events)
        await client.send_event("input_audio_buffer.commit")
        stopped = await client.wait_for(lambda e: e["type"] == "input_audio_buffer.speech_stopped", since=mark, timeout=10)
        heard = await client.wait_for(lambda e: e["type"] == "input_audio_transcription.completed", since=mark, timeout=30)
        assert stopped["turn_id"] == started["turn_id"] == heard["turn_id"]
        assert "what is two plus two" in words(heard["transcript"])
        done = await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=90)
        assert done["turn_id"] == heard["turn_id"] and done["status"] == "completed"
        # A commit while nobody speaks does nothing: not even an error.
        mark = len(client.events)
        await client.send_event("input_audio_buffer.commit")
        await client.send_event("make.sentinel")
        sentinel = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=10)
        assert sentinel["code"] == "unknown_event" and client.events[mark:] == [sentinel]
    finally:
        await client.close()


async def test_a_short_noise_is_ignored_as_speech_ignored(server: LiveServer, speech) -> None:
    client = await open_session(server.ws_url)
    try:
        ignored = await speak(
            client, np.concatenate([silence(0.5), blip(speech)]), lambda e: e["type"] == "input_audio_buffer.speech_ignored"
        )
        assert 0 < ignored["speech_ms"] < 250  # turns.min_speech_ms
        # Nothing else comes of it: the next thing the session does is answer a typed message.
        mark = len(client.events)
        await client.send_event("conversation.item.create", text="Hello?")
        await client.wait_for(lambda e: e["type"] == "response.done", since=mark, timeout=90)
        kinds = [e["type"] for e in client.events]
        for never in ("input_audio_buffer.speech_stopped", "input_audio_transcription.completed"):
            assert never not in kinds
        assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_ignored")
        assert len(client.events_of("response.created")) == 1
    finally:
        await client.close()


async def test_speech_shorter_than_barge_in_ms_does_not_interrupt(server: LiveServer, speech) -> None:
    client = await open_session(server.ws_url, greeting=True, persona={"greeting": GREETING})
    try:
        await wait_for_audio(client, ONE_SECOND_OF_TICKS)
        ignored = await speak(client, blip(speech), lambda e: e["type"] == "input_audio_buffer.speech_ignored")
        done = await client.wait_for(lambda e: e["type"] == "response.done", timeout=90)
        assert client.events.index(ignored) < client.events.index(done)  # heard while the reply played
        assert done["status"] == "completed" and done["text"] == GREETING
        assert not client.events_of("response.interrupted")
    finally:
        await client.close()


async def test_partial_transcripts_arrive_while_the_user_speaks(server: LiveServer, speech) -> None:
    question = speech("What is two plus two? And what is three plus three, if you please?")
    client = await open_session(server.ws_url)
    try:
        heard = await speak(
            client, np.concatenate([silence(0.3), question]), lambda e: e["type"] == "input_audio_transcription.completed"
        )
        started = client.events_of("input_audio_buffer.speech_started")[0]
        stopped = client.events_of("input_audio_buffer.speech_stopped")[0]
        partials = client.events[client.events.index(started) : client.events.index(stopped)]
        partials = [e for e in partials if e["type"] == "input_audio_transcription.partial"]
        assert partials, [e["type"] for e in client.events]
        assert {e["turn_id"] for e in partials} == {started["turn_id"]} == {heard["turn_id"]}
        assert all(words(e["transcript"]).startswith("what") for e in partials), partials
        assert "what is two plus two" in words(heard["transcript"])
    finally:
        await client.close()


async def test_an_empty_transcript_ends_the_turn_with_status_empty(live_server_factory, engine_models, speech) -> None:
    models = with_models(engine_models, asr=DeafASRForTest(engine_models.asr.settings))
    server = live_server_factory(models=models)
    client = await open_session(server.ws_url)
    try:
        done = await speak(
            client, np.concatenate([silence(0.3), speech("What is two plus two?")]), lambda e: e["type"] == "response.done"
        )
        heard = client.events_of("input_audio_transcription.completed")
        assert [e["transcript"] for e in heard] == [""] and heard[0]["turn_id"] == done["turn_id"]
        assert done["status"] == "empty" and done["text"] == ""
        assert client.events.index(heard[0]) < client.events.index(done)
        assert not client.events_of("response.created") and not client.audio
        assert client.events_of("state")[-1]["state"] == "listening"
    finally:
        await client.close()


async def test_speech_during_the_transcription_continues_that_turn(live_server_factory, engine_models, speech) -> None:
    """No barge-in while transcribing: turn 1 gets no reply of its own, its words join turn 2's question."""
    llm = EchoLLMForTest("user")
    asr = GatedASRForTest(engine_models.asr)
    # Without the smart-turn model a turn ends after 500 ms of silence at most.
    server = live_server_factory(models=with_models(engine_models, asr=asr, llm=llm, turn=None))
    client = await open_session(server.ws_url)
    try:
        first = await speak(
            client,
            np.concatenate([silence(0.3), speech("What is two plus two?")]),
            lambda e: e["type"] == "input_audio_buffer.speech_stopped",
        )
        # The user goes on at once, while turn 1 is still being transcribed (the recogniser is held) ...
        second = speech("And what is three plus three and then four plus four if you please?")  # no pause inside
        await client.stream_audio(second[:24000], 16000)  # 1.5 s: far more than turns.barge_in_ms of speech
        assert not client.events_of("input_audio_transcription.completed")
        # ... and turn 1's transcript arrives while they are still speaking.
        asr.gate.set()
        done = await speak(
            client, second[24000:], lambda e: e["type"] == "response.done" and e["status"] == "completed", timeout=120
        )
        heard_first = client.events_of("input_audio_transcription.completed")[0]
        second_started = client.events_of("input_audio_buffer.speech_started")[1]
        second_stopped = client.events_of("input_audio_buffer.speech_stopped")[1]
        order = [client.events.index(e) for e in (first, second_started, heard_first, second_stopped)]
        assert order == sorted(order)  # turn 1's transcript came while the user was speaking again
        set_aside = [e for e in client.events if e["type"] == "response.done" and e["turn_id"] == first["turn_id"]]
        assert [(e["status"], e["text"]) for e in set_aside] == [("interrupted", "")]
        interrupted = client.events_of("response.interrupted")
        assert [(e["turn_id"], e["reason"], e["spoken_text"]) for e in interrupted] == [(first["turn_id"], "barge_in", "")]
        created = client.events_of("response.created")
        assert [e["turn_id"] for e in created] == [done["turn_id"]] and done["turn_id"] != first["turn_id"]
        # One question, merged: the reply (an echo of it) has both turns' words.
        reply = words(done["text"])
        assert "two plus two" in reply and "three plus three" in reply, done
    finally:
        await client.close()


# --- The session -----------------------------------------------------------------------------


async def test_a_persona_change_mid_session_applies_to_the_next_reply(live_server_factory, engine_models) -> None:
    llm = EchoLLMForTest("system")
    server = live_server_factory(models=with_models(engine_models, llm=llm))
    client = await open_session(server.ws_url)
    try:
        await client.send_event("conversation.item.create", text="Who are you?")
        first = await client.wait_for(lambda e: e["type"] == "response.text.done", timeout=60)
        await client.wait_for(lambda e: e["type"] == "response.done", timeout=60)
        mark = len(client.events)
        persona = {"name": "Zed", "system_prompt": "You are Zed, a pirate who answers in one word."}
        await client.send_event("session.update", session={"persona": persona})
        updated = await client.wait_for(lambda e: e["type"] in ("session.updated", "error"), since=mark, timeout=10)
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["persona"]["name"] == "Zed"
        assert updated["session"]["input_sample_rate"] == 16000  # the rest of the session is unchanged
        await client.send_event("conversation.item.create", text="Who are you now?")
        second = await client.wait_for(lambda e: e["type"] == "response.text.done", since=mark, timeout=60)
        assert "Zed" not in first["text"]
        assert second["text"].strip() == persona["system_prompt"]
    finally:
        await client.close()


async def test_the_session_expires_after_max_session_s(live_server_factory) -> None:
    server = live_server_factory(limits={"max_session_s": 1.0})
    client = await open_session(server.ws_url)
    try:
        error = await client.wait_for(lambda e: e["type"] == "error", timeout=30)
        assert error["code"] == "session_expired" and error["fatal"] is True
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 1008
    finally:
        await client.close()


async def test_a_server_without_loaded_models_answers_not_ready(tmp_path) -> None:
    """Before its models are loaded the server refuses sessions (not_ready, 1013) and /readyz says 503.

    (The app's lifespan loads the models; a server that has not run it is in that state.)
    """
    from avatalk.server.app import create_app

    server = LiveServer(create_app(Settings(data_dir=tmp_path / "data")), lifespan="off")
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            assert (await http.get("/healthz")).status_code == 200
            offer = await http.post("/v1/webrtc/offer", json={"type": "offer", "sdp": "v=0\r\nm=audio 9\r\nm=video 9\r\n"})
            assert offer.status_code == 503 and offer.headers["retry-after"]
        client = AvatalkClient(server.ws_url)
        await client.connect()
        error = await client.wait_for(lambda e: e["type"] == "error", timeout=10)
        assert error["code"] == "not_ready"
        await asyncio.wait_for(client.closed.wait(), 10)
        assert client.close_code == 1013
        assert not client.events_of("session.created")
    finally:
        server.stop()


async def test_a_failing_tts_is_a_tts_error_and_no_fallback(live_server_factory, engine_models) -> None:
    server = live_server_factory(models=with_models(engine_models, tts=BrokenTTSForTest()))
    client = await open_session(server.ws_url)
    try:
        await client.send_event("conversation.item.create", text="Hello?")
        error = await client.wait_for(lambda e: e["type"] == "error", timeout=60)
        assert error["code"] == "tts_error" and "crashed" in error["message"] and not error.get("fatal")
        failed = await client.wait_for(lambda e: e["type"] == "response.done", timeout=30)
        assert failed["turn_id"] == error["turn_id"] and failed["status"] == "failed"
        assert client.events.index(error) < client.events.index(failed)
        # No fallback turn: the next reply is the one to the next message, with the next turn id.
        mark = len(client.events)
        await client.send_event("conversation.item.create", text="Still there?")
        created = await client.wait_for(lambda e: e["type"] == "response.created", since=mark, timeout=60)
        assert [e["turn_id"] for e in client.events_of("response.created")] == [failed["turn_id"], created["turn_id"]]
        assert created["turn_id"] == failed["turn_id"] + 1
        assert not client.audio and not client.events_of("latency")
    finally:
        await client.close()


async def test_video_on_a_server_without_a_renderer_is_video_unavailable(live_server_factory, engine_models) -> None:
    server = live_server_factory(models=with_models(engine_models, renderer=None))
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")
        for video in ({"video": True}, {"avatar": "ava"}):
            error = await client.configure(**video)
            assert error["type"] == "error" and error["code"] == "video_unavailable", error
        # A bad value is reported before the missing renderer.
        error = await client.configure(video=True, video_size=101)
        assert error["code"] == "invalid_session_config", error
        # The session is still not configured, and can be configured without video.
        mark = len(client.events)
        await client.send_audio(silence(0.02))
        error = await client.wait_for(lambda e: e["type"] == "error", since=mark)
        assert error["code"] == "audio_before_configuration"
        configured = await client.configure()
        assert configured["type"] == "session.updated" and configured["session"]["video"] is False
    finally:
        await client.close()
