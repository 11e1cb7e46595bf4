"""Prometheus metrics from the typed events sessions send (DESIGN §2: the latency marks feed the events, the logs and Prometheus).

Metrics live in a ``CollectorRegistry`` of their own, one ``Metrics`` per app
(the server's ``Services.metrics``), so several apps in one process (the tests) never
collide on metric names and each ``/metrics`` reports only its own server.

What a session does is counted by wrapping its output (``Metrics.observe``):
every event and tick a session sends passes through one place, so turns,
errors, barge-ins, latency marks and frames are counted from exactly what the
client receives (the typed event objects, never their JSON), without the
engine knowing about metrics. Current state
(sessions, jobs) is read from the app when Prometheus scrapes, so a gauge can
never drift from the truth because some code path forgot to decrement it.

Wiring: ``setup_metrics(app, services)`` in the app factory; a transport passes
``metrics.observe(output)`` to the ``ConversationSession`` it creates, calls
``metrics.session_started(transport)`` once the session is admitted and
``metrics.record_error(code)`` for refusals it sends before any session exists.

Logs are configured by ``avatalk.logs``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sized
from typing import TYPE_CHECKING, Protocol, get_args

import numpy as np
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from avatalk.avatars.renderers.base import FallbackReason
from avatalk.jobs import ACTIVE_STATES
from avatalk.media.timebase import TICK_S
from avatalk.streaming.clock import PHASE_RELAX_S
from avatalk.streaming.events import (
    LATENCY_MARKS,
    ErrorEvent,
    InterruptReason,
    Latency,
    ResponseDone,
    ResponseInterrupted,
    ServerEvent,
    TurnStatus,
    WarningEvent,
)

if TYPE_CHECKING:
    from avatalk.jobs import JobRunner
    from avatalk.streaming.stage import SessionOutput

#: Seconds; dense where the targets are (0.6 to 1 s to the first frame), up to 5 s for a struggling CPU.
LATENCY_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
TURN_STATUSES: tuple[TurnStatus, ...] = get_args(TurnStatus)
INTERRUPT_REASONS: tuple[InterruptReason, ...] = get_args(InterruptReason)
#: Why a session's frames were drawn by the classic renderer instead of the configured one.
FALLBACK_REASONS: tuple[FallbackReason, ...] = get_args(FallbackReason)
TRANSPORTS = ("ws", "webrtc")
#: A frame that reaches the client more than one tick after its due time has missed its slot.
LATE_FRAME_S = TICK_S
#: The media clock re-anchors its timeline when it falls this far behind (see ``MediaClock.run``).
REANCHOR_S = 1.0


class SessionCount(Protocol):
    """How full the server's session registry is."""

    @property
    def active(self) -> int: ...

    @property
    def capacity(self) -> int: ...


class ScrapedServer(Protocol):
    """What the metrics read from a server (the server's ``Services``).

    A protocol, so that this module needs nothing from the server package
    that uses it.
    """

    @property
    def metrics(self) -> Metrics: ...

    @property
    def sessions(self) -> SessionCount: ...

    @property
    def webrtc_calls(self) -> Sized: ...

    @property
    def jobs(self) -> JobRunner | None: ...


