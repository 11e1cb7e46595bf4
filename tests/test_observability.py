"""Metrics counted from what sessions send, the /metrics route, and JSON logs with session ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from avatalk import logs
from avatalk.client import AvatalkClient
from avatalk.logs import ContextFilter, JsonFormatter, configure_logging, session_id_var, task_context, turn_id_var
from avatalk.media.timebase import TICK_S
from avatalk.streaming.clock import MAX_PULL_S, PHASE_RELAX_S
from avatalk.observability import Metrics, ObservedOutput, setup_metrics
from avatalk.streaming.events import ErrorEvent, Latency, ResponseDone, ResponseInterrupted, ServerEvent


class RecordingOutput:
    """A session output that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[ServerEvent] = []
        self.ticks: list[int] = []

    async def send_event(self, event: ServerEvent) -> None:
        self.events.append(event)

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        self.ticks.append(tick)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


async def test_events_are_counted_and_passed_on_unchanged() -> None:
    metrics = Metrics()
    inner = RecordingOutput()
    output = metrics.observe(inner)
    metrics.session_started("ws")
    first = ResponseDone(turn_id=1, status="completed", text="Hi.")
    await output.send_event(first)
    await output.send_event(ResponseDone(turn_id=2, status="interrupted", text=""))
    await output.send_event(ResponseInterrupted(turn_id=2, reason="barge_in", spoken_text=""))
    await output.send_event(ErrorEvent(code="invalid_json", message="text frames must be JSON objects"))
    await output.send_event(ErrorEvent(code="invalid_json", message="again"))
    metrics.record_error("server_full")
    assert inner.events[0] is first
    assert len(inner.events) == 5
    assert value(metrics, "avatalk_sessions_total", transport="ws") == 1
    assert value(metrics, "avatalk_turns_total", status="completed") == 1
    assert value(metrics, "avatalk_turns_total", status="interrupted") == 1
    assert value(metrics, "avatalk_barge_ins_total", reason="barge_in") == 1
    assert value(metrics, "avatalk_errors_total", code="invalid_json") == 2
    assert value(metrics, "avatalk_errors_total", code="server_full") == 1


async def test_latency_marks_feed_the_histograms_but_greetings_do_not() -> None:
    metrics = Metrics()
    output = metrics.observe(RecordingOutput())
    voice = {
        "asr_final": 120.0,
        "llm_first_token": 300.0,
        "first_sentence": 420.0,
        "tts_first_audio": 450.0,
        "first_audio": 480.0,
    }
    await output.send_event(Latency(turn_id=1, marks_ms=voice))
    await output.send_event(
        Latency(turn_id=2, marks_ms={"llm_first_token": 90.0, "first_audio": 250.0, "first_frame": 250.0})
    )
    await output.send_event(Latency(turn_id=3, marks_ms={"tts_first_audio": 20.0, "first_audio": 40.0}))  # a greeting
    histogram = "avatalk_turn_latency_seconds"
    assert value(metrics, f"{histogram}_count", stage="first_audio", input="voice") == 1
    assert value(metrics, f"{histogram}_sum", stage="first_audio", input="voice") == pytest.approx(0.48)
    assert value(metrics, f"{histogram}_bucket", stage="asr_final", input="voice", le="0.15") == 1
    assert value(metrics, f"{histogram}_count", stage="first_frame", input="text") == 1
    assert value(metrics, f"{histogram}_count", stage="first_audio", input="text") == 1
    assert value(metrics, f"{histogram}_count", stage="tts_first_audio", input="text") == 0


async def test_frames_are_counted_and_late_ones_spotted() -> None:
    metrics = Metrics()
    inner = RecordingOutput()
    now = [100.0]
    output = ObservedOutput(inner, metrics, clock=lambda: now[0])
    frame = np.zeros((4, 4, 3), np.uint8)
    audio = np.zeros(960, np.float32)
    # Ticks 0-2 on time; tick 3 sent 100 ms late; tick 4 on time again; audio-only ticks are not frames.
    for tick, delay in [(0, 0.0), (1, 0.001), (2, 0.0), (3, 0.1), (4, 0.0)]:
        now[0] = 100.0 + tick * TICK_S + delay
        await output.send_tick(tick, audio if tick >= 2 else None, frame)
    await output.send_tick(5, audio, None)
    assert inner.ticks == [0, 1, 2, 3, 4, 5]
    assert value(metrics, "avatalk_frames_total", kind="idle") == 2
    assert value(metrics, "avatalk_frames_total", kind="speaking") == 3
    assert value(metrics, "avatalk_late_frames_total") == 1
    # The clock re-anchors when far behind: one late frame, then the new timeline is on time.
    for tick, delay in [(6, 2.0), (7, 2.0), (8, 2.0)]:
        now[0] = 100.0 + tick * TICK_S + delay
        await output.send_tick(tick, None, frame)
    assert value(metrics, "avatalk_late_frames_total") == 2


