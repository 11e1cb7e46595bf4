"""FastAPI application factory: the app's services, lifespan (load models once), health and the routes.

Health for load balancers: ``/healthz`` (the process answers), ``/readyz``
(this node takes a new session now; see ``avatalk.server.node``) and, with
``cluster.agent_port``, HAProxy's agent-check port. The lifespan's shutdown
drains the sessions (``node.drain``) when nothing drained them before;
``avatalk serve`` drains on SIGTERM before uvicorn closes any socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from avatalk import __version__
from avatalk.config import Settings
from avatalk.observability import setup_metrics
from avatalk.server.auth import AuthMiddleware, RateLimiter, check_exposure
from avatalk.server.avatars_api import router as avatars_router
from avatalk.server.avatars_api import setup_avatars, shutdown_avatars
from avatalk.server.jobs_api import router as jobs_router
from avatalk.server.node import AgentServer, GracefulServer, drain, readiness
from avatalk.server.renders_api import router as renders_router
from avatalk.server.services import Services
from avatalk.server.tokens_api import router as tokens_router
from avatalk.server.webrtc import close_all_calls, set_host_addresses
from avatalk.server.webrtc_api import router as webrtc_router
from avatalk.server.websocket import router as websocket_router
from avatalk.streaming.models import EngineModels

logger = logging.getLogger(__name__)


def create_app(settings: Settings, models: EngineModels | None = None) -> FastAPI:
    """Build the app. ``models`` lets tests share one loaded set across several apps."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = models is None
        set_host_addresses(settings.webrtc.host_addresses)
        agent = AgentServer(svc)
        await setup_avatars(app, settings)
        try:
            if settings.cluster.agent_port is not None:
                # Up before the models: the balancer hears "down, loading" instead of nothing.
                await agent.start(settings.host, settings.cluster.agent_port)
            svc.models = models
            if owned:
                loaded = await asyncio.to_thread(EngineModels.load, settings)
                await loaded.warm_up(settings.persona)
                svc.models = loaded
            logger.info("avatalk %s ready on %s:%d", __version__, settings.host, settings.port)
            yield
        finally:
            await drain(app)
            await close_all_calls(svc.webrtc_calls)
            await agent.stop()
            await shutdown_avatars(app)
            if owned and svc.models is not None:
                await svc.models.aclose()

    check_exposure(settings)
    app = FastAPI(title="avatalk", version=__version__, lifespan=lifespan)
    svc = Services.create(settings)
    app.state.services = svc
    app.add_middleware(
        AuthMiddleware,
        authenticator=svc.authenticator,
        limiter=RateLimiter(settings.limits.jobs_per_minute),
    )
    if settings.auth.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.auth.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
        )
    setup_metrics(app, svc)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Readiness for a new session: 200 "ready"; 503 "loading" (models), "draining" (shutting down)
        or "full" (at ``limits.max_sessions``). A load balancer sends new sessions only to ready nodes;
        the sessions of a node that is full or draining go on. ``renderers`` says which renderers draw
        new sessions (a configured MuseTalk that is not live falls back to classic, with the reason)."""
        state = readiness(svc)
        body = state.body()
        if svc.models is not None and svc.models.renderer is not None:
            body["renderers"] = {
                status.name: {"live": status.live, "reason": status.reason} for status in svc.models.renderer.status()
            }
        return JSONResponse(body, status_code=200 if state.ready else 503)

    app.include_router(websocket_router)
    app.include_router(avatars_router)
    app.include_router(jobs_router)
    app.include_router(renders_router)
    app.include_router(webrtc_router)
    app.include_router(tokens_router)
    web_client = Path(__file__).resolve().parent.parent / "web_client"

    @app.get("/", include_in_schema=False)
    async def call_page() -> FileResponse:
        """The video-call page (kiosk and embed modes are query options of the same page)."""
        return FileResponse(web_client / "index.html")

    @app.get("/embed.js", include_in_schema=False)
    async def embed_script() -> FileResponse:
        return FileResponse(web_client / "embed.js", media_type="text/javascript")

    app.mount("/static", StaticFiles(directory=web_client), name="static")

    def openapi_schema() -> dict[str, Any]:
        """The generated schema, with error bodies as they really are.

        Every error is ``{"detail": ...}``: a sentence for errors the routes
        raise, FastAPI's list of field errors for a malformed body; both can
        answer 422 on the same route, so both shapes are declared.
        """
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            detail = {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}},
                ],
                "title": "Detail",
            }
            for name in ("HTTPValidationError", "ErrorOut"):
                component = schema.get("components", {}).get("schemas", {}).get(name)
                if component is not None:
                    component["properties"]["detail"] = detail
            # A body that is not even decodable (bad encoding, broken JSON) is refused with 400.
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if "requestBody" in operation:
                        operation["responses"].setdefault("400", {"description": "the body cannot be decoded"})
            for path in ("/v1/avatars", "/v1/avatars/from-path", "/v1/renders", "/v1/renders/from-audio"):
                limited = schema.get("paths", {}).get(path, {}).get("post")
                if limited is not None:
                    limited["responses"].setdefault("429", {"description": "too many jobs created this minute"})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_schema  # type: ignore[method-assign]
    return app


def serve(settings: Settings) -> None:
    """Serve the app on ``settings.host``/``port`` until SIGTERM or SIGINT, draining first."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        ws="websockets-sansio",
        ws_max_size=settings.limits.max_ws_message_bytes,
        # The drain has run by the time uvicorn shuts down; this bounds what is left (uploads, requests).
        timeout_graceful_shutdown=int(settings.limits.drain_s) + 5,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the handlers configure_logging installed
    )
    server = GracefulServer(config, app)
    server.run()
    if not server.started:  # the lifespan failed (uvicorn logged why): say so to the supervisor
        raise SystemExit(3)
