"""The client side of an avatalk render-only session (docs/protocol.md, "Render-only sessions").

``open_render_session`` opens the WebSocket and configures the session;
``send_event`` sends a JSON event on it. ``AvatalkVideoService``
(``pipecat.py``) drives the session from a Pipecat pipeline.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

DEFAULT_URL = "ws://127.0.0.1:8000/v1/ws"


class AvatalkError(Exception):
    """The avatalk server refused the render session (a configuration mistake: retrying cannot help)."""


@dataclass(eq=False)
class Utterance:
    """One TTS reply as sent: from its first audio to its commit (``end_s``, seconds sent since the last clear).

    ``utterance_id`` is the server's: it numbers a session's utterances from 1
    in the order their first audio arrives, clears or not, so both sides count alike.
    """

    utterance_id: int
    context_id: str | None
    end_s: float | None = None


async def open_render_session(url: str, api_key: str | None, session: dict[str, Any]) -> tuple[ClientConnection, str]:
    """Open a render session configured with ``session``: the connection and the session's id.

    Raises ``AvatalkError`` when the server refuses its configuration.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    ws = await websockets.connect(url, additional_headers=headers, max_size=8 * 1024 * 1024, open_timeout=15)
    try:
        created = await next_event(ws)
        if created.get("type") != "session.created":
            raise ConnectionError(f"avatalk did not open a session: {created.get('message', created)}")
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        answer = await next_event(ws)
        if answer.get("type") == "error":
            raise AvatalkError(f"avatalk refused the render session: {answer['code']}: {answer['message']}")
        if answer.get("type") != "session.updated":
            raise ConnectionError(f"unexpected answer to session.update: {answer.get('type')}")
    except BaseException:
        await ws.close()
        raise
    return ws, created["session"]["id"]


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    """The next JSON event (before configuration the server sends no binary frames)."""
    async with asyncio.timeout(15):
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                event: dict[str, Any] = json.loads(message)
                return event


async def send_event(ws: ClientConnection | None, event: dict[str, Any]) -> None:
    """Send a JSON event; nothing when not connected or the connection just closed (the reader notices)."""
    if ws is None:
        return
    try:
        await ws.send(json.dumps(event))
    except websockets.ConnectionClosed:
        pass  # the reader notices and reconnects
