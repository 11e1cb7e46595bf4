"""Conversation latency benchmark over the real WebSocket.

Starts `avatalk serve` in a subprocess (or uses --url), speaks recorded utterances
(generated once with the embedded piper voice) at real-time pace from one or more
concurrent sessions, and prints p50/p95 of:

- end of user speech -> ASR final, LLM first token, TTS first audio, first reply audio
  sent, first lip-synced frame sent with --video (server marks), and -> first reply
  audio received (client clock, from the moment the last speech sample was sent);
- barge-in: interruption detected -> last reply audio received, and user speech
  onset -> reply audio stopped.

Usage: python bench/latency.py [--sessions 1] [--turns 5] [--video] [--url ws://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np

from avatalk.client import AvatalkClient
from avatalk.config import Settings

QUESTIONS = [
    "What is two plus two?",
    "What is the capital of France?",
    "Tell me a fun fact about cats.",
    "How are you today?",
    "Can you recommend a good book?",
    "What colour is the sky?",
    "Why do birds sing in the morning?",
    "What should I cook for dinner tonight?",
]
STORY_PROMPT = "Please tell me a long story about a brave knight and a friendly dragon."
INTERRUPTION = "Stop, please wait a moment."


def synthesise(texts: list[str]) -> dict[str, np.ndarray]:
    """Speak each text with the embedded piper voice, at 16 kHz."""
    from piper import PiperVoice

    from avatalk.media.audio import resample

    voice = PiperVoice.load(str(Settings().tts_model_path()))
    audio = {}
    for text in texts:
        samples = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text)])
        audio[text] = resample(samples.astype(np.float32), voice.config.sample_rate, 16000)
    return audio


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def keep_mic_open(client: AvatalkClient, stop: asyncio.Event) -> None:
    silence = np.zeros(320, dtype=np.float32)
    while not stop.is_set():
        await client.send_audio(silence)
        await asyncio.sleep(0.02)


async def run_session(
    url: str, turns: int, audio: dict[str, np.ndarray], results: dict[str, list[float]], index: int, video: bool
) -> None:
    async with AvatalkClient(url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        options = {"video": True, "video_size": 512} if video else {}
        await client.configure(16000, 24000, greeting=False, **options)
        for turn in range(turns):
            question = QUESTIONS[(index + turn) % len(QUESTIONS)]
            mark = len(client.events)
            speech_end = await client.stream_audio(np.concatenate([np.zeros(3200, np.float32), audio[question]]), 16000)
            stop = asyncio.Event()
            mic = asyncio.create_task(keep_mic_open(client, stop))
            try:
                heard = await client.wait_for(
                    lambda e: e["type"] == "input_audio_transcription.completed" and e["transcript"].strip(),
                    since=mark,
                    timeout=60,
                )
                done = await client.wait_for(
                    lambda e: e["type"] == "response.done" and e["turn_id"] == heard["turn_id"], since=mark, timeout=90
                )
            finally:
                stop.set()
                await mic
            if done["status"] != "completed":
                results["failed_turns"].append(1)
                continue
            for name, value in done.get("latency_ms", {}).items():
                results[name].append(value)
            latency = next(e for e in client.events[mark:] if e["type"] == "latency")
            first_received = min(
                (chunk.received_at for chunk in client.audio if chunk.received_at >= latency["_received_at"] - 0.1),
                default=None,
            )
            if first_received is not None:
                results["client_first_audio"].append((first_received - speech_end) * 1000.0)
            await asyncio.sleep(0.5)

        # Barge-in: ask for a long reply, then talk over it.
        mark = len(client.events)
        await client.send_event("conversation.item.create", text=STORY_PROMPT)
        await client.wait_for(lambda e: e["type"] == "latency", since=mark, timeout=60)
        await asyncio.sleep(0.8)
        speech_onset = time.monotonic()
        await client.stream_audio(audio[INTERRUPTION], 16000)
        stop = asyncio.Event()
        mic = asyncio.create_task(keep_mic_open(client, stop))
        try:
            interrupted = await client.wait_for(lambda e: e["type"] == "response.interrupted", since=mark, timeout=30)
            await asyncio.sleep(0.6)
        finally:
            stop.set()
            await mic
        at = interrupted["_received_at"]
        before = [chunk.received_at for chunk in client.audio if speech_onset <= chunk.received_at <= at + 0.5]
        last = max(before, default=at)
        results["barge_in_to_audio_stopped"].append(max(0.0, (last - at) * 1000.0))
        results["speech_onset_to_audio_stopped"].append((last - speech_onset) * 1000.0)


@contextlib.contextmanager
def local_server(port: int):
    env = dict(os.environ, AVATALK_PORT=str(port), AVATALK_HOST="127.0.0.1", AVATALK_LOG_LEVEL="warning")
    process = subprocess.Popen([sys.executable, "-m", "avatalk.cli", "serve"], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield f"ws://127.0.0.1:{port}/v1/ws"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def main_async(args: argparse.Namespace, url: str) -> dict[str, list[float]]:
    audio = synthesise(QUESTIONS + [INTERRUPTION])
    keys = [
        "asr_final", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio", "first_frame",
        "client_first_audio", "barge_in_to_audio_stopped", "speech_onset_to_audio_stopped", "failed_turns",
    ]
    results: dict[str, list[float]] = {key: [] for key in keys}
    await asyncio.gather(*(run_session(url, args.turns, audio, results, i, args.video) for i in range(args.sessions)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--video", action="store_true", help="sessions ask for lip-synced video (512 px)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(local_server(args.port))
        results = asyncio.run(main_async(args, url))

    summary = {
        name: {"n": len(values), "p50": round(statistics.median(values), 1), "p95": round(percentile(values, 95), 1)}
        for name, values in results.items()
        if values and name != "failed_turns"
    }
    summary["failed_turns"] = len(results["failed_turns"])
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"sessions={args.sessions} turns/session={args.turns} video={args.video} cpus={os.cpu_count()}")
    print(f"{'metric (ms after end of user speech)':<40} {'n':>4} {'p50':>8} {'p95':>8}")
    for name, figures in summary.items():
        if isinstance(figures, dict):
            print(f"{name:<40} {figures['n']:>4} {figures['p50']:>8.1f} {figures['p95']:>8.1f}")
    print(f"failed turns: {summary['failed_turns']}")


if __name__ == "__main__":
    main()
