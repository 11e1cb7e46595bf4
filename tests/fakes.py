"""Shared by several test files: real servers on loopback (for the app or a test double) and free ports."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.types import ASGIApp


class LiveServer:
    """A real uvicorn server on 127.0.0.1 (random port) in a background thread."""

    def __init__(self, app: ASGIApp, ws_max_size: int = 4 * 1024 * 1024, lifespan: str = "on") -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            ws="websockets-sansio",
            ws_max_size=ws_max_size,
            log_level="warning",
            lifespan=lifespan,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        self.app = app

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@contextmanager
def fake_server(app: Starlette) -> Iterator[str]:
    """Serve a test double ``app`` on loopback; yields its OpenAI-style base URL."""
    server = LiveServer(app, lifespan="off")
    try:
        yield f"{server.base_url}/v1"
    finally:
        server.stop()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
