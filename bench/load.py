"""Load and soak test: concurrent spoken conversations against one server, and its memory over time.

Runs ``--sessions`` WebSocket conversations at once for ``--minutes``. Each
one loops: speak a question (generated once with the embedded piper voice)
at real-time pace, keep the microphone open with silence, and wait for the
reply to finish. It prints each failed turn as it happens, then:

- turns completed and failed;
- p50/p95 of end of user speech -> first reply audio, as the server marked it
  (``first_audio``) and as the client saw it (from the moment the last speech
  sample was sent to the first reply audio received), and of the server's
  earlier marks (ASR final, LLM first token, first sentence, TTS first audio);
- the server's resident memory (VmRSS) sampled every 10 s, with its growth
  from start to end: a leak shows as steady growth over a ``--minutes 30`` soak.

Starts ``avatalk serve`` on a free loopback port unless ``--url`` is given
(then pass ``--pid`` to sample that server's memory). Everything is bounded:
no new turn starts after the time is up, each turn has a timeout, and the
run is cut off ``GRACE_S`` after the end whatever happens.

Usage: python bench/load.py [--sessions 4] [--minutes 2] [--url ws://... --pid N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from avatalk.client import AvatalkClient, Event
from latency import QUESTIONS, synthesise  # bench/ is this script's folder, so on its path

SAMPLE_RATE = 16000
LEAD_SILENCE_S = 0.2  # before the question, as a real microphone would send
MIC_CHUNK_S = 0.02
TURN_TIMEOUT_S = 90.0  # from the end of the question to the end of the reply
PAUSE_BETWEEN_TURNS_S = 0.5
RSS_INTERVAL_S = 10.0
READY_TIMEOUT_S = 300.0
GRACE_S = 150.0
STAGES = (
    "asr_final",
    "llm_first_token",
    "first_sentence",
    "tts_first_audio",
)  # the longest a turn started just before the end may still take


@dataclass
class Turn:
    """One question and what came back."""

    session: int
    index: int
    status: str  # the response's status, or "timeout" / "error"
    marks_ms: dict[str, float] = field(default_factory=dict)  # the server's latency marks of the turn
    client_first_audio_ms: float | None = None
    detail: str = ""


@dataclass
class RssSampler:
    """VmRSS of one process, read from /proc every ``interval_s``."""

    pid: int
    interval_s: float = RSS_INTERVAL_S
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)

    def read_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:  # the process is gone
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0  # reported in kB
        return None

    def sample_now(self, started: float) -> None:
        rss = self.read_mib()
        if rss is not None:
            self.samples.append((time.monotonic() - started, rss))

    async def run(self, started: float) -> None:
        """Sample until cancelled (the first sample at once)."""
        while True:
            self.sample_now(started)
            await asyncio.sleep(self.interval_s)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between the nearest values."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


async def keep_mic_open(client: AvatalkClient, stop: asyncio.Event) -> None:
    """Silence at real-time pace, as an open microphone in a quiet room sends."""
    silence = np.zeros(int(SAMPLE_RATE * MIC_CHUNK_S), dtype=np.float32)
    while not stop.is_set():
        await client.send_audio(silence)
        await asyncio.sleep(MIC_CHUNK_S)


async def ask(client: AvatalkClient, question: np.ndarray, session: int, index: int) -> Turn:
    """Speak one question and wait for the reply to it to end."""
    mark, audio_mark = len(client.events), len(client.audio)
    lead = np.zeros(int(SAMPLE_RATE * LEAD_SILENCE_S), dtype=np.float32)
    speech_end = await client.stream_audio(
        np.concatenate([lead, question]), SAMPLE_RATE, chunk_ms=int(MIC_CHUNK_S * 1000)
    )
    stop = asyncio.Event()
    mic = asyncio.create_task(keep_mic_open(client, stop))
    try:
        stopped = await client.wait_for(
            lambda e: e["type"] == "input_audio_buffer.speech_stopped", since=mark, timeout=TURN_TIMEOUT_S
        )
        done: Event = await client.wait_for(
            lambda e: e["type"] == "response.done" and e["turn_id"] == stopped["turn_id"],
            since=mark,
            timeout=TURN_TIMEOUT_S,
        )
    except TimeoutError:
        return Turn(session, index, "timeout", detail=f"no complete reply within {TURN_TIMEOUT_S:.0f} s")
    finally:
        stop.set()
        await mic
    turn = Turn(session, index, str(done.get("status")))
    errors = [e for e in client.events[mark:] if e["type"] == "error"]
    if errors:
        turn.detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
    turn.marks_ms = dict(done.get("latency_ms", {}))
    first = next((chunk for chunk in client.audio[audio_mark:] if chunk.received_at >= speech_end), None)
    if first is not None:
        turn.client_first_audio_ms = (first.received_at - speech_end) * 1000.0
    return turn


async def converse(
    url: str, session: int, questions: dict[str, np.ndarray], deadline: float, turns: list[Turn]
) -> None:
    """One conversation, turn after turn, until the deadline; failed turns are printed at once."""
    await asyncio.sleep(session * 0.7)  # staggered, as real callers are
    index = 0
    try:
        async with AvatalkClient(url) as client:
            await client.wait_for(lambda e: e["type"] == "session.created", timeout=30)
            configured = await client.configure(SAMPLE_RATE, 24000, greeting=False)
            if configured["type"] == "error":
                raise RuntimeError(f"session refused: {configured.get('message')}")
            while time.monotonic() < deadline and not client.closed.is_set():
                text = QUESTIONS[(session + index) % len(QUESTIONS)]
                turn = await ask(client, questions[text], session, index)
                turns.append(turn)
                if turn.status != "completed":
                    print(
                        f"  FAILED session {session} turn {index} ({text!r}): {turn.status} {turn.detail}", flush=True
                    )
                index += 1
                await asyncio.sleep(PAUSE_BETWEEN_TURNS_S)
    except (OSError, ConnectionError, RuntimeError, TimeoutError) as error:
        turns.append(Turn(session, index, "error", detail=str(error)))
        print(f"  FAILED session {session} turn {index}: {error}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_server(port: int) -> Iterator[tuple[str, int]]:
    """``avatalk serve`` on 127.0.0.1:``port``; yields its WebSocket URL and pid once it is ready."""
    env = dict(os.environ, AVATALK_HOST="127.0.0.1", AVATALK_PORT=str(port), AVATALK_LOG_LEVEL="warning")
    process = subprocess.Popen([sys.executable, "-m", "avatalk.cli", "serve"], env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the server did not become ready")
            time.sleep(0.5)
        yield f"ws://127.0.0.1:{port}/v1/ws", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def run(args: argparse.Namespace, url: str, pid: int | None) -> tuple[list[Turn], RssSampler | None, float]:
    questions = await asyncio.to_thread(synthesise, QUESTIONS)
    sampler = RssSampler(pid) if pid is not None else None
    started = time.monotonic()
    deadline = started + args.minutes * 60.0
    turns: list[Turn] = []
    sampling = asyncio.create_task(sampler.run(started)) if sampler else None
    try:
        conversations = [converse(url, session, questions, deadline, turns) for session in range(args.sessions)]
        try:
            await asyncio.wait_for(asyncio.gather(*conversations), timeout=args.minutes * 60.0 + GRACE_S)
        except TimeoutError:
            print(f"  cut off {GRACE_S:.0f} s after the end: turns still running were abandoned", flush=True)
    finally:
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
    if sampler is not None:
        sampler.sample_now(started)
    return turns, sampler, time.monotonic() - started


def report(args: argparse.Namespace, turns: list[Turn], sampler: RssSampler | None, elapsed: float) -> None:
    completed = [turn for turn in turns if turn.status == "completed"]
    failed = [turn for turn in turns if turn.status != "completed"]
    print()
    print(f"sessions={args.sessions} minutes={args.minutes:g} ran={elapsed:.0f} s cpus={os.cpu_count()}")
    print(f"turns: {len(completed)} completed, {len(failed)} failed, {len(turns)} in all")
    for turn in failed:
        print(f"  failed: session {turn.session} turn {turn.index}: {turn.status} {turn.detail}")
    rows = [
        (
            "first reply audio, server mark",
            [t.marks_ms["first_audio"] for t in completed if "first_audio" in t.marks_ms],
        ),
        ("first reply audio, client", [t.client_first_audio_ms for t in completed if t.client_first_audio_ms]),
    ]
    # Where the time went: the server's earlier marks of the same turns.
    for stage in STAGES:
        rows.append((f"  stage {stage}", [t.marks_ms[stage] for t in completed if stage in t.marks_ms]))
    print(f"{'ms after the end of user speech':<42} {'n':>4} {'p50':>8} {'p95':>8}")
    for name, values in rows:
        if values:
            print(f"{name:<42} {len(values):>4} {statistics.median(values):>8.1f} {percentile(values, 95):>8.1f}")
        else:
            print(f"{name:<42} {0:>4} {'-':>8} {'-':>8}")
    if sampler is None:
        print("server RSS: not sampled (give --pid with --url)")
        return
    if not sampler.samples:
        print(f"server RSS: /proc/{sampler.pid}/status could not be read")
        return
    start, end = sampler.samples[0][1], sampler.samples[-1][1]
    print(
        f"server RSS (MiB): start {start:.1f}, end {end:.1f}, growth {end - start:+.1f} ({(end - start) / start:+.1%})"
    )
    print("RSS samples (s: MiB): " + ", ".join(f"{at:.0f}: {mib:.1f}" for at, mib in sampler.samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=4, help="concurrent conversations")
    parser.add_argument("--minutes", type=float, default=2.0, help="how long to keep talking (30 for the soak)")
    parser.add_argument("--url", help="a running server's WebSocket URL, instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, to sample its memory")
    parser.add_argument("--port", type=int, help="port for the server started here (default: a free one)")
    args = parser.parse_args()
    if args.sessions < 1 or args.minutes <= 0:
        parser.error("--sessions must be at least 1 and --minutes positive")

    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url, args.pid
        else:
            url, pid = stack.enter_context(local_server(args.port or free_port()))
        print(f"talking to {url} (server pid {pid})", flush=True)
        turns, sampler, elapsed = asyncio.run(run(args, url, pid))
    report(args, turns, sampler, elapsed)


if __name__ == "__main__":
    main()
