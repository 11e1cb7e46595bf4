"""Prometheus metrics and structured logs (DESIGN §2: the latency marks feed the events, the logs and Prometheus).

Metrics live in a ``CollectorRegistry`` of their own, one ``Metrics`` per app
(``app.state.metrics``), so several apps in one process (the tests) never
collide on metric names and each ``/metrics`` reports only its own server.

What a session does is counted by wrapping its output (``Metrics.observe``):
every event and tick a session sends passes through one place, so turns,
errors, barge-ins, latency marks and frames are counted from exactly what the
client receives, without the engine knowing about metrics. Current state
(sessions, jobs) is read from the app when Prometheus scrapes, so a gauge can
never drift from the truth because some code path forgot to decrement it.

Wiring: ``setup_metrics(app)`` in the app factory; a transport passes
``metrics.observe(output)`` to the ``ConversationSession`` it creates, calls
``metrics.session_started(transport)`` once the session is admitted and
``metrics.record_error(code)`` for refusals it sends before any session exists.

Logs: ``configure_logging`` installs one handler with either a text or a JSON
lines formatter. Session and turn ids come from context variables that a
``logging.Filter`` copies onto every record. asyncio tasks inherit the context
they were created in, so setting ``session_id_var`` where a session starts
labels the logs of the tasks started from there; ``task_context`` labels a
task explicitly wherever it is created.
"""

from __future__ import annotations

import asyncio
import contextvars
import json as jsonlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import State

from avatalk.avatars.jobs import ACTIVE_STATES
from avatalk.media.timebase import TICK_S

if TYPE_CHECKING:
    from avatalk.streaming.session import SessionOutput

