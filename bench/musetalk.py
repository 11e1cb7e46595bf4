"""MuseTalk on one GPU: frames/s against batch size, concurrent 25 fps sessions, latency and memory.

The networks have the real v1.5 shapes (UNet 850 M parameters, SD VAE,
Whisper-tiny) with random weights: inference speed does not depend on the
weights' values, so no download is needed. Every session speaks all the
time (loud synthetic audio: no silent tick is skipped), which is the worst
case.

1. Throughput: UNet + VAE decode + copy to the host for batches of each size.
2. Sessions: N sessions, each driven like a real one by its own 25 fps clock
   (unsynchronised), calling ``look_ahead`` (the audio already queued) and
   ``render`` one tick ahead from a worker thread; reply audio arrives in
   1 s chunks 0.3 s before it is played, as streamed TTS would. Reported:
   late frames (idle frames shown because the generated one missed its
   tick), mean batch, the share of time the GPU worker was busy, chunk
   latency (a chunk's arrival until every frame it made computable is
   ready), frame latency (submission to ready) and GPU memory. The
   largest N with under 1 % late frames is the capacity.

Usage: python bench/musetalk.py [--device cuda|cpu] [--quick] [--compile reduce-overhead]
                                [--batch-sizes 1,2,4,8,16,32] [--sessions 4,8,12,16,20,24] [--seconds 10]
``--quick`` is a CPU smoke run with tiny networks (well under a minute).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from avatalk.avatars.default_face import ensure_default_avatar
from avatalk.avatars.renderers import SAMPLES_PER_TICK
from avatalk.avatars.renderers.musetalk import FrameGenerator, MuseTalkRenderer, MuseTalkSession, MuseTalkSettings
from avatalk.avatars.renderers.musetalk.random_models import Size, build_models
from avatalk.avatars.store import AvatarStore, LoadedAvatar

TICK_S = 0.040
CHUNK_TICKS = 25  # 1 s of reply audio per TTS chunk
TTS_LEAD_S = 0.3  # a chunk arrives this long before it starts playing


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Loud voiced audio with a syllable rhythm: every tick is speech (the worst case)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * 16000)) / 16000
    pitch = 110 + 60 * rng.random()
    voiced = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.random() * 6)
    return (0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def throughput(generator: FrameGenerator, sizes: list[int], iterations: int) -> None:
    print("\n## Throughput: UNet + VAE decode + copy to host")
    print(f"{'batch':>6} {'ms/batch':>10} {'frames/s':>10} {'peak GPU MiB':>13}")
    models = generator.models
    cuda = models.device.type == "cuda"
    for size in sizes:
        latents = torch.randn(size, 8, 32, 32, device=models.device, dtype=models.dtype)
        shape = (size, models.audio.tokens, models.audio.d_model)
        features = torch.randn(shape, device=models.device, dtype=models.dtype)
        for _ in range(3):  # warm-up: kernels are picked and memory is allocated on the first calls
            generator.generate(latents, features)
        if cuda:
            torch.cuda.reset_peak_memory_stats(models.device)
        started = time.perf_counter()
        for _ in range(iterations):
            generator.generate(latents, features)  # ends with a copy to the host: synchronous
        elapsed = (time.perf_counter() - started) / iterations
        peak = torch.cuda.max_memory_allocated(models.device) / 2**20 if cuda else float("nan")
        print(f"{size:>6} {elapsed * 1000:>10.1f} {size / elapsed:>10.1f} {peak:>13.0f}")


@dataclass
class Run:
    """What one session-count run measured."""

    sessions: int
    frames: int = 0
    late: int = 0
    chunk_latency: list[float] = field(default_factory=list)
    frame_latency: list[float] = field(default_factory=list)
    peak_mib: float = float("nan")
    mean_batch: float = 0.0
    busy: float = 0.0  # share of the wall time the scheduler spent running batches


class Probe:
    """Wraps the scheduler's ``submit`` to time every frame from submission to ready, per session thread."""

    def __init__(self, renderer: MuseTalkRenderer) -> None:
        self.lock = threading.Lock()
        self.frames: dict[int, list[tuple[float, float]]] = {}  # thread -> (submitted, ready)
        submit = renderer.scheduler.submit

        def timed(latents: torch.Tensor, features: np.ndarray, deadline: float) -> Future[np.ndarray | None]:
            submitted = time.monotonic()
            future = submit(latents, features, deadline)
            thread = threading.get_ident()

            def done(_: Future[np.ndarray | None]) -> None:
                with self.lock:
                    self.frames.setdefault(thread, []).append((submitted, time.monotonic()))

            future.add_done_callback(done)
            return future

        renderer.scheduler.submit = timed  # type: ignore[method-assign]