def fake_server() -> SimpleNamespace:
    """Stands for the server's ``Services``: what ``setup_metrics`` reads."""
    return SimpleNamespace(metrics=Metrics(), sessions=SimpleNamespace(active=0, capacity=8), webrtc_calls={}, jobs=None)


def fake_app_state(server: SimpleNamespace, active: int, webrtc: int, jobs: Any = None) -> None:
    """Sessions and calls as plain counts; ``jobs`` is a real ``JobRunner`` (its real store), or None."""
    server.sessions = SimpleNamespace(active=active, capacity=8)
    server.webrtc_calls = {f"call-{i}": object() for i in range(webrtc)}
    server.jobs = jobs


async def scrape(app: FastAPI, accept: str | None = None) -> httpx.Response:
    headers = {"Accept": accept} if accept else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        return await http.get("/metrics", headers=headers)


async def test_metrics_route_reads_sessions_and_jobs_at_scrape_time(tmp_path) -> None:
    from avatalk.jobs import JobRunner, JobState, SQLiteJobStore

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")  # the real store, queried as the server queries it
    queued = [store.create("render", params={}) for _ in range(3)]
    store.start(queued[0].id)  # one running, two queued
    done = store.create("render", params={})
    store.start(done.id)
    store.finish(done.id, JobState.SUCCEEDED, "done")  # ended jobs are not in the gauge
    app, server = FastAPI(), fake_server()
    metrics = setup_metrics(app, server)
    fake_app_state(server, active=3, webrtc=1, jobs=JobRunner(store, {}))
    metrics.record_error("invalid_json")
    response = await scrape(app)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'avatalk_active_sessions{transport="ws"} 2.0' in text
    assert 'avatalk_active_sessions{transport="webrtc"} 1.0' in text
    assert "avatalk_session_capacity 8.0" in text
    assert 'avatalk_jobs{state="queued"} 2.0' in text
    assert 'avatalk_jobs{state="running"} 1.0' in text
    assert 'avatalk_errors_total{code="invalid_json"} 1.0' in text
    assert "# TYPE avatalk_turn_latency_seconds histogram" in text
    assert 'state="succeeded"' not in text
    store.finish(queued[0].id, JobState.FAILED, "gone")
    assert 'avatalk_jobs{state="running"} 0.0' in (await scrape(app)).text  # read at each scrape
    store.close()
    fake_app_state(server, active=0, webrtc=0, jobs=None)
    assert 'avatalk_active_sessions{transport="ws"} 0.0' in (await scrape(app)).text
    openmetrics = await scrape(app, "application/openmetrics-text; version=1.0.0")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