#: Latency marks of a turn (``_Response.marks_ms``), in the order they happen.
LATENCY_STAGES = ("asr_final", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio", "first_frame")
#: Seconds; dense where the targets are (0.6 to 1 s to the first frame), up to 5 s for a struggling CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
TURN_STATUSES = ("completed", "interrupted", "failed", "empty")
INTERRUPT_REASONS = ("barge_in", "client_cancel", "new_input")
TRANSPORTS = ("ws", "webrtc")
#: A frame that reaches the client more than one tick after its due time has missed its slot.
LATE_FRAME_S = TICK_S
#: The media clock re-anchors its timeline when it falls this far behind (see ``MediaClock.run``).
REANCHOR_S = 1.0


class _AppStateCollector(Collector):
    """Gauges read from the app at scrape time: sessions by transport, session capacity, jobs by state."""

    def __init__(self) -> None:
        self.state: State | None = None

    def collect(self) -> Iterable[Metric]:
        state = self.state
        if state is None:
            return
        registry = getattr(state, "sessions", None)
        if registry is not None:
            # Every session is in the registry; WebRTC ones are also in the calls table once answered
            # (a call still negotiating its offer, for milliseconds, counts as ws).
            webrtc = len(getattr(state, "webrtc_calls", {}))
            sessions = GaugeMetricFamily(
                "avatalk_active_sessions", "Conversation sessions open now", labels=["transport"]
            )
            sessions.add_metric(["ws"], max(0, registry.active - webrtc))
            sessions.add_metric(["webrtc"], webrtc)
            yield sessions
            yield GaugeMetricFamily(
                "avatalk_session_capacity", "Most sessions admitted at once (limits.max_sessions)", registry.capacity
            )
        runner = getattr(state, "jobs", None)
        if runner is not None:
            counts = dict.fromkeys(sorted(ACTIVE_STATES), 0)
            for job in runner.store.list(limit=None, states=ACTIVE_STATES):
                counts[job.state] += 1
            jobs = GaugeMetricFamily("avatalk_jobs", "Avatar and render jobs waiting or running", labels=["state"])
            for job_state, count in counts.items():
                jobs.add_metric([job_state.value], count)
            yield jobs


class Metrics:
    """All metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._state = _AppStateCollector()
        self.registry.register(self._state)
        self.sessions = Counter(
            "avatalk_sessions", "Conversation sessions started", ["transport"], registry=self.registry
        )
        self.turns = Counter(
            "avatalk_turns", "Assistant responses that ended, by how they ended", ["status"], registry=self.registry
        )
        self.errors = Counter(
            "avatalk_errors", "Error events sent to clients, by code", ["code"], registry=self.registry
        )
        self.barge_ins = Counter(
            "avatalk_barge_ins",
            "Replies cut short: spoken barge-in, client cancel (a button barge-in) or new input",
            ["reason"],
            registry=self.registry,
        )
        self.frames = Counter("avatalk_frames", "Video frames sent, idle or speaking", ["kind"], registry=self.registry)
        self.late_frames = Counter(
            "avatalk_late_frames", "Video frames sent more than one tick after their due time", registry=self.registry
        )
        self.latency = Histogram(
            "avatalk_turn_latency_seconds",
            "Time from the end of user speech (input=voice) or a typed message (input=text) to each stage",
            ["stage", "input"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Known label values start at zero, so rates work from the first scrape.
        for transport in TRANSPORTS:
            self.sessions.labels(transport)
        for status in TURN_STATUSES:
            self.turns.labels(status)
        for reason in INTERRUPT_REASONS:
            self.barge_ins.labels(reason)
        for kind in ("idle", "speaking"):
            self.frames.labels(kind)

    def track_app(self, state: State) -> None:
        """Read sessions and jobs from this app state when scraped."""
        self._state.state = state

    def observe(self, output: SessionOutput) -> ObservedOutput:
        """Wrap a new session's output so that what it sends is counted."""
        return ObservedOutput(output, self)

    def session_started(self, transport: str) -> None:
        """Count a session the server admitted (``ws`` or ``webrtc``)."""
        self.sessions.labels(transport).inc()

    def record_error(self, code: str) -> None:
        """Count an error event (for errors a transport sends outside any session's output)."""
        self.errors.labels(code).inc()

    def record_event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Count one server event (the protocol's ``type`` and fields)."""
        if kind == "response.done":
            self.turns.labels(str(fields.get("status"))).inc()
        elif kind == "error":
            self.record_error(str(fields.get("code")))
        elif kind == "response.interrupted":
            self.barge_ins.labels(str(fields.get("reason"))).inc()
        elif kind == "latency":
            marks = fields.get("marks_ms")
            # Only LLM replies: a greeting's marks count from when it was triggered, not from user input.
            if isinstance(marks, Mapping) and "llm_first_token" in marks:
                source = "voice" if "asr_final" in marks else "text"
                for stage in LATENCY_STAGES:
                    if stage in marks:
                        self.latency.labels(stage, source).observe(float(marks[stage]) / 1000.0)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class ObservedOutput:
    """A session output that counts what passes through it, then hands it on unchanged.

    Frame lateness is measured against the session's own timeline: tick k is
    due ``k * TICK_S`` after the clock started, and the clock never sends a
    tick early, so the earliest ``sent_at - k * TICK_S`` seen is the start.
    A frame is late when the send to the client finishes more than
    ``LATE_FRAME_S`` after that; when the clock re-anchors (over
    ``REANCHOR_S`` behind) the timeline here is re-anchored too.
    """

    def __init__(self, inner: SessionOutput, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self._metrics = metrics
        self._clock = clock  # the session clock's time source (tests give their own)
        self._anchor: float | None = None

    async def send_event(self, kind: str, **fields: object) -> None:
        self._metrics.record_event(kind, fields)
        await self.inner.send_event(kind, **fields)

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        await self.inner.send_tick(tick, audio, frame)
        if frame is None:
            return
        self._metrics.frames.labels("idle" if audio is None else "speaking").inc()
        start = self._clock() - tick * TICK_S
        if self._anchor is None or start < self._anchor:
            self._anchor = start
        behind = start - self._anchor
        if behind > LATE_FRAME_S:
            self._metrics.late_frames.inc()
            if behind > REANCHOR_S:
                self._anchor = start


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus scrape endpoint (text format, or OpenMetrics when asked for)."""
    metrics: Metrics = request.app.state.metrics
    # Collecting reads the jobs database: keep it off the event loop.
    body, content_type = await asyncio.to_thread(metrics.exposition, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


def setup_metrics(app: FastAPI) -> Metrics:
    """Give ``app`` its own metrics (``app.state.metrics``) and the ``GET /metrics`` route."""
    metrics = Metrics()
    metrics.track_app(app.state)
    app.state.metrics = metrics
    app.include_router(router)
    return metrics


# --- Structured logging ------------------------------------------------------------------

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("avatalk_session_id", default=None)
turn_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("avatalk_turn_id", default=None)


def task_context(session_id: str, turn_id: int | None = None) -> contextvars.Context:
    """A copy of the current context with the session's (and turn's) ids set, for a task of that session.

    ``asyncio.create_task(coro, context=task_context(self.id, turn_id))`` labels
    the task's logs, and those of the tasks it starts, wherever it was created
    (a WebRTC callback runs in aiortc's context, not the request's) and without
    changing the context of the task that created it.
    """
    context = contextvars.copy_context()
    context.run(session_id_var.set, session_id)
    context.run(turn_id_var.set, turn_id)
    return context


class ContextFilter(logging.Filter):
    """Adds ``session_id`` and ``turn_id`` to every record, unless ``extra=`` already set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = session_id_var.get()
        if getattr(record, "turn_id", None) is None:
            record.turn_id = turn_id_var.get()
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra=``. (uvicorn adds
# ``color_message``, the message with terminal colour codes, which has no place in JSON.)
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_ID_FIELDS = ("session_id", "turn_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, ``extra=`` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ``[session turn]`` when the record has them."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = [f"{key}={getattr(record, key)}" for key in _ID_FIELDS if getattr(record, key, None) is not None]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _AvatalkHandler(logging.StreamHandler[TextIO]):
    """Marks the handler ``configure_logging`` installed, so calling it again replaces it."""


def configure_logging(level: str | int, json: bool) -> None:
    """Send all logs (uvicorn's too) to stderr as text or JSON lines, with session and turn ids.

    Run ``uvicorn`` with ``log_config=None`` afterwards, or it installs its
    own handlers over these.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _AvatalkHandler)]:
        root.removeHandler(handler)
    handler = _AvatalkHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
