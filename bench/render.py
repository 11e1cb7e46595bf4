"""Renderer throughput and latency on one CPU core.

Renders spoken sentences (the embedded piper voice, resampled to 16 kHz) on
the drawn default avatar, tick by tick as a session does, and prints frames
per second and per-frame latency (p50/p95/max, wall clock and thread CPU
time) for each output size, plus the cost of idle frames. Everything is
pinned to one core (OpenCV threads 1, CPU affinity to the first allowed
core) because the target is one core per speaking session.

Usage: python bench/render.py [--renderer classic] [--sizes 512 256] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from avatalk.avatars.default_face import ensure_default_avatar
from avatalk.avatars.renderers import RENDER_SAMPLE_RATE, SAMPLES_PER_TICK, create_renderer
from avatalk.avatars.store import AvatarStore
from avatalk.config import Settings
from avatalk.media.audio import resample

SENTENCES = [
    "Hello! I'm Ava. How can I help you today?",
    "The capital of France is Paris, a city famous for its museums and its food.",
    "Two plus two is four, of course.",
    "Cats sleep for around sixteen hours a day, which is more than most other animals.",
]


def pin_to_one_core() -> str:
    """Restrict this process to one core so the figures are per-core figures."""
    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"core {core}"
    return "affinity not supported here; OpenCV limited to 1 thread"


def speech(seconds: float) -> np.ndarray:
    """At least ``seconds`` of piper speech at 16 kHz (sentences repeated), cut to whole ticks."""
    from piper import PiperVoice

    voice = PiperVoice.load(str(Settings().tts_model_path()))
    spoken = []
    for text in SENTENCES:
        audio = np.concatenate([chunk.audio_float_array for chunk in voice.synthesize(text)]).astype(np.float32)
        spoken.append(resample(audio, voice.config.sample_rate, RENDER_SAMPLE_RATE))
        spoken.append(np.zeros(RENDER_SAMPLE_RATE // 4, np.float32))  # a pause between sentences
    sentences = np.concatenate(spoken)
    repeats = int(np.ceil(seconds * RENDER_SAMPLE_RATE / len(sentences)))
    audio = np.tile(sentences, repeats)
    return audio[: len(audio) // SAMPLES_PER_TICK * SAMPLES_PER_TICK]


def percentiles(samples: list[float]) -> str:
    values = np.array(samples) * 1000
    return f"p50 {np.percentile(values, 50):6.2f}  p95 {np.percentile(values, 95):6.2f}  max {values.max():6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--renderer", default="classic")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of speech rendered per size")
    args = parser.parse_args()

    where = pin_to_one_core()
    audio = speech(args.seconds)
    chunks = audio.reshape(-1, SAMPLES_PER_TICK)
    with tempfile.TemporaryDirectory() as root:
        ensure_default_avatar(Path(root))
        avatar = AvatarStore(Path(root)).load("ava")
        renderer = create_renderer(args.renderer)
        print(
            f"renderer {renderer.name}, avatar 'ava' ({avatar.manifest.width}x{avatar.manifest.height}, "
            f"{avatar.manifest.frame_count} frames), {len(chunks)} ticks of speech, pinned to {where}"
        )
        for size in args.sizes:
            started = time.perf_counter()
            renderer.open(avatar, size)
            first_open = time.perf_counter() - started
            started = time.perf_counter()
            session = renderer.open(avatar, size)
            again = time.perf_counter() - started
            session.render(0, chunks[0])  # warm-up (first-call allocations)
            session.reset()
            wall, cpu, drawn = [], [], []
            total_started = time.perf_counter()
            for tick, chunk in enumerate(chunks):
                t0, c0 = time.perf_counter(), time.thread_time()
                frame = session.render(tick, chunk)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - t0)
                if frame is not session.idle_frame(tick):  # the mouth was drawn (not a closed-mouth tick)
                    drawn.append(wall[-1])
            total = time.perf_counter() - total_started
            idle = []
            for tick in range(len(chunks)):
                t0 = time.perf_counter()
                session.idle_frame(tick)
                idle.append(time.perf_counter() - t0)
            height, width = session.output_shape
            print(
                f"\n{width}x{height}: {len(chunks) / total:7.1f} frames/s speaking on one core "
                f"(first open {first_open * 1000:.0f} ms, cached open {again * 1000:.2f} ms)"
            )
            print(
                f"  {len(drawn)} ticks with the mouth drawn: {len(drawn) / sum(drawn):7.1f} frames/s, "
                f"{percentiles(drawn)}"
            )
            print(f"  render wall  {percentiles(wall)}")
            print(f"  render cpu   {percentiles(cpu)}")
            print(f"  idle frame   {percentiles(idle)}")


if __name__ == "__main__":
    main()
