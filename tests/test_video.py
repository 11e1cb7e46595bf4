"""The video stage alone: a fake renderer, a real clock, frames checked tick by tick."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from stage_fakes import Collector, FakeRendererSession

from avatalk.avatars.renderers import SpeechSegment
from avatalk.executors import Executors
from avatalk.media.timebase import TICK_S
from avatalk.streaming.clock import MediaClock
from avatalk.streaming.events import WarningEvent
from avatalk.streaming.video import LEAD_MARGIN_S, LEAD_MIN_FRAMES, MIN_LEAD_S, VideoStage


async def speaking_tick(clock: MediaClock):
    if not clock.busy:
        await clock.enqueue(1, np.full(16000, 0.2, np.float32), np.full(16000, 0.2, np.float32))
    return clock.next_tick()


async def test_speaking_ticks_get_rendered_frames_and_silent_ones_idle_frames() -> None:
    clock, renderer, collector = MediaClock(16000), FakeRendererSession(), Collector()
    video = VideoStage(renderer, clock, Executors.create().render, collector.send_event)
    silent = clock.next_tick()
    await video.prepare(silent)
    assert silent.frame is renderer.idle
    tick = await speaking_tick(clock)
    await video.prepare(tick)
    assert tick.frame is renderer.speaking and renderer.renders == 1 and video.late_frames == 0


async def test_a_slow_renderer_falls_back_to_idle_frames_and_warns_once() -> None:
    clock, renderer, collector = MediaClock(16000), FakeRendererSession(render_s=0.3), Collector()
    video = VideoStage(renderer, clock, Executors.create().render, collector.send_event)
    frames = []
    for _ in range(4):
        tick = await speaking_tick(clock)
        await video.prepare(tick)
        frames.append(tick.frame)
    # The first render overran its budget; the next ticks do not start another one while it runs.
    assert all(frame is renderer.idle for frame in frames)
    assert video.late_frames == 4
    warnings = collector.of_type(WarningEvent)
    assert len(warnings) == 1 and warnings[0].code == "renderer_behind" and warnings[0].late_frames == 1
    await video.close()
    assert renderer.renders == 1  # one render ran; the renderer was never called from two threads


async def test_reset_reaches_the_renderer_before_its_next_frame() -> None:
    clock, renderer, collector = MediaClock(16000), FakeRendererSession(), Collector()
    video = VideoStage(renderer, clock, Executors.create().render, collector.send_event)
    video.reset()
    tick = clock.next_tick()  # silent: the reset still happens, on the render executor
    await video.prepare(tick)
    assert renderer.resets == 1 and tick.frame is renderer.idle
    await video.prepare(await speaking_tick(clock))
    assert renderer.resets == 1


async def test_look_ahead_gets_the_queued_segments_placed_on_the_timeline() -> None:
    class LookingRenderer(FakeRendererSession):
        uses_look_ahead = True

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[list[tuple[int, int]]] = []

        def look_ahead(self, tick: int, segments: Sequence[SpeechSegment]) -> None:
            self.seen.append([(segment.start, len(segment.audio)) for segment in segments])

    clock, renderer = MediaClock(16000), LookingRenderer()
    video = VideoStage(renderer, clock, Executors.create().render, Collector().send_event)
    await clock.enqueue(1, np.full(3200, 0.2, np.float32), np.full(3200, 0.2, np.float32))  # 5 ticks
    await clock.enqueue(1, np.full(1000, 0.2, np.float32), np.full(1000, 0.2, np.float32))  # the next sentence
    await video.prepare(clock.next_tick())
    await asyncio.sleep(0)
    assert renderer.seen == [[(0, 3200), (3200, 1000)]]  # both whole, the first one partly played


async def test_the_clock_lead_follows_how_long_frames_take_except_for_look_ahead_renderers() -> None:
    """Fast frames shorten the lead (never below MIN_LEAD_S); slow ones lengthen it; MuseTalk-like keeps a tick."""
    for render_s, look_ahead in [(0.0, False), (0.02, False), (0.0, True)]:
        clock, renderer = MediaClock(16000), FakeRendererSession(render_s)
        renderer.uses_look_ahead = look_ahead
        video = VideoStage(renderer, clock, Executors.create().render, Collector().send_event)
        leads = []
        for _ in range(LEAD_MIN_FRAMES):
            leads.append(clock.lead_s)
            await video.prepare(await speaking_tick(clock))
            await asyncio.sleep(0)  # the draw's done-callback
        assert leads == [TICK_S] * LEAD_MIN_FRAMES  # one tick until enough frames were measured
        if look_ahead:
            assert clock.lead_s == TICK_S
        elif render_s:
            assert render_s + LEAD_MARGIN_S <= clock.lead_s <= TICK_S
        else:
            assert MIN_LEAD_S <= clock.lead_s < TICK_S
