"""Admitting and releasing conversation sessions: one place for every transport.

A session is admitted when the models are loaded, the server is not
shutting down, and the registry has a slot for its caller (the server's
capacity and the key's own limit). Both
transports (``/v1/ws`` and WebRTC signalling) go through ``admit``, so a
refusal is decided, counted and logged the same way whichever one the
client used; each transport only tells the client in its own way (an error
event and close code, or an HTTP 503).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Literal, TypeVar

from starlette.requests import HTTPConnection

from avatalk.server.auth import principal_of
from avatalk.server.services import Services, services
from avatalk.server.sessions import Transport
from avatalk.streaming.models import EngineModels
from avatalk.streaming.session import ConversationSession, SessionOutput

logger = logging.getLogger(__name__)

OutputT = TypeVar("OutputT", bound=SessionOutput)


class Refused(Exception):
    """A session that was not admitted: the error ``code`` and ``message`` the client is told."""

    def __init__(
        self, code: Literal["not_ready", "server_full", "server_shutdown"], message: str, retry_after_s: int
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def admit(
    connection: HTTPConnection, transport: Transport, make_output: Callable[[EngineModels], OutputT]
) -> tuple[ConversationSession, OutputT]:
    """A new session for the caller of ``connection``, registered and counted, and its output.

    ``make_output`` builds the transport's output once the models are known
    (a WebSocket encodes frames on the models' executors); the session sends
    through it wrapped by the metrics. Raises ``Refused`` while the models are
    loading, once the server is shutting down, or when the caller has no slot left.
    """
    svc = services(connection)
    models = svc.models
    if models is None:
        svc.metrics.record_error("not_ready")
        raise Refused("not_ready", "the server is still loading its models", retry_after_s=10)
    if svc.sessions.draining:
        svc.metrics.record_error("server_shutdown")
        raise Refused("server_shutdown", "the server is shutting down; connect again to reach another one", 1)
    output = make_output(models)
    session = ConversationSession(
        new_session_id(svc.settings.cluster.node_id), models, svc.settings, svc.metrics.observe(output), svc.avatar_store
    )
    reason = svc.sessions.try_add(session, principal_of(connection), transport)
    if reason is not None:
        svc.metrics.record_error("server_full")
        raise Refused("server_full", reason, retry_after_s=30)
    svc.metrics.session_started(transport)
    logger.info("session %s opened over %s (%d active)", session.id, transport, svc.sessions.active)
    return session, output


def new_session_id(node_id: str | None) -> str:
    """A fresh session id; behind a load balancer it starts with the node's name (``node2.3f9a...``).

    The balancer reads the node from the id to route every later request
    about the session (a WebRTC hang-up) to the node that holds it, without
    cookies or a shared table.
    """
    token = uuid.uuid4().hex[:12]
    return token if node_id is None else f"{node_id}.{token}"


def release(svc: Services, session: ConversationSession, reason: str) -> None:
    """Give the session's slot back (the transport then closes the session)."""
    svc.sessions.remove(session.id)
    logger.info("session %s ended: %s (%d active)", session.id, reason, svc.sessions.active)