@dataclass
class Chunk:
    """A TTS chunk: when it reached the session's queue, and the ``look_ahead`` call that first saw it."""

    arrival: float
    seen: tuple[float, float] | None = None


def drive(session: MuseTalkSession, audio: np.ndarray, start: float, chunks: list[Chunk]) -> None:
    """One session's clock: ``look_ahead`` (the queued audio) and ``render`` of tick k one tick before it is due.

    The first chunk arrives just before the first tick (a reply starts playing as soon as it has
    audio); later chunks arrive ``TTS_LEAD_S`` before they play.
    """
    ticks = len(audio) // SAMPLES_PER_TICK
    chunks.append(Chunk(start - TICK_S - 0.001))
    chunks.extend(Chunk(start + j * CHUNK_TICKS * TICK_S - TTS_LEAD_S) for j in range(1, -(-ticks // CHUNK_TICKS)))
    for tick in range(ticks):
        delay = start + (tick - 1) * TICK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        called = time.monotonic()
        arrived = [chunk for chunk in chunks if chunk.arrival <= called]
        known = min(ticks, len(arrived) * CHUNK_TICKS, tick + session.look_ahead_ticks)
        session.look_ahead(tick, audio[tick * SAMPLES_PER_TICK : known * SAMPLES_PER_TICK])
        for chunk in arrived:
            if chunk.seen is None:
                chunk.seen = (called, time.monotonic())
        session.render(tick, audio[tick * SAMPLES_PER_TICK : (tick + 1) * SAMPLES_PER_TICK])


def run_sessions(renderer: MuseTalkRenderer, avatar: LoadedAvatar, count: int, seconds: float, output_size: int) -> Run:
    sessions = [renderer.open(avatar, output_size) for _ in range(count)]
    probe = Probe(renderer)
    before = replace(renderer.scheduler.stats)
    started = time.monotonic()
    cuda = renderer.models.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(renderer.models.device)
    base = time.monotonic() + 0.5
    rng = np.random.default_rng(count)
    chunks: list[list[Chunk]] = [[] for _ in sessions]
    threads = []
    for index, session in enumerate(sessions):
        audio = speechlike(seconds, seed=index)
        start = base + rng.random() * TICK_S  # clocks are not synchronised
        threads.append(threading.Thread(target=drive, args=(session, audio, start, chunks[index]), daemon=True))
        threads[-1].start()
    idents = [thread.ident or 0 for thread in threads]
    for thread in threads:
        thread.join()
    run = Run(sessions=count)
    for session in sessions:
        run.frames += session.stats.frames
        run.late += session.stats.late + session.stats.failed
        session.reset()
    time.sleep(0.2)  # let cancelled look-ahead frames drain
    with probe.lock:
        for ident, session_chunks in zip(idents, chunks, strict=True):
            frames = probe.frames.get(ident, [])
            run.frame_latency += [ready - submitted for submitted, ready in frames]
            for chunk in session_chunks:
                if chunk.seen is None:
                    continue
                made = [ready for submitted, ready in frames if chunk.seen[0] <= submitted <= chunk.seen[1]]
                if made:  # the frames the chunk's audio made computable at once
                    run.chunk_latency.append(max(made) - chunk.arrival)
    after = renderer.scheduler.stats
    batches = after.batches - before.batches
    run.mean_batch = (after.frames - before.frames) / batches if batches else 0.0
    run.busy = (after.busy_s - before.busy_s) / (time.monotonic() - started)
    if cuda:
        run.peak_mib = torch.cuda.max_memory_allocated(renderer.models.device) / 2**20
    del renderer.scheduler.submit  # drop the probe
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny networks")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--batch-sizes", default="1,2,4,8,12,16,24,32")
    parser.add_argument("--sessions", default="4,8,12,16,20,24,28,32")
    parser.add_argument("--seconds", type=float, default=10.0, help="speech per session in each run")
    parser.add_argument("--max-batch", type=int, default=24, help="scheduler batch limit for the session runs")
    parser.add_argument("--output-size", type=int, default=512)
    args = parser.parse_args()
    if args.quick:
        args.device, args.batch_sizes, args.sessions, args.seconds = "cpu", "1,4", "1,2", 1.0
        args.max_batch, args.output_size = 8, 128
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size: Size = "tiny" if args.quick else "full"
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.WARNING, format="  (%(levelname)s %(name)s: %(message)s)")

    started = time.perf_counter()
    models = build_models(size, device=device, dtype=dtype)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    # A CPU cannot make 25 fps: the smoke run waits for its frames rather than counting them all late.
    budget_ms = 5000.0 if args.quick else MuseTalkSettings().frame_budget_ms
    batch = max([args.max_batch, *sizes])
    settings = MuseTalkSettings(max_batch=batch, compile=args.compile, frame_budget_ms=budget_ms)
    renderer = MuseTalkRenderer(settings, models=models)  # compiles (warm-up) here when asked to
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# MuseTalk bench: {size} networks, random weights, {name}, {str(dtype).removeprefix('torch.')}, "
        f"compile {args.compile} (ready in {time.perf_counter() - started:.1f} s)"
    )
    throughput(renderer.generator, sizes, 2 if args.quick else 20)

    renderer.scheduler.max_batch = args.max_batch
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as folder:
        ensure_default_avatar(Path(folder), size=args.output_size, seconds=0.4 if args.quick else 2.0)
        avatar = AvatarStore(Path(folder)).load("ava")
        renderer.open(avatar, args.output_size)  # latents and scaled frames, once
        baseline = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        print(
            f"\n## Concurrent 25 fps sessions ({args.seconds:.0f} s of speech each, max batch {args.max_batch}, "
            f"budget {settings.frame_budget_ms:.0f} ms, look-ahead {settings.look_ahead_ms} ms)"
        )
        print(
            f"{'sessions':>8} {'frames':>7} {'late %':>7} {'batch':>6} {'busy %':>7} {'chunk p50/p95 ms':>17} "
            f"{'frame p50/p95 ms':>17} {'peak GPU MiB':>13}"
        )
        for count in [int(s) for s in args.sessions.split(",")]:
            run = run_sessions(renderer, avatar, count, args.seconds, args.output_size)
            runs.append(run)
            late = 100.0 * run.late / max(run.frames, 1)
            chunk = f"{percentile(run.chunk_latency, 50) * 1000:.0f}/{percentile(run.chunk_latency, 95) * 1000:.0f}"
            frame = f"{percentile(run.frame_latency, 50) * 1000:.0f}/{percentile(run.frame_latency, 95) * 1000:.0f}"
            print(
                f"{count:>8} {run.frames:>7} {late:>7.2f} {run.mean_batch:>6.1f} {100 * run.busy:>7.0f} "
                f"{chunk:>17} {frame:>17} "
                f"{run.peak_mib:>13.0f}"
            )
            if late > 10.0 and not args.quick:
                break  # far past capacity
    renderer.close()
    capacity = max((run.sessions for run in runs if run.late < 0.01 * max(run.frames, 1)), default=0)
    print(f"\nlargest session count with < 1 % late frames: {capacity} ({capacity * 25} frames/s)")
    if device.type == "cuda" and len(runs) > 1:
        first, last = runs[0], runs[-1]
        per_session = (last.peak_mib - first.peak_mib) / (last.sessions - first.sessions)
        print(f"GPU memory: models + avatar {baseline:.0f} MiB, about {per_session:.0f} MiB more per session")


if __name__ == "__main__":
    main()
