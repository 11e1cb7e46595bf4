"""The call page in a real browser: Chromium (Playwright) against a live server, WebRTC end to end.

Chromium's fake microphone plays a WAV file spoken by piper (and loops it); the page
is driven through its ``window.avatalk`` status object (docs/web-client.md). Nothing
is installed here: Chromium is looked up where ``make browser`` finds or puts it
(``chromium`` on PATH; Debian's package lands in ``/usr/bin``), and without it the
tests are skipped.
"""

from __future__ import annotations

import asyncio
import http.server
import importlib.util
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from avatalk.media.audio import write_wav
from avatalk.server.services import services



def find_chromium() -> Path | None:
    """The Chromium ``make browser`` uses: ``chromium`` on PATH (``chromium-browser`` on some distributions)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


CHROMIUM = find_chromium()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="no chromium on PATH (`make browser` installs it, or `apt-get install chromium`)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="Playwright is not installed (pip install -e '.[dev]')"
    ),
]

WAV_RATE = 48000
LEAD_SILENCE_S = 1.0
# Chromium loops the file: the silence after the question leaves time for the answer
# before the question comes round again (and barges in), even on a busy 2-core machine.
TRAIL_SILENCE_S = 14.0

STATUS_JS = """() => ({
  state: avatalk.state,
  connection: avatalk.connectionState,
  captions: avatalk.captions.map(c => ({role: c.role, turn: c.turnId, final: c.final, text: c.text,
                                        generated: c.generated || "", interrupted: c.interrupted})),
  latency: avatalk.lastLatency,
  shown: avatalk.firstFrameShownMs,
  frames: avatalk.framesDecoded(),
  error: avatalk.error,
})"""


def normalise(text: str) -> str:
    words = re.sub(r"[^a-z0-9 ]", "", text.lower()).split()
    return " ".join({"2": "two", "4": "four"}.get(word, word) for word in words)


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory(webrtc={"host_addresses": ["127.0.0.1"]})


@pytest.fixture(scope="module")
def question_wav(speech, tmp_path_factory) -> Path:
    voice = speech("What is two plus two?", WAV_RATE)
    lead = np.zeros(int(LEAD_SILENCE_S * WAV_RATE), np.float32)
    trail = np.zeros(int(TRAIL_SILENCE_S * WAV_RATE), np.float32)
    audio = np.concatenate([lead, voice, trail])
    path = tmp_path_factory.mktemp("browser") / "question.wav"
    write_wav(path, audio, WAV_RATE)
    return path


@asynccontextmanager
async def chromium(microphone: Path, profile: Path) -> AsyncIterator[object]:
    """A headless Chromium with a fake microphone playing ``microphone``; yields a page."""
    from playwright.async_api import async_playwright

    args = [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--allow-loopback-in-peer-connection",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=args,
            viewport={"width": 1100, "height": 760},
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.errors = []  # type: ignore[attr-defined]
            page.on("pageerror", lambda error: page.errors.append(str(error)))  # type: ignore[attr-defined]
            yield page
        finally:
            await context.close()


async def until(page, predicate: Callable[[dict], object], timeout: float, what: str) -> dict:
    """Poll the page's status until ``predicate`` is truthy; fail with the last status."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = await page.evaluate(STATUS_JS)
        if predicate(status):
            return status
        await asyncio.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; page status: {status}")


def said(caption: dict) -> bool:
    """An assistant caption with text (an interrupted one keeps what the LLM had produced)."""
    return bool((caption["text"] or caption["generated"]).strip())


def user_turns(status: dict, words: str) -> list[int]:
    return [
        c["turn"] for c in status["captions"] if c["role"] == "user" and c["final"] and words in normalise(c["text"])
    ]


async def test_spoken_question_gets_an_answer_with_video(server, question_wav, tmp_path):
    async with chromium(question_wav, tmp_path / "profile") as page:
        await page.goto(server.base_url + "/?autostart=1&aec=0&avatar=ava")
        await until(page, lambda s: s["connection"] == "connected", 30, "the WebRTC connection")

        # The question, recognised: a final caption of the user.
        status = await until(page, lambda s: user_turns(s, "two plus two"), 150, "the transcript 'two plus two'")
        asked = min(user_turns(status, "two plus two"))

        # The answer: assistant text for that turn (or a later repeat of the question).
        def answered(s: dict) -> bool:
            return any(
                c["role"] == "assistant" and c["turn"] is not None and c["turn"] >= asked and said(c)
                for c in s["captions"]
            )

        await until(page, answered, 90, "an assistant caption answering the question")

        # The avatar's video plays: frames keep being decoded while it speaks.
        status = await until(page, lambda s: s["state"] == "speaking", 90, "the avatar speaking")
        first = status["frames"]
        await until(page, lambda s: s["frames"] >= first + 5, 15, "video frames decoded while speaking")
        size = await page.evaluate("() => { const v = document.getElementById('remote-video'); "
                                   "return [v.videoWidth, v.videoHeight]; }")
        assert min(size) > 0, size

        # Latency of a reply to the user: the marks, and the first frame shown in the page.
        def shown_latency(s: dict) -> bool:
            latency = s["latency"]
            return bool(latency) and latency["turn_id"] >= asked and latency["first_frame_shown_ms"] is not None

        status = await until(page, shown_latency, 90, "the latency of an answer with its first frame shown")
        marks = status["latency"]["marks_ms"]
        assert {"asr_final", "first_audio", "first_frame"} <= set(marks), marks
        shown = status["latency"]["first_frame_shown_ms"]
        assert shown >= marks["first_frame"]
        assert status["shown"] == shown
        row = page.locator("#latency-table tr[data-mark='first_frame_shown'] td.num")
        assert re.fullmatch(r"\d+ ms", (await row.text_content() or "").strip())

        # Typing works too (mic muted so the looping question does not barge in).
        await page.click("#mute")
        assert await page.get_attribute("#mute", "aria-pressed") == "true"
        await until(page, lambda s: s["state"] == "listening", 60, "the avatar listening again")
        before = len(status["captions"])
        await page.fill("#text-input", "Say hello.")
        await page.press("#text-input", "Enter")

        def typed_answer(s: dict) -> bool:
            typed = [i for i, c in enumerate(s["captions"]) if c["role"] == "user" and c["text"] == "Say hello."]
            return bool(typed) and any(c["role"] == "assistant" and said(c) for c in s["captions"][typed[-1] + 1 :])

        await until(page, typed_answer, 90, "an answer to the typed message")
        assert len((await page.evaluate(STATUS_JS))["captions"]) > before
        assert await page.locator("#captions .caption-user").count() >= 2

        # Hanging up ends the call on the server too.
        await page.click("#hangup")
        await until(page, lambda s: s["state"] == "ended", 10, "the call to end")
        deadline = time.monotonic() + 10
        while services(server.app).webrtc_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not services(server.app).webrtc_calls
        assert page.errors == []  # type: ignore[attr-defined]


