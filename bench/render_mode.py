"""Render-only mode: how soon the avatar shows the audio an agent sends, and whether it keeps 25 fps.

Starts `avatalk serve` (or uses --url), opens a render session with video and,
at real-time pace in 20 ms frames:
- sends ``--utterances`` one-second utterances and measures, for each, the time
  from its first audio frame sent to the first video frame of its first tick
  received (p50, p95);
- sends one ``--long-s`` utterance and counts its ticks: frames and audio
  received for every tick from start to end (gaps), and frames per second.

Usage: python bench/render_mode.py [--utterances 20] [--long-s 60] [--url ws://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import local_server  # noqa: E402

from avatalk.client import AvatalkClient  # noqa: E402

RATE = 24000
FRAME_S = 0.020


def voice(seconds: float) -> np.ndarray:
    """A voiced-sounding test signal: a 140 Hz buzz with a syllable-rate envelope."""
    t = np.arange(int(seconds * RATE)) / RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * envelope * np.sign(np.sin(2 * np.pi * 140 * t))).astype(np.float32)


async def send_paced(client: AvatalkClient, audio: np.ndarray) -> float:
    """Send at real-time pace; returns when the first frame went out."""
    step = int(RATE * FRAME_S)
    started = time.monotonic()
    for index, offset in enumerate(range(0, len(audio), step)):
        delay = started + index * FRAME_S - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await client.send_audio(audio[offset : offset + step])
    return started


async def run(url: str, utterances: int, long_s: float) -> None:
    async with AvatalkClient(url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        configured = await client.configure(RATE, RATE, mode="render", video=True)
        assert configured["type"] == "session.updated", configured
        latencies: list[float] = []
        for _ in range(utterances):
            mark = len(client.events)
            sent = await send_paced(client, voice(1.0))
            await client.send_event("output_audio_buffer.commit")
            started = await client.wait_for(lambda e: e["type"] == "output_audio_buffer.started", since=mark)
            await client.wait_for(lambda e: e["type"] == "output_audio_buffer.stopped", since=mark)
            shown = next(f.received_at for f in client.frames if f.tick == started["start_tick"])
            latencies.append((shown - sent) * 1000.0)
            await asyncio.sleep(0.3)
        print("each (ms):", " ".join(f"{value:.0f}" for value in latencies))
        latencies.sort()
        print(f"audio in -> first paired frame out: n={len(latencies)} p50 {statistics.median(latencies):.1f} ms "
              f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.1f} ms")

        mark = len(client.events)
        began = time.monotonic()
        await send_paced(client, voice(long_s))
        await client.send_event("output_audio_buffer.commit")
        stopped = await client.wait_for(
            lambda e: e["type"] == "output_audio_buffer.stopped", since=mark, timeout=long_s + 30
        )
        first, end = stopped["start_tick"], stopped["end_tick"]
        frames = {f.tick: f.received_at for f in client.frames if first <= f.tick < end}
        audio = {a.tick: a.samples for a in client.audio if first <= a.tick < end}
        silent = sum(1 for samples in audio.values() if np.abs(samples).max() < 1e-4)
        wall = max(frames.values()) - min(frames.values()) if frames else float("nan")
        print(f"{long_s:.0f} s utterance: {end - first} ticks (expected {round(long_s * 25)}), "
              f"{end - first - len(frames)} missing frames, {end - first - len(audio)} missing audio ticks, "
              f"{silent} silent ticks, {(len(frames) - 1) / wall:.2f} frames/s received "
              f"(sent in {time.monotonic() - began:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--port", type=int, default=8767)
    parser.add_argument("--utterances", type=int, default=20)
    parser.add_argument("--long-s", type=float, default=60.0)
    args = parser.parse_args()
    if args.url:
        asyncio.run(run(args.url, args.utterances, args.long_s))
    else:
        with local_server(args.port) as url:
            asyncio.run(run(url, args.utterances, args.long_s))


if __name__ == "__main__":
    main()
