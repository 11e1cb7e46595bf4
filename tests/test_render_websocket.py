"""Render-only sessions over the real WebSocket (docs/protocol.md, "Render-only sessions").

What tests/test_render_mode.py checks on the session with test doubles, here
end to end against a live server with the real renderer: every tick of audio
sent comes back as one tick with its frame, in order; a clear takes effect
within a tick; the buffer is bounded with a clear error; bad input gets the
protocol's error codes and the session goes on.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from avatalk.client import AvatalkClient

pytestmark = pytest.mark.slow

RATE = 24000
SAMPLES_PER_TICK = RATE // 25


def tone(seconds: float, rate: int = RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


async def render_client(url: str, **session: object) -> AvatalkClient:
    client = AvatalkClient(url)
    await client.connect()
    await client.wait_for(lambda e: e["type"] == "session.created")
    configured = await client.configure(RATE, RATE, mode="render", **session)
    assert configured["type"] == "session.updated", configured
    return client


async def send(client: AvatalkClient, audio: np.ndarray, lengths: tuple[int, ...] = (480,)) -> None:
    """Frames of varying length (cycling through ``lengths``), as fast as the client likes."""
    start, index = 0, 0
    while start < len(audio):
        step = lengths[index % len(lengths)]
        await client.send_audio(audio[start : start + step])
        start, index = start + step, index + 1


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(limits={"render_buffer_s": 2.0})


async def test_each_tick_of_audio_sent_comes_back_once_after_its_frame(server) -> None:
    client = await render_client(server.ws_url, video=True, video_size=128)
    try:
        first, second = tone(1.2), tone(0.5) * 0.5
        # Any frame length; the first one a few ticks long, so that the clock, which plays what it
        # has at each tick, never finds less than a tick before the next frame is there.
        await send(client, first, lengths=(2400, 97, 1000, 333))
        await client.send_event("output_audio_buffer.commit")
        await send(client, second)  # queued behind the first: they play back to back
        await client.send_event("output_audio_buffer.commit")
        stops = []
        for utterance_id in (1, 2):
            stops.append(
                await client.wait_for(
                    lambda e, u=utterance_id: e["type"] == "output_audio_buffer.stopped" and e["utterance_id"] == u,
                    timeout=30,
                )
            )
        await asyncio.sleep(0.2)
    finally:
        await client.close()
    starts = client.events_of("output_audio_buffer.started")
    assert [(s["utterance_id"], s["start_tick"]) for s in starts] == [(1, stops[0]["start_tick"]), (2, stops[1]["start_tick"])]
    assert stops[0]["end_tick"] - stops[0]["start_tick"] == 30  # 1.2 s = 30 ticks
    assert stops[1]["end_tick"] - stops[1]["start_tick"] == math.ceil(len(second) / SAMPLES_PER_TICK)  # 13, padded
    assert stops[1]["start_tick"] == stops[0]["end_tick"]  # seamless

    audio_ticks = [chunk.tick for chunk in client.audio]
    assert audio_ticks == list(range(stops[0]["start_tick"], stops[1]["end_tick"]))  # each once, in order
    frame_ticks = [frame.tick for frame in client.frames]
    assert frame_ticks == list(range(frame_ticks[0], frame_ticks[-1] + 1))  # 25 fps, idle or speaking, no gap
    frames = {frame.tick: frame for frame in client.frames}
    for chunk in client.audio:
        assert chunk.tick in frames and frames[chunk.tick].received_at <= chunk.received_at  # the picture first
    _, played = client.timeline(stops[0]["start_tick"], stops[1]["end_tick"] - 1)
    expected = np.zeros_like(played)
    expected[: len(first)] = first
    expected[30 * SAMPLES_PER_TICK : 30 * SAMPLES_PER_TICK + len(second)] = second
    np.testing.assert_allclose(played, expected, atol=2e-3)  # the agent's audio, re-cut into ticks, nothing else


async def test_a_clear_silences_the_session_within_a_tick_and_the_next_utterance_plays(server) -> None:
    client = await render_client(server.ws_url, video=True, video_size=128)
    try:
        await send(client, tone(1.8), lengths=(2400, 480))
        await client.wait_for(lambda e: e["type"] == "output_audio_buffer.started", timeout=30)
        while len(client.audio) < 10:
            await asyncio.sleep(0.02)
        await client.send_event("output_audio_buffer.clear")
        cleared = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.cleared", timeout=10)
        await asyncio.sleep(0.5)
        heard_after_clear = [chunk for chunk in client.audio if chunk.received_at > cleared["_received_at"]]
        assert len(heard_after_clear) <= 1  # only a tick already prepared may still go out
        played = len(client.audio)
        assert cleared["utterance_ids"] == [1] and played + cleared["dropped_ticks"] == 45  # 1.8 s

        await send(client, tone(0.4), lengths=(9600,))
        await client.send_event("output_audio_buffer.commit")
        stopped = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
        assert stopped["utterance_id"] == 2 and stopped["end_tick"] - stopped["start_tick"] == 10
        await client.send_event("output_audio_buffer.clear")  # nothing queued: an empty report
        empty = await client.wait_for(
            lambda e: e["type"] == "output_audio_buffer.cleared" and e is not cleared, timeout=10
        )
        assert empty["utterance_ids"] == [] and empty["dropped_ticks"] == 0
    finally:
        await client.close()


async def test_audio_beyond_the_buffer_is_refused_frame_by_frame_and_the_rest_plays(server) -> None:
    client = await render_client(server.ws_url)
    try:
        await send(client, tone(3.0), lengths=(2400,))  # 30 frames of 0.1 s at once; 2 s fit
        await client.send_event("output_audio_buffer.commit")
        stopped = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
    finally:
        await client.close()
    refused = [e for e in client.events_of("error") if e["code"] == "render_buffer_full"]
    warnings = [e for e in client.events_of("warning") if e["code"] == "render_buffer_high"]
    assert refused and len(warnings) == 1
    assert "not queued" in refused[0]["message"] and "real-time" in refused[0]["message"]
    accepted_samples = (30 - len(refused)) * 2400
    assert 1.8 * RATE <= accepted_samples <= 2.5 * RATE
    assert stopped["end_tick"] - stopped["start_tick"] == math.ceil(accepted_samples / SAMPLES_PER_TICK)  # none lost silently


async def test_bad_input_gets_the_protocols_errors_and_the_session_goes_on(server) -> None:
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")

        async def answer(data: str | bytes) -> dict:
            mark = len(client.events)
            await client.send_raw(data)
            return await client.wait_for(lambda e: e["type"] in ("error", "session.updated"), since=mark, timeout=10)

        assert (await answer(tone(0.1).tobytes()))["code"] == "audio_before_configuration"
        bad_mode = await answer('{"type": "session.update", "session": {"mode": "karaoke", "input_sample_rate": 24000}}')
        assert bad_mode["code"] == "invalid_session_config" and "mode" in bad_mode["message"]
        commit_early = await answer('{"type": "output_audio_buffer.commit"}')
        assert commit_early["code"] == "wrong_mode"  # not a render session (yet)
        configured = await client.configure(RATE, RATE, mode="render")
        assert configured["session"]["mode"] == "render"

        assert (await answer(b"\x00\x01\x02"))["code"] == "invalid_audio"
        assert (await answer(b"\x00" * (256 * 1024 + 2)))["code"] == "frame_too_large"
        assert (await answer('{"type": "output_audio_buffer.commit"}'))["code"] == "no_utterance"
        assert (await answer('{"type": "output_audio_buffer.commit", "utterance": 1}'))["code"] == "invalid_event"
        for event in (
            '{"type": "conversation.item.create", "text": "Hello"}',
            '{"type": "response.cancel"}',
            '{"type": "input_audio_buffer.commit"}',
        ):
            assert (await answer(event))["code"] == "wrong_mode", event
        switch = await answer('{"type": "session.update", "session": {"mode": "conversation"}}')
        assert switch["code"] == "invalid_session_config" and "mode" in switch["message"]

        await send(client, tone(0.2), lengths=(4800,))  # still a working render session
        await client.send_event("output_audio_buffer.commit")
        stopped = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
        assert stopped["end_tick"] - stopped["start_tick"] == 5
    finally:
        await client.close()


async def test_render_events_in_a_conversation_are_the_wrong_mode(server) -> None:
    client = AvatalkClient(server.ws_url)
    await client.connect()
    try:
        await client.wait_for(lambda e: e["type"] == "session.created")
        await client.configure(16000, RATE)
        for kind in ("output_audio_buffer.clear", "output_audio_buffer.commit"):
            mark = len(client.events)
            await client.send_event(kind)
            error = await client.wait_for(lambda e: e["type"] == "error", since=mark, timeout=10)
            assert error["code"] == "wrong_mode" and "render" in error["message"]
    finally:
        await client.close()