class _AppStateCollector(Collector):
    """Gauges read from the server at scrape time: sessions by transport, session capacity, jobs by state."""

    def __init__(self) -> None:
        self.server: ScrapedServer | None = None

    def collect(self) -> Iterable[Metric]:
        server = self.server
        if server is None:
            return
        registry = server.sessions
        # Every session is in the registry; WebRTC ones are also in the calls table once answered
        # (a call still negotiating its offer, for milliseconds, counts as ws).
        webrtc = len(server.webrtc_calls)
        sessions = GaugeMetricFamily("avatalk_active_sessions", "Conversation sessions open now", labels=["transport"])
        sessions.add_metric(["ws"], max(0, registry.active - webrtc))
        sessions.add_metric(["webrtc"], webrtc)
        yield sessions
        yield GaugeMetricFamily(
            "avatalk_session_capacity", "Most sessions admitted at once (limits.max_sessions)", registry.capacity
        )
        runner = server.jobs
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
        self.renderer_fallbacks = Counter(
            "avatalk_renderer_fallbacks",
            "Sessions whose frames the classic renderer drew instead of the configured one, by reason",
            ["reason"],
            registry=self.registry,
        )
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
        for fallback in FALLBACK_REASONS:
            self.renderer_fallbacks.labels(fallback)

    def track_app(self, server: ScrapedServer) -> None:
        """Read sessions and jobs from ``server`` when scraped."""
        self._state.server = server

    def observe(self, output: SessionOutput) -> ObservedOutput:
        """Wrap a new session's output so that what it sends is counted."""
        return ObservedOutput(output, self)

    def session_started(self, transport: str) -> None:
        """Count a session the server admitted (``ws`` or ``webrtc``)."""
        self.sessions.labels(transport).inc()

    def record_error(self, code: str) -> None:
        """Count an error event (for errors a transport sends outside any session's output)."""
        self.errors.labels(code).inc()

    def record_event(self, event: ServerEvent) -> None:
        """Count one server event."""
        if isinstance(event, ResponseDone):
            self.turns.labels(event.status).inc()
        elif isinstance(event, ErrorEvent):
            self.record_error(event.code)
        elif isinstance(event, ResponseInterrupted):
            self.barge_ins.labels(event.reason).inc()
        elif isinstance(event, WarningEvent) and event.code == "renderer_fallback" and event.reason is not None:
            self.renderer_fallbacks.labels(event.reason).inc()
        elif isinstance(event, Latency):
            marks = event.marks_ms
            # Only LLM replies: a greeting's marks count from when it was triggered, not from user input.
            if "llm_first_token" in marks:
                source = "voice" if "asr_final" in marks else "text"
                for stage in LATENCY_MARKS:
                    if stage in marks:
                        self.latency.labels(stage, source).observe(marks[stage] / 1000.0)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper asked for (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class ObservedOutput:
    """A session output that counts what passes through it, then hands it on unchanged.

    Frame lateness is measured against the session's own timeline: tick k is
    due ``k * TICK_S`` after the clock started, and the clock never sends a
    tick early, so the earliest ``sent_at - k * TICK_S`` seen is the start.
    A talk spurt moves the clock's timeline earlier (seen here as a new
    earliest start) and idle ticks move it back by at most
    ``PHASE_RELAX_S`` each, which idle ticks let the start here follow.
    A frame is late when the send to the client finishes more than
    ``LATE_FRAME_S`` after that; when the clock re-anchors (over
    ``REANCHOR_S`` behind) the timeline here is re-anchored too.
    """

    def __init__(self, inner: SessionOutput, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self._metrics = metrics
        self._clock = clock  # the session clock's time source (tests give their own)
        self._anchor: float | None = None

    async def send_event(self, event: ServerEvent) -> None:
        self._metrics.record_event(event)
        await self.inner.send_event(event)

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        await self.inner.send_tick(tick, audio, frame)
        if frame is None:
            return
        self._metrics.frames.labels("idle" if audio is None else "speaking").inc()
        start = self._clock() - tick * TICK_S
        if self._anchor is None or start < self._anchor:
            self._anchor = start
        if audio is None:
            self._anchor = min(start, self._anchor + PHASE_RELAX_S)
        behind = start - self._anchor
        if behind > LATE_FRAME_S:
            self._metrics.late_frames.inc()
            if behind > REANCHOR_S:
                self._anchor = start


def setup_metrics(app: FastAPI, server: ScrapedServer) -> Metrics:
    """Serve ``server.metrics`` at ``GET /metrics``; its gauges read ``server`` when scraped."""
    metrics = server.metrics
    metrics.track_app(server)

    async def metrics_endpoint(request: Request) -> Response:
        """Prometheus scrape endpoint (text format, or OpenMetrics when asked for)."""
        # Collecting reads the jobs database: keep it off the event loop.
        body, content_type = await asyncio.to_thread(metrics.exposition, request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    return metrics
