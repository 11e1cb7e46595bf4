"""Falling back to the classic renderer is never silent: a warning event with the reason, a metric, /readyz, doctor.

The renderer-level reasons (no latents, GPU full, model not loaded, device
error) are exercised with real MuseTalk models in ``test_musetalk.py``; here
the video stage, the metrics, ``/readyz`` and ``avatalk doctor`` are checked
with stand-in renderer sessions, so no model is loaded.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from stage_fakes import Collector, FakeRendererSession

from avatalk.avatars.renderers import (
    ClassicRenderer,
    FallbackRenderer,
    FallbackSession,
    Renderer,
    RendererCannotServe,
    RendererFallback,
    RendererSession,
)
from avatalk.avatars.store import LoadedAvatar
from avatalk.config import Settings
from avatalk.doctor import CheckError, check_renderer
from avatalk.executors import Executors
from avatalk.observability import Metrics
from avatalk.streaming.clock import MediaClock
from avatalk.streaming.events import ServerEvent, WarningEvent
from avatalk.streaming.models import EngineModels
from avatalk.streaming.video import VideoStage


class FailingSessionFake(FakeRendererSession):
    """Test double of a GPU session whose device fails at its first speaking frame."""

    uses_look_ahead = True

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def render(self, tick: int, audio: np.ndarray) -> np.ndarray:
        raise RendererCannotServe("device_error", "the GPU failed: RuntimeError: CUDA error: out of memory")

    def close(self) -> None:
        self.closed = True


class ClosingSessionFake(FakeRendererSession):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class RefusingRendererFake(Renderer):
    """Test double of a GPU renderer that is full."""

    name = "musetalk"

    def open(self, avatar: LoadedAvatar, output_size: int) -> RendererSession:
        raise RendererCannotServe("gpu_full", "the GPU already draws 16 sessions, its limit")


async def speaking_tick(clock: MediaClock):
    if not clock.busy:
        await clock.enqueue(1, np.full(16000, 0.2, np.float32), np.full(16000, 0.2, np.float32))
    return clock.next_tick()


async def test_a_session_that_starts_on_the_fallback_warns_once_with_the_reason_and_counts_it() -> None:
    fallback = ClosingSessionFake()
    session = FallbackSession(None, lambda: fallback, notice=RendererFallback("gpu_full", "the GPU is full"))
    clock, collector, metrics = MediaClock(16000), Collector(), Metrics()

    async def emit(event: ServerEvent) -> None:
        metrics.record_event(event)
        await collector.send_event(event)

    video = VideoStage(session, clock, Executors.create().render, emit)
    for _ in range(3):
        tick = await speaking_tick(clock)
        await video.prepare(tick)
        assert tick.frame is fallback.speaking
    warnings = collector.of_type(WarningEvent)
    assert len(warnings) == 1
    assert warnings[0].code == "renderer_fallback" and warnings[0].reason == "gpu_full"
    assert "classic" in warnings[0].message and "the GPU is full" in warnings[0].message
    assert metrics.renderer_fallbacks.labels("gpu_full")._value.get() == 1
    assert metrics.renderer_fallbacks.labels("device_error")._value.get() == 0
    await video.close()
    assert fallback.closed  # the video stage releases the renderer session (and with it a GPU slot)


async def test_a_device_error_mid_session_switches_to_classic_without_losing_the_frame() -> None:
    failing, classic = FailingSessionFake(), ClosingSessionFake()
    failures: list[RendererCannotServe] = []
    session = FallbackSession(failing, lambda: classic, on_failure=failures.append)
    collector = Collector()
    clock = MediaClock(16000)
    video = VideoStage(session, clock, Executors.create().render, collector.send_event)
    assert session.uses_look_ahead
    tick = await speaking_tick(clock)
    await video.prepare(tick)
    assert tick.frame is classic.speaking and failing.closed and not session.uses_look_ahead
    assert [failure.reason for failure in failures] == ["device_error"]
    await video.prepare(await speaking_tick(clock))  # the next tick reports the switch
    warnings = collector.of_type(WarningEvent)
    assert len(warnings) == 1 and warnings[0].reason == "device_error" and "out of memory" in warnings[0].message


def test_the_fallback_renderer_reports_which_renderers_are_live() -> None:
    renderer = FallbackRenderer("musetalk", RefusingRendererFake(), ClassicRenderer())
    assert [(status.name, status.live) for status in renderer.status()] == [("musetalk", True), ("classic", True)]
    down = FallbackRenderer("musetalk", None, ClassicRenderer(), unavailable="no CUDA GPU")
    assert [(status.name, status.live, status.reason) for status in down.status()] == [
        ("musetalk", False, "no CUDA GPU"),
        ("classic", True, None),
    ]
    with pytest.raises(ValueError):
        FallbackRenderer("musetalk", None, ClassicRenderer())


async def test_readyz_says_which_renderers_are_live(tmp_path: Path) -> None:
    from avatalk.server.app import create_app

    app = create_app(Settings(data_dir=tmp_path / "data"))
    renderer = FallbackRenderer("musetalk", None, ClassicRenderer(), unavailable="its weights are incomplete")
    # Only the renderer is read by /readyz; the other models are never touched.
    models = EngineModels(vad=None, asr=None, llm=None, tts=None, renderer=renderer)  # type: ignore[arg-type]
    app.state.services.models = models
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["renderers"] == {
        "musetalk": {"live": False, "reason": "its weights are incomplete"},
        "classic": {"live": True, "reason": None},
    }


def test_doctor_fails_a_configured_renderer_that_is_not_live(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    settings = Settings.model_validate(
        {"data_dir": tmp_path / "data", "avatars": {"renderer": "musetalk"}, "musetalk": {"models_dir": tmp_path}}
    )
    with pytest.raises(CheckError) as failed:
        check_renderer(settings)
    assert "musetalk is not live" in failed.value.detail and "drawn by classic" in failed.value.detail
    assert check_renderer(Settings(data_dir=tmp_path / "data")).detail == "classic; live: classic"
