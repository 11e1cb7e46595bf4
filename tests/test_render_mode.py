"""Render-only sessions: a voice agent's reply audio in, clock-paired frames and audio out."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from stage_fakes import Collector, FakeAvatarStore, FakeModels, FakeRenderer, pcm16, tone

from avatalk.client import AvatalkClient
from avatalk.config import Settings
from avatalk.streaming.events import (
    ErrorEvent,
    OutputAudioCleared,
    OutputAudioStarted,
    OutputAudioStopped,
    StateChanged,
    WarningEvent,
)
from avatalk.streaming.protocol import OutputAudioClear, OutputAudioCommit, ProtocolError, SessionOptions, TextInput
from avatalk.streaming.session import ConversationSession

RATE = 24000


async def render_session(collector: Collector, settings: Settings | None = None) -> ConversationSession:
    session = ConversationSession(
        "render", FakeModels(renderer=FakeRenderer()), settings or Settings(), collector, FakeAvatarStore()  # type: ignore[arg-type]
    )
    await session.configure(SessionOptions(mode="render", input_sample_rate=RATE, output_sample_rate=RATE, video=True))
    return session


async def send(session: ConversationSession, audio: np.ndarray, frame_ms: int = 7) -> None:
    """Any frame length, as fast as the client likes."""
    step = RATE * frame_ms // 1000
    for start in range(0, len(audio), step):
        await session.push_audio(pcm16(audio[start : start + step]))


async def test_every_tick_of_sent_audio_comes_back_paired_with_its_frame() -> None:
    collector = Collector()
    session = await render_session(collector)
    try:
        await send(session, tone(1.0, rate=RATE))  # exactly 25 ticks
        await session.handle_event(OutputAudioCommit(type="output_audio_buffer.commit"))
        stopped = await collector.wait_for(OutputAudioStopped)
    finally:
        await session.close()
    started = collector.of_type(OutputAudioStarted)[0]
    assert (started.utterance_id, stopped.utterance_id) == (1, 1) and stopped.start_tick == started.start_tick
    speaking = [(tick, audio, frame) for tick, audio, frame in collector.ticks if audio is not None]
    assert len(speaking) == 25 == stopped.end_tick - stopped.start_tick
    assert [tick for tick, _, _ in speaking] == list(range(stopped.start_tick, stopped.end_tick))
    renderer = session.video.renderer  # type: ignore[union-attr]
    assert all(frame is renderer.speaking for _, _, frame in speaking)  # each audio tick carries its lip-synced frame
    received = np.concatenate([audio for _, audio, _ in speaking])
    np.testing.assert_allclose(np.abs(received).max(), 0.3, atol=0.02)
    idle = [frame for tick, audio, frame in collector.ticks if audio is None]
    assert idle and all(frame is renderer.idle for frame in idle)  # idle frames before and after
    assert not collector.of_type(StateChanged)  # no conversation states in a render session


async def test_clear_silences_the_next_tick_and_reports_what_was_dropped() -> None:
    collector = Collector()
    session = await render_session(collector)
    try:
        await send(session, tone(3.0, rate=RATE))
        await collector.wait_for(OutputAudioStarted)
        await asyncio.sleep(0.2)
        await session.handle_event(OutputAudioClear(type="output_audio_buffer.clear"))
        ticks_at_clear = len(collector.ticks)
        await asyncio.sleep(0.3)
        await send(session, tone(0.4, rate=RATE))  # a new utterance after the clear
        await session.handle_event(OutputAudioCommit(type="output_audio_buffer.commit"))
        stopped = await collector.wait_for(OutputAudioStopped)
    finally:
        await session.close()
    [cleared] = collector.of_type(OutputAudioCleared)
    assert cleared.utterance_ids == [1] and 50 <= cleared.dropped_ticks <= 70
    after = collector.ticks[ticks_at_clear + 1 : ticks_at_clear + 6]  # one tick may already be on its way
    assert all(audio is None for _, audio, _ in after)
    assert stopped.utterance_id == 2 and stopped.end_tick - stopped.start_tick == 10


async def test_an_utterance_holds_its_start_buffer_before_it_plays() -> None:
    """Less than ``limits.render_start_ms`` of audio waits (a real-time sender's jitter margin); then all of it plays."""
    collector = Collector()
    session = await render_session(collector, Settings(limits={"render_start_ms": 100}))
    clock = session.clock
    assert clock is not None
    try:
        await send(session, tone(0.09, rate=RATE), frame_ms=10)
        await asyncio.sleep(0.15)
        assert not clock.busy and not collector.of_type(OutputAudioStarted)
        await send(session, tone(0.03, rate=RATE), frame_ms=10)  # 120 ms: past the start buffer
        await collector.wait_for(OutputAudioStarted)
        await send(session, tone(0.08, rate=RATE), frame_ms=10)
        await session.handle_event(OutputAudioCommit(type="output_audio_buffer.commit"))
        stopped = await collector.wait_for(OutputAudioStopped)
    finally:
        await session.close()
    assert stopped.end_tick - stopped.start_tick == 5  # 200 ms, nothing lost while held


async def test_audio_beyond_the_buffer_is_refused_with_a_clear_error_after_a_warning() -> None:
    collector = Collector()
    session = await render_session(collector, Settings(limits={"render_buffer_s": 2.0}))
    try:
        with pytest.raises(ProtocolError) as refused:
            await send(session, tone(3.0, rate=RATE), frame_ms=100)
        assert refused.value.code == "render_buffer_full" and "not queued" in refused.value.message
        [warning] = collector.of_type(WarningEvent)
        assert warning.code == "render_buffer_high"
        assert 1.8 <= session.clock.queued_seconds <= 2.0  # type: ignore[union-attr]
    finally:
        await session.close()


async def test_conversation_events_are_the_wrong_mode_and_commit_needs_audio() -> None:
    collector = Collector()
    session = await render_session(collector)
    try:
        with pytest.raises(ProtocolError) as wrong:
            await session.handle_event(TextInput(type="conversation.item.create", text="Hello"))
        assert wrong.value.code == "wrong_mode"
        with pytest.raises(ProtocolError) as empty:
            await session.handle_event(OutputAudioCommit(type="output_audio_buffer.commit"))
        assert empty.value.code == "no_utterance"
        with pytest.raises(ProtocolError) as odd:
            await session.push_audio(b"\x00\x01\x02")
        assert odd.value.code == "invalid_audio"
    finally:
        await session.close()
    assert not collector.of_type(ErrorEvent)  # errors are the transport's to send


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory()


async def test_render_mode_over_the_websocket(server) -> None:
    async with AvatalkClient(server.ws_url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        configured = await client.configure(RATE, RATE, mode="render", video=True)
        assert configured["type"] == "session.updated" and configured["session"]["mode"] == "render"
        await client.send_event("conversation.item.create", text="Hello")
        wrong = await client.wait_for(lambda e: e["type"] == "error")
        assert wrong["code"] == "wrong_mode"
        speech = tone(0.8, rate=RATE)
        for start in range(0, len(speech), 333):  # odd frame lengths
            await client.send_audio(speech[start : start + 333])
        await client.send_event("output_audio_buffer.commit")
        stopped = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
        first, last = stopped["start_tick"], stopped["end_tick"] - 1
        assert last - first + 1 == 20
        frames, audio = client.timeline(first, last)
        assert all(frame is not None for frame in frames)  # every audio tick has its frame
        assert np.abs(audio).max() > 0.25