async def test_refused_offer_shows_the_reason_and_retry(server, question_wav, tmp_path):
    async with chromium(question_wav, tmp_path / "profile") as page:
        await page.goto(server.base_url + "/?autostart=1&aec=0&avatar=nobody-here")
        status = await until(page, lambda s: s["state"] == "error", 30, "the error state")
        message = page.locator("#error-message")
        await message.wait_for(state="visible")
        assert "nobody-here" in (await message.text_content() or "")
        assert "nobody-here" in status["error"]["message"]
        retry = page.locator("#retry")
        assert await retry.is_visible()
        await retry.click()
        await until(page, lambda s: s["state"] == "error" and s["error"] is not None, 30, "the error again after Retry")
        assert await message.is_visible()
        assert not services(server.app).webrtc_calls
        assert page.errors == []  # type: ignore[attr-defined]


async def test_session_token_opens_the_call(live_server_factory, question_wav, tmp_path):
    from avatalk.server.auth import hash_key

    key = "browser-test-key-0123456789abcdef"
    server = live_server_factory(
        webrtc={"host_addresses": ["127.0.0.1"]}, auth={"api_keys": [{"name": "site", "sha256": hash_key(key)}]}
    )
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        minted = await http.post("/v1/tokens", json={"ttl_s": 120}, headers={"Authorization": f"Bearer {key}"})
    assert minted.status_code == 200, minted.text
    token = minted.json()["token"]
    async with chromium(question_wav, tmp_path / "profile") as page:
        # Without a token the server refuses, and the page says so.
        await page.goto(server.base_url + "/?autostart=1&aec=0&greeting=0")
        status = await until(page, lambda s: s["state"] == "error", 30, "the refusal without a token")
        assert await page.locator("#error-title").text_content() == "Not authorised"
        assert "key" in status["error"]["message"]
        # With one, the call connects; the token leaves the address bar.
        await page.goto(server.base_url + f"/?autostart=1&aec=0&greeting=0&token={token}")
        await until(page, lambda s: s["connection"] == "connected", 30, "the call with a token")
        assert "token" not in page.url
        assert len(services(server.app).webrtc_calls) == 1
        await page.click("#hangup")
        deadline = time.monotonic() + 10
        while services(server.app).webrtc_calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not services(server.app).webrtc_calls
        assert page.errors == []  # type: ignore[attr-defined]


@pytest.fixture
def host_page(server) -> Iterator[str]:
    """Another site (another origin, on loopback) that embeds the avatar with embed.js."""
    body = (
        "<!doctype html><html><body><h1>Course</h1>"
        f'<script src="{server.base_url}/embed.js" data-avatar="nobody-here" data-position="bottom-left"'
        ' data-size="300" data-greeting="false" async></script></body></html>'
    ).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    # "localhost" is another origin than the server's 127.0.0.1, and both are loopback
    # (Chromium's local-network-access rules block a public page from a loopback server).
    yield f"http://localhost:{site.server_address[1]}/course.html"
    site.shutdown()
    site.server_close()


async def test_embed_script_opens_the_call_in_an_iframe(server, host_page, question_wav, tmp_path):
    async with chromium(question_wav, tmp_path / "profile") as page:
        await page.goto(host_page)
        launcher = page.locator(".avatalk-launcher")
        await launcher.wait_for(state="visible")
        assert await launcher.get_attribute("aria-label")
        assert await page.locator("iframe").count() == 0
        await launcher.click()
        frame_element = page.locator("iframe.avatalk-frame")
        await frame_element.wait_for(state="visible")
        src = await frame_element.get_attribute("src") or ""
        assert src.startswith(server.base_url + "/?")
        assert "embed=1" in src and "autostart=1" in src and "avatar=nobody-here" in src and "greeting=0" in src
        allow = await frame_element.get_attribute("allow") or ""
        assert "microphone" in allow and "autoplay" in allow
        frame = page.frame_locator("iframe.avatalk-frame")
        await frame.locator("#error-message").wait_for(state="visible", timeout=30000)
        assert "nobody-here" in (await frame.locator("#error-message").text_content() or "")
        await page.evaluate("() => window.Avatalk.close()")
        await frame_element.wait_for(state="detached")
        await page.evaluate("() => window.Avatalk.open()")
        await page.locator("iframe.avatalk-frame").wait_for(state="visible")
        assert page.errors == []  # type: ignore[attr-defined]