async def test_two_apps_keep_their_own_metrics() -> None:
    first, second = FastAPI(), FastAPI()
    setup_metrics(first, fake_server()).record_error("invalid_json")
    setup_metrics(second, fake_server())
    assert 'code="invalid_json"' in (await scrape(first)).text
    assert 'code="invalid_json"' not in (await scrape(second)).text


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing JSON lines (with the context filter) to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    log = logging.getLogger("avatalk.test_observability")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield log, stream
    finally:
        log.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_json_logs_carry_the_ids_of_the_task_that_logged(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log

    async def session(session_id: str) -> None:
        session_id_var.set(session_id)
        log.info("session %s opened", session_id)

        async def turn() -> None:
            log.info("replying")

        await asyncio.create_task(turn(), context=task_context(session_id, 7))
        log.info("after the turn")

    async def callback_task() -> None:
        log.info("from a callback")

    await asyncio.gather(asyncio.create_task(session("s1")), asyncio.create_task(session("s2")))
    await asyncio.create_task(callback_task(), context=task_context("s3"))
    log.info("outside", extra={"session_id": "explicit", "sessions": 2})
    records = lines(stream)
    by_message = {(r["message"], r.get("session_id")): r for r in records}
    assert by_message[("session s1 opened", "s1")].get("turn_id") is None
    assert by_message[("replying", "s2")]["turn_id"] == 7
    assert "turn_id" not in by_message[("after the turn", "s1")]
    assert ("from a callback", "s3") in by_message
    outside = by_message[("outside", "explicit")]
    assert outside["sessions"] == 2 and outside["level"] == "INFO"
    assert outside["logger"] == "avatalk.test_observability"
    assert str(outside["time"]).endswith("+00:00")
    assert session_id_var.get() is None and turn_id_var.get() is None


def test_json_logs_include_exceptions(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, stream = json_log
    try:
        raise ValueError("bad frame")
    except ValueError:
        log.exception("turn failed")
    (record,) = lines(stream)
    assert record["message"] == "turn failed" and record["level"] == "ERROR"
    assert "ValueError: bad frame" in str(record["exception"])


def test_configure_logging_installs_one_handler_and_routes_uvicorn(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        configure_logging("info", json=False)
        configure_logging("debug", json=True)
        ours = [h for h in root.handlers if h not in before[0]]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        uvicorn_error = logging.getLogger("uvicorn.error")
        assert uvicorn_error.propagate and not uvicorn_error.handlers
        token = session_id_var.set("abc123")
        try:
            logging.getLogger("uvicorn.error").warning("hello %s", "there")
        finally:
            session_id_var.reset(token)
        record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert record["message"] == "hello there" and record["session_id"] == "abc123"
    finally:
        for handler in [h for h in root.handlers if h not in before[0]]:
            root.removeHandler(handler)
        root.setLevel(before[1])


def test_text_format_appends_ids() -> None:
    formatter = logs.TextFormatter()
    record = logging.LogRecord("avatalk.x", logging.INFO, __file__, 1, "latency %s", ({"first_audio": 1.0},), None)
    record.session_id, record.turn_id = "abc", 3
    assert formatter.format(record).endswith("avatalk.x: latency {'first_audio': 1.0} [session_id=abc turn_id=3]")


@pytest.mark.slow
async def test_a_live_conversation_shows_in_metrics_and_logs(
    live_server_factory: Callable[..., Any], json_log: tuple[logging.Logger, io.StringIO]
) -> None:
    """End to end, once the transports wrap their outputs (see avatalk.observability)."""
    _, stream = json_log
    handler = logging.getLogger("avatalk.test_observability").handlers[-1]
    session_logger = logging.getLogger("avatalk.streaming.session")
    session_logger.addHandler(handler)
    level = session_logger.level
    session_logger.setLevel(logging.INFO)
    server = live_server_factory()
    metrics_url = f"{server.base_url}/metrics"
    try:
        async with httpx.AsyncClient() as http, AvatalkClient(server.ws_url) as client:
            created = await client.wait_for(lambda e: e["type"] == "session.created")
            assert (await client.configure(16000, 24000, greeting=False))["type"] == "session.updated"
            await client.send_raw("not json")
            await client.send_event("conversation.item.create", text="Say hello.")
            done = await client.wait_for(lambda e: e["type"] == "response.done", timeout=90)
            assert done["status"] == "completed"
            text = (await http.get(metrics_url)).text
            assert 'avatalk_active_sessions{transport="ws"} 1.0' in text
            assert 'avatalk_sessions_total{transport="ws"} 1.0' in text
            assert 'avatalk_turns_total{status="completed"} 1.0' in text
            assert 'avatalk_errors_total{code="invalid_json"} 1.0' in text
            assert 'avatalk_turn_latency_seconds_count{input="text",stage="first_audio"} 1.0' in text
    finally:
        session_logger.removeHandler(handler)
        session_logger.setLevel(level)
    latency_logs = [line for line in lines(stream) if str(line["message"]).startswith("session ")]
    assert latency_logs, "the session logged nothing at INFO"
    assert all(line.get("session_id") == created["session"]["id"] for line in latency_logs)


async def test_a_talk_spurt_moving_the_timeline_is_not_counted_late() -> None:
    """The clock pulls a spurt's ticks up to MAX_PULL_S early, then idle ticks drift back PHASE_RELAX_S each."""
    metrics = Metrics()
    now = [100.0]
    output = ObservedOutput(RecordingOutput(), metrics, clock=lambda: now[0])
    frame, audio = np.zeros((4, 4, 3), np.uint8), np.zeros(960, np.float32)
    phase, tick = 0.0, 0
    for _spurt in range(3):
        phase = -MAX_PULL_S
        for _ in range(10):  # speaking ticks on the pulled timeline
            now[0] = 100.0 + tick * TICK_S + phase
            await output.send_tick(tick, audio, frame)
            tick += 1
        while phase < 0:  # idle ticks, each a little later, back to the start's timeline
            phase = min(0.0, phase + PHASE_RELAX_S)
            now[0] = 100.0 + tick * TICK_S + phase
            await output.send_tick(tick, None, frame)
            tick += 1
    assert value(metrics, "avatalk_late_frames_total") == 0
    now[0] = 100.0 + tick * TICK_S + 0.1  # a frame really 100 ms late still counts
    await output.send_tick(tick, audio, frame)
    assert value(metrics, "avatalk_late_frames_total") == 1
