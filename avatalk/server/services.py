"""The server's services as one typed object, shared by every route and transport of an app.

One ``Services`` per app, set once as ``app.state.services`` by the app
factory, instead of loose attributes on ``app.state``: a reader finds every
service the server has, and its type, in one place, and a typo is an
``AttributeError`` rather than a silently missing service. Several apps in
one process (the tests) each have their own.

The fields the lifespan fills in are ``None`` until then: ``models`` while
they load (``/readyz`` answers 503 and sessions are refused as ``not_ready``),
``avatar_store`` and ``jobs`` until ``setup_avatars`` has opened them (and
``jobs`` again after shutdown).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from avatalk.avatars.store import AvatarStore
from avatalk.config import Settings
from avatalk.jobs import JobRunner
from avatalk.observability import Metrics
from avatalk.server.auth import Authenticator
from avatalk.server.sessions import SessionRegistry
from avatalk.server.webrtc import Call, ViewerCall
from avatalk.streaming.models import EngineModels


@dataclass
class Services:
    """Everything a request or a session of this app may use."""

    settings: Settings
    authenticator: Authenticator
    metrics: Metrics
    sessions: SessionRegistry
    webrtc_calls: dict[str, Call] = field(default_factory=dict)
    """Answered WebRTC calls by session id (each session is in ``sessions`` too)."""
    webrtc_viewers: dict[str, ViewerCall] = field(default_factory=dict)
    """People watching render sessions over WebRTC, by viewer id (hung up when their session ends)."""
    models: EngineModels | None = None
    avatar_store: AvatarStore | None = None
    jobs: JobRunner | None = None

    def require_avatar_store(self) -> AvatarStore:
        """The avatar store, for routes: the lifespan opens it before the first request is served."""
        if self.avatar_store is None:
            raise RuntimeError("the avatar store is opened by the app's lifespan, which has not run")
        return self.avatar_store

    def require_jobs(self) -> JobRunner:
        """The job runner, for routes: the lifespan starts it before the first request is served."""
        if self.jobs is None:
            raise RuntimeError("the job runner is started by the app's lifespan, which has not run (or has ended)")
        return self.jobs

    @classmethod
    def create(cls, settings: Settings) -> Services:
        """The services an app has before its lifespan runs: nothing loaded, nothing opened."""
        return cls(
            settings=settings,
            authenticator=Authenticator(settings),
            metrics=Metrics(),
            sessions=SessionRegistry(settings.limits.max_sessions),
        )


def services(holder: HTTPConnection | Starlette) -> Services:
    """The services of the app behind a request or WebSocket (or of the app itself)."""
    app = holder if isinstance(holder, Starlette) else holder.app
    svc: Services = app.state.services
    return svc
