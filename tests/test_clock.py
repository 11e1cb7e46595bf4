import asyncio
import time

import numpy as np
import pytest

from avatalk.streaming.clock import MAX_PULL_S, MediaClock, Tick


async def test_ticks_carry_exactly_their_audio():
    clock = MediaClock(24000)
    audio = np.arange(24000 * 3 // 25 + 100, dtype=np.float32)  # 3 ticks + 100 samples
    first = await clock.enqueue(1, audio[:1000])
    second = await clock.enqueue(1, audio[1000:])
    ticks = [clock.next_tick() for _ in range(2)]
    assert (first.released, second.released) == (1000, 920)  # the sentence boundary inside tick 1
    ticks += [clock.next_tick() for _ in range(4)]
    assert [t.index for t in ticks] == list(range(6))
    spoken = np.concatenate([t.audio for t in ticks if t.audio is not None])
    assert len(spoken) == 4 * 960  # the last partial tick is padded with silence
    np.testing.assert_array_equal(spoken[: len(audio)], audio)
    assert np.all(spoken[len(audio) :] == 0)
    assert ticks[4].audio is None and ticks[5].audio is None


async def test_clear_drops_queued_audio_at_once():
    clock = MediaClock(16000)
    await clock.enqueue(7, np.ones(16000, dtype=np.float32))
    assert clock.next_tick().audio is not None
    dropped = clock.clear(7)
    assert dropped == 16000 - 640
    assert clock.next_tick().audio is None and not clock.busy
    await asyncio.wait_for(clock.wait_idle(), 1.0)


async def test_clear_keeps_other_turns():
    clock = MediaClock(16000)
    await clock.enqueue(1, np.ones(640, dtype=np.float32))
    await clock.enqueue(2, np.full(640, 2.0, dtype=np.float32))
    clock.clear(1)
    tick = clock.next_tick()
    assert tick.turn_id == 2 and float(tick.audio[0]) == 2.0


async def test_enqueue_waits_when_full():
    clock = MediaClock(16000, max_queued_s=0.1)
    await clock.enqueue(1, np.ones(1600, dtype=np.float32))
    blocked = asyncio.create_task(clock.enqueue(1, np.ones(640, dtype=np.float32)))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    clock.next_tick()
    await asyncio.wait_for(blocked, 1.0)


async def test_run_releases_ticks_in_order_and_none_before_its_time():
    """Tick k goes out at start + k x 40 ms, never earlier (later only when the loop is late), none skipped."""
    clock = MediaClock(16000)
    seen: list[int] = []
    early: list[tuple[int, float]] = []

    async def sink(tick):
        seen.append(tick.index)
        assert clock.started_at is not None
        due = clock.started_at + tick.index * 0.040
        if time.monotonic() < due - 0.001:
            early.append((tick.index, due - time.monotonic()))

    task = asyncio.create_task(clock.run(sink))
    while len(seen) < 12:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == list(range(len(seen)))
    assert early == []


def test_rate_must_be_multiple_of_25():
    with pytest.raises(ValueError):
        MediaClock(22051)


async def test_every_frame_is_paired_with_exactly_its_audio():
    """Audio at 24 kHz and its 16 kHz renderer copy both encode time; each tick must hold its own 40 ms."""
    clock = MediaClock(24000, lead_s=0.02)
    seconds = 0.48  # exactly 12 ticks
    await clock.enqueue(3, np.arange(int(24000 * seconds)) / 24000.0, np.arange(int(16000 * seconds)) / 16000.0)
    received = []

    async def prepare(tick):
        # A "renderer" that draws the time its audio says it is.
        tick.frame = None if tick.render_audio is None else np.array([tick.render_audio.mean()])

    async def sink(tick):
        received.append(tick)

    task = asyncio.create_task(clock.run(sink, prepare))
    while len(received) < 15:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    speaking = [tick for tick in received if tick.audio is not None]
    assert len(speaking) == round(seconds * 25)
    for k, tick in enumerate(speaking):
        assert tick.index == k
        start, end = k * 0.040, (k + 1) * 0.040
        assert start <= tick.audio.min() and tick.audio.max() < end
        assert start <= tick.render_audio.min() and tick.render_audio.max() < end
        assert len(tick.render_audio) == 640
        assert start < float(tick.frame[0]) < end
    assert all(tick.audio is None and tick.frame is None for tick in received[len(speaking) :])


async def test_queued_render_audio_places_each_segment_where_next_tick_plays_it():
    clock = MediaClock(24000)
    first, second = np.arange(1, 2401) / 24000.0, np.arange(1, 1201) / 24000.0
    await clock.enqueue(1, first, (np.arange(1, 1601) / 16000.0).astype(np.float32))  # 100 ms = 2.5 ticks
    await clock.enqueue(1, second, (np.arange(1, 801) / 16000.0 + 1).astype(np.float32))  # starts inside tick 2
    await clock.enqueue(2, np.ones(960), np.ones(640))  # another turn: never listed with this one
    queued = clock.queued_render_audio()
    assert [(start, continues) for start, _, continues in queued] == [(0, False), (1600, False)]
    assert len(queued[1][1]) == 800
    ticks = [clock.next_tick() for _ in range(4)]
    played = np.concatenate([tick.render_audio for tick in ticks])
    for start, audio, _ in queued:  # each segment's audio is exactly where the ticks carry it
        np.testing.assert_array_equal(played[start : start + len(audio)], audio)
    # All of turn 1 was taken (its last tick ends early); turn 2 starts on the next tick.
    assert [start for start, _, _ in clock.queued_render_audio()] == [4 * 640]
    clock.next_tick()
    assert clock.queued_render_audio() == []
    await clock.enqueue(3, np.ones(960), np.ones(640))
    await clock.enqueue(3, np.ones(480), np.ones(320), continues=True)  # streamed: more of the same utterance
    assert [(start, continues) for start, _, continues in clock.queued_render_audio()] == [(3200, False), (3840, True)]


async def test_audio_arriving_while_idle_is_taken_at_once_and_the_timeline_drifts_back():
    """A talk spurt moves the timeline ahead (at most MAX_PULL_S); idle ticks bring it back to its start."""
    clock = MediaClock(16000)
    released: list[Tick] = []
    spurts: list[asyncio.Task[object]] = []

    async def sink(tick: Tick) -> None:
        released.append(tick)
        if tick.index in (3, 4):  # arrives while the clock waits for the next slot: after an idle tick (3)
            # it is taken at once, after a speaking one (4) it continues the reply in its own slot.
            spurts.append(asyncio.create_task(clock.enqueue(tick.index, np.ones(640, np.float32))))

    task = asyncio.create_task(clock.run(sink))
    phases: list[float] = []
    try:
        while len(released) < 7:
            await asyncio.sleep(0.002)
            phases.append(clock.phase_s)
        assert min(phases) < 0  # the spurt's tick was taken before its slot
        assert min(phases) >= -MAX_PULL_S
        # Back on the start's timeline after idle ticks, none skipped and none repeated.
        await asyncio.wait_for(_phase_back_to_zero(clock), 3.0)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    indices = [tick.index for tick in released]
    assert indices == list(range(len(indices)))
    assert [tick.index for tick in released if tick.audio is not None] == [4, 5]


async def _phase_back_to_zero(clock: MediaClock) -> None:
    while clock.phase_s < 0:
        await asyncio.sleep(0.01)


async def test_a_talk_spurt_with_the_timeline_at_its_limit_waits_for_the_slot_without_spinning(monkeypatch):
    clock = MediaClock(16000)
    spurts: list[int] = []
    start_talk_spurt = clock._start_talk_spurt  # noqa: SLF001

    def counted(due: float) -> None:
        spurts.append(clock.index)
        start_talk_spurt(due)

    monkeypatch.setattr(clock, "_start_talk_spurt", counted)
    released: list[Tick] = []

    async def sink(tick: Tick) -> None:
        released.append(tick)
        if tick.index == 2:
            # As far ahead as the timeline may run (no pull is left), the next slot where it was.
            assert clock.started_at is not None
            clock.started_at += MAX_PULL_S + clock.phase_s
            clock.phase_s = -MAX_PULL_S
            await clock.enqueue(1, np.ones(640, np.float32))  # queued while this idle tick goes out

    task = asyncio.create_task(clock.run(sink))
    try:
        while len(released) < 4:
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert spurts == [3]  # one attempt, then a plain wait for tick 3's slot
    assert clock.phase_s >= -MAX_PULL_S and released[3].audio is not None
