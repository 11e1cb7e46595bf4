"""The call page in viewer mode, in a real browser: watching a render session whose agent uses the WebSocket.

Chromium (Playwright) as in tests/test_browser.py, skipped the same way without
it. The agent is the reference WebSocket client; the page gets the session's
frames and audio over WebRTC with the viewer token the agent minted.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import test_browser
from test_browser import chromium, until

from avatalk.client import AvatalkClient
from avatalk.media.audio import write_wav
from avatalk.server.services import services

pytestmark = test_browser.pytestmark  # the same marks and skips: slow, Chromium, Playwright

RATE = 24000


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(webrtc={"host_addresses": ["127.0.0.1"]})


async def test_the_viewer_page_watches_a_render_session_until_it_ends(server, tmp_path) -> None:
    silence = tmp_path / "silence.wav"  # Chromium wants a fake microphone file; viewer mode never opens it
    write_wav(silence, np.zeros(48000, np.float32), 48000)
    agent = AvatalkClient(server.ws_url)
    await agent.connect()
    created = await agent.wait_for(lambda e: e["type"] == "session.created")
    session_id = created["session"]["id"]
    await agent.configure(RATE, RATE, mode="render", video=True, video_size=128)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            grant = (await http.post(f"/v1/webrtc/{session_id}/viewer-token", json={})).json()
        async with chromium(silence, tmp_path / "profile") as page:
            await page.goto(server.base_url + grant["page_path"] + "&autostart=1")
            status = await until(page, lambda s: s["state"] == "watching", 30, "the viewer watching")
            assert status["connection"] == "connected"
            assert await page.locator("#mute").is_hidden() and await page.locator("#picker-wrap").is_hidden()
            assert "token=" not in page.url  # the token leaves the address bar
            status = await until(page, lambda s: s["frames"] >= 10, 30, "idle frames decoded")

            t = np.arange(RATE) / RATE
            speech = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
            await agent.send_audio(speech)
            await agent.send_event("output_audio_buffer.commit")
            await agent.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", timeout=30)
            await until(page, lambda s: s["frames"] >= status["frames"] + 25, 30, "frames while the avatar spoke")
            size = await page.evaluate(
                "() => { const v = document.getElementById('remote-video'); return [v.videoWidth, v.videoHeight]; }"
            )
            assert max(size) == 128, size

            await agent.close()  # the render session ends: the server hangs its viewer up
            status = await until(page, lambda s: s["state"] == "error", 30, "the viewer told the session ended")
            assert "render session ended" in status["error"]["message"]  # not "connection lost"
            deadline = time.monotonic() + 10
            while services(server.app).webrtc_viewers and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not services(server.app).webrtc_viewers

            await page.goto(server.base_url + f"/?view={session_id}&token=forged.token&autostart=1")
            status = await until(page, lambda s: s["state"] == "error", 30, "the refusal")
            assert "viewer token" in status["error"]["message"]
            assert page.errors == []  # type: ignore[attr-defined]
    finally:
        await agent.close()
