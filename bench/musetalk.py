"""MuseTalk on one GPU, counted end to end per session: how many speaking sessions one machine holds.

The networks have the real v1.5 shapes (UNet 850 M parameters, SD VAE,
Whisper-tiny) with random weights: inference speed does not depend on the
weights' values, so no download is needed.

1. Throughput: UNet + VAE decode + copy to the host for each batch size, and
   the official audio features of one reply segment (one Whisper pass over a
   padded 30 s window).
2. Sessions: N sessions in this one process, each run as the server runs it:
   a ``MediaClock`` releasing 25 ticks per second, the ``VideoStage`` drawing
   every tick on the render pool (``look_ahead`` with the queued TTS
   segments, then ``render``: segment features, scheduler batches across all
   sessions, paste-back), and a sink that JPEG-encodes every frame on the
   encode pool, as the WebSocket output does. Each session answers again and
   again: replies of three sentences (1.5-3 s each, every sentence queued by
   the "TTS" 0.3 s before it plays, the first one as the reply starts) and a
   1 s pause between replies, so replies keep starting while other sessions'
   look-ahead work is queued. Every reply tick is loud speech: the worst case.

   A frame is late when the speaking tick shows the idle frame (the GPU frame
   missed its budget, or the render pool missed the video stage's 60 ms) or
   when it is sent more than one tick after its due time (JPEG included).
   Reported per N: speaking frames, late %, late first frames of replies,
   mean batch, share of time the GPU worker ran batches, features ms p50/p95
   per segment, render call (the wait for the GPU frame and the paste) ms p95, JPEG ms p95
   and peak GPU memory. The capacity is the largest N with under 1 % late.

At the end a results block is printed, ready to paste into docs/performance.md.

``--seams`` (CPU, seconds) instead compares the paste of the generated face
before and after the v1.5 "jaw" blend: on the default avatar and on a
prepared photo (``--photo``, default scikit-image's astronaut), a face that
is the avatar's own crop 30 levels brighter (a uniform colour drift, as the
VAE gives) is pasted with the stored lower-face mask (before) and with the
jaw-mode alpha (after). Seam energy is the mean of |gradient|^2 of
(pasted - original) over the box and a 3 px margin: the sharper the
transition, the larger; the alpha on the box edges (a hard seam) and at
the chin line are shown too.

Usage: python bench/musetalk.py [--device cuda|cpu] [--quick] [--compile reduce-overhead]
                                [--batch-sizes 1,2,4,8,16,24] [--sessions 8,12,16,20,24] [--seconds 10]
                                [--avatars DIR] [--max-batch 16]
       python bench/musetalk.py --seams [--photo PATH]
``--quick`` is a CPU smoke run with tiny networks (about a minute on 2 cores).
``--avatars`` is a prepared avatars root holding "ava" (default: drawn now,
which needs the face-landmark models installed).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avatalk.avatars.renderers.musetalk import FrameGenerator, MuseTalkRenderer, MuseTalkSettings
from avatalk.avatars.renderers.musetalk.random_models import Size, build_models
from avatalk.avatars.store import AvatarStore, LoadedAvatar
from avatalk.config import ExecutorSettings
from avatalk.executors import Executors, run_in
from avatalk.media.images import encode_jpeg
from avatalk.media.timebase import ENGINE_SAMPLE_RATE, TICK_S
from avatalk.streaming.clock import MediaClock, Tick
from avatalk.streaming.events import ServerEvent
from avatalk.streaming.video import VideoStage

TTS_LEAD_S = 0.3  # a sentence is queued this long before it starts playing
PAUSE_S = 1.0  # between replies (the user speaking)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """Loud voiced audio with a syllable rhythm: every tick is speech (the worst case)."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * ENGINE_SAMPLE_RATE)) / ENGINE_SAMPLE_RATE
    pitch = 110 + 60 * rng.random()
    voiced = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 6))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t + rng.random() * 6)
    return (0.2 * voiced * envelope + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


class Timings:
    """Durations of repeated calls, appended from any thread."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self._lock = threading.Lock()

    def wrap(self, function: Callable[..., object]) -> Callable[..., object]:
        def timed(*args: object, **kwargs: object) -> object:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                with self._lock:
                    self.values.append(time.perf_counter() - started)

        return timed

    def take(self) -> list[float]:
        with self._lock:
            values, self.values = self.values, []
        return values


def throughput(generator: FrameGenerator, sizes: list[int], iterations: int) -> list[tuple[int, float, float]]:
    """``(batch, ms per batch, peak MiB)`` of UNet + VAE decode + copy to the host for each size."""
    models = generator.models
    cuda = models.device.type == "cuda"
    rows = []
    for size in sizes:
        latents = torch.randn(size, 8, 32, 32, device=models.device, dtype=models.dtype)
        shape = (size, models.audio.tokens, models.audio.d_model)
        features = torch.randn(shape, device=models.device, dtype=models.dtype)
        for _ in range(2):  # the first calls pick kernels and allocate memory
            generator.generate(latents, features)
        if cuda:
            torch.cuda.reset_peak_memory_stats(models.device)
        started = time.perf_counter()
        for _ in range(iterations):
            generator.generate(latents, features)  # ends with a copy to the host: synchronous
        elapsed = (time.perf_counter() - started) / iterations
        peak = torch.cuda.max_memory_allocated(models.device) / 2**20 if cuda else float("nan")
        rows.append((size, elapsed * 1000, peak))
        print(f"  batch {size:>3}: {elapsed * 1000:8.1f} ms, {size / elapsed:8.1f} frames/s", flush=True)
    return rows


def feature_cost(renderer: MuseTalkRenderer, iterations: int) -> float:
    """Milliseconds of the official features of one reply segment (a padded 30 s Whisper window)."""
    audio = speechlike(4.0, seed=99)
    renderer.models.audio.encode(audio)
    started = time.perf_counter()
    for _ in range(iterations):
        renderer.models.audio.encode(audio)
    return (time.perf_counter() - started) / iterations * 1000


@dataclass
class Run:
    """What one session-count run measured."""

    sessions: int
    speaking: int = 0
    late: int = 0
    replies: int = 0
    late_first: int = 0  # replies whose first frame was late
    worst_reply_start: int = 0  # most late frames among the first 5 ticks of any reply
    features_ms: list[float] = field(default_factory=list)
    render_ms: list[float] = field(default_factory=list)
    jpeg_ms: list[float] = field(default_factory=list)
    mean_batch: float = 0.0
    busy: float = 0.0
    peak_mib: float = float("nan")

    @property
    def late_share(self) -> float:
        return self.late / max(self.speaking, 1)


async def _noop(event: ServerEvent) -> None:
    """Warnings of the video stage (late frames) are counted from the frames instead."""


async def one_session(
    renderer: MuseTalkRenderer,
    avatar: LoadedAvatar,
    index: int,
    args: argparse.Namespace,
    executors: Executors,
    jpeg: Timings,
    run: Run,
) -> None:
    """One session for ``args.seconds``: replies queued like a TTS queues them, every frame drawn and encoded."""
    session = renderer.open(avatar, args.output_size)
    clock = MediaClock(ENGINE_SAMPLE_RATE)
    video = VideoStage(session, clock, executors.render, _noop)
    rng = np.random.default_rng(1000 + index)
    reply_starts: set[int] = set()
    late_ticks: set[int] = set()
    encode = jpeg.wrap(encode_jpeg)

    async def sink(tick: Tick) -> None:
        if tick.frame is None:
            return
        due = (clock.started_at or 0.0) + tick.index * TICK_S
        await run_in(executors.encode, encode, tick.frame, 80)
        if tick.audio is None:
            return
        run.speaking += 1
        if tick.frame is session.idle_frame(tick.index) or time.monotonic() - due > TICK_S:
            run.late += 1
            late_ticks.add(tick.index)

    clock_task = asyncio.create_task(clock.run(sink, video.prepare))
    started = time.monotonic()
    await asyncio.sleep(rng.random() * TICK_S)  # clocks are not synchronised
    try:
        while time.monotonic() - started < args.seconds:
            sentences = [speechlike(1.5 + 1.5 * rng.random(), seed=int(rng.integers(1 << 30))) for _ in range(3)]
            reply_starts.add(clock.index)
            playing = time.monotonic()
            for number, sentence in enumerate(sentences):
                if number:
                    await asyncio.sleep(max(0.0, playing - TTS_LEAD_S - time.monotonic()))
                await clock.enqueue(1, sentence, sentence)
                playing += len(sentence) / ENGINE_SAMPLE_RATE
            await clock.wait_idle()
            await asyncio.sleep(PAUSE_S)
    finally:
        clock_task.cancel()
        await asyncio.gather(clock_task, return_exceptions=True)
        await video.close()
    run.replies += len(reply_starts)
    run.late_first += sum(start in late_ticks for start in reply_starts)
    for start in reply_starts:
        run.worst_reply_start = max(run.worst_reply_start, sum(start + k in late_ticks for k in range(5)))


async def run_sessions(
    renderer: MuseTalkRenderer, avatar: LoadedAvatar, count: int, args: argparse.Namespace, timings: dict[str, Timings]
) -> Run:
    executors = Executors.create(
        ExecutorSettings(render=max(count, args.render_threads), encode=args.encode_threads)
    )
    run = Run(sessions=count)
    cuda = renderer.models.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(renderer.models.device)
    before = (renderer.scheduler.stats.batches, renderer.scheduler.stats.frames, renderer.scheduler.stats.busy_s)
    for timing in timings.values():
        timing.take()
    started = time.monotonic()
    try:
        await asyncio.gather(
            *(one_session(renderer, avatar, i, args, executors, timings["jpeg"], run) for i in range(count))
        )
    finally:
        executors.shutdown()
    elapsed = time.monotonic() - started
    stats = renderer.scheduler.stats
    batches = stats.batches - before[0]
    run.mean_batch = (stats.frames - before[1]) / batches if batches else 0.0
    run.busy = (stats.busy_s - before[2]) / elapsed
    run.features_ms = [1000 * value for value in timings["features"].take()]
    run.render_ms = [1000 * value for value in timings["render"].take()]
    run.jpeg_ms = [1000 * value for value in timings["jpeg"].take()]
    if cuda:
        run.peak_mib = torch.cuda.max_memory_allocated(renderer.models.device) / 2**20
    return run


def session_row(run: Run) -> str:
    return (
        f"| {run.sessions} | {run.speaking} | {100 * run.late_share:.2f} | {run.late_first}/{run.replies} "
        f"| {run.worst_reply_start} | {run.mean_batch:.1f} | {100 * run.busy:.0f} "
        f"| {percentile(run.features_ms, 50):.1f}/{percentile(run.features_ms, 95):.1f} "
        f"| {percentile(run.render_ms, 95):.1f} | {percentile(run.jpeg_ms, 95):.1f} | {run.peak_mib:.0f} |"
    )


def instrument(renderer: MuseTalkRenderer) -> dict[str, Timings]:
    """Time every segment's features and every render call of every session (wrapping the shared objects)."""
    timings = {name: Timings() for name in ("features", "render", "jpeg")}
    audio = renderer.models.audio
    audio.encode_pieces = timings["features"].wrap(audio.encode_pieces)  # type: ignore[method-assign, assignment]
    opened = renderer.open

    def open_timed(avatar: LoadedAvatar, output_size: int) -> object:
        session = opened(avatar, output_size)
        session.render = timings["render"].wrap(session.render)  # type: ignore[method-assign, assignment]
        return session

    renderer.open = open_timed  # type: ignore[method-assign, assignment]
    return timings


def load_avatar(
    folder: Path | None, size: int, quick: bool
) -> tuple[LoadedAvatar, tempfile.TemporaryDirectory[str] | None]:
    """The avatar "ava" of a prepared root, or the default one drawn into a temporary folder (returned to clean)."""
    if folder is not None:
        return AvatarStore(folder).load("ava"), None
    # Imported here: drawing the default avatar needs the face-landmark models, a prepared root does not.
    from avatalk.avatars.default_face import ensure_default_avatar

    temporary = tempfile.TemporaryDirectory()
    ensure_default_avatar(Path(temporary.name), size=size, seconds=0.4 if quick else 2.0)
    return AvatarStore(Path(temporary.name)).load("ava"), temporary


def seam_figures(
    avatar: LoadedAvatar, paste_alpha: Callable[[int], tuple[np.ndarray, np.ndarray]]
) -> tuple[float, float, float]:
    """``(seam energy, largest alpha on the box edges, alpha at the chin)`` averaged over the avatar's distinct frames.

    ``paste_alpha(index)`` gives a frame's box ``(x1, y1, x2, y2)`` and its alpha over the box.
    """
    energies, edges, chins = [], [], []
    for index in sorted({int(i) for i in avatar.cycle}):
        frame = avatar.frames[index].astype(np.float32)
        box, alpha = paste_alpha(index)
        x1, y1, x2, y2 = (int(v) for v in box)
        face = np.clip(frame[y1:y2, x1:x2] + 30.0, 0, 255)  # the "generated" face: a colour drift of 30 levels
        pasted = frame.copy()
        pasted[y1:y2, x1:x2] += (face - frame[y1:y2, x1:x2]) * alpha[..., None]
        difference = (pasted - frame).mean(axis=2)
        region = difference[max(0, y1 - 3) : y2 + 3, max(0, x1 - 3) : x2 + 3]
        gy, gx = np.gradient(region)
        energies.append(float(np.mean(gx**2 + gy**2)))
        edges.append(float(max(alpha[:, 0].max(), alpha[:, -1].max(), alpha[-1].max())))
        cx, cy = np.round(avatar.landmarks[index, 152]).astype(int)
        chins.append(float(alpha[min(cy - y1, y2 - y1 - 1), cx - x1]))
    return float(np.mean(energies)), float(np.max(edges)), float(np.mean(chins))


def seams(photo: Path | None) -> None:
    """Before/after figures of the paste seam on the default avatar and a prepared photo."""
    import cv2

    from avatalk.avatars.default_face import ensure_default_avatar
    from avatalk.avatars.prepare import prepare_avatar
    from avatalk.avatars.renderers.musetalk.blending import jaw_paste

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ensure_default_avatar(root, size=512, seconds=0.4)
        if photo is None:
            from skimage import data

            photo = root / "astronaut.png"
            cv2.imwrite(str(photo), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
        prepare_avatar(photo, "photo", "Photo", root, still_seconds=0.2)
        store = AvatarStore(root)
        print("| avatar | blend | seam energy | alpha on box edges (max) | alpha at chin |\n|---|---|---|---|---|")
        for avatar_id in ("ava", "photo"):
            avatar = store.load(avatar_id)

            def before(index: int, avatar: LoadedAvatar = avatar) -> tuple[np.ndarray, np.ndarray]:
                x1, y1, x2, y2 = (int(v) for v in avatar.boxes[index])
                mask = cv2.resize(avatar.masks[index], (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
                return avatar.boxes[index], mask.astype(np.float32) / 255.0

            def after(index: int, avatar: LoadedAvatar = avatar) -> tuple[np.ndarray, np.ndarray]:
                paste = jaw_paste(avatar.landmarks[index], avatar.boxes[index], avatar.frames[index].shape[:2])
                assert paste is not None
                return avatar.boxes[index], paste.alpha[..., 0]

            width = int(avatar.boxes[0][2] - avatar.boxes[0][0])
            for label, alpha in (("before (box mask)", before), ("after (v1.5 jaw)", after)):
                energy, edge, chin = seam_figures(avatar, alpha)
                print(f"| {avatar_id} (box {width} px wide) | {label} | {energy:.2f} | {edge:.3f} | {chin:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run with tiny networks")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--batch-sizes", default="1,2,4,8,12,16,24")
    parser.add_argument("--sessions", default="8,12,16,20,24")
    parser.add_argument("--seconds", type=float, default=10.0, help="wall time of each session-count run")
    parser.add_argument("--max-batch", type=int, default=16, help="scheduler batch limit (AVATALK_MUSETALK__MAX_BATCH)")
    parser.add_argument("--output-size", type=int, default=512)
    parser.add_argument("--avatars", type=Path, help="a prepared avatars root holding 'ava'")
    parser.add_argument("--render-threads", type=int, default=0, help="render pool (default: one per session)")
    parser.add_argument("--encode-threads", type=int, default=4, help="JPEG pool")
    parser.add_argument("--seams", action="store_true", help="only the before/after figures of the paste seam")
    parser.add_argument("--photo", type=Path, help="the photo --seams prepares (default: scikit-image's astronaut)")
    args = parser.parse_args()
    if args.seams:
        seams(args.photo)
        return
    if args.quick:
        args.device, args.batch_sizes, args.sessions, args.seconds = "cpu", "1,4", "1,2", 6.0
        args.max_batch, args.output_size = 4, 128
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size: Size = "tiny" if args.quick else "full"
    torch.set_grad_enabled(False)
    logging.basicConfig(level=logging.WARNING, format="  (%(levelname)s %(name)s: %(message)s)")

    started = time.perf_counter()
    models = build_models(size, device=device, dtype=dtype)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    counts = [int(s) for s in args.sessions.split(",")]
    settings = MuseTalkSettings(max_batch=args.max_batch, compile=args.compile, max_sessions=max(counts))
    renderer = MuseTalkRenderer(settings, models=models)  # warms up every batch size on a GPU
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    ready_s = time.perf_counter() - started
    print(f"# MuseTalk bench: {size} networks, random weights, {name}, {str(dtype).removeprefix('torch.')}", flush=True)
    print(f"  models ready (and warmed up) in {ready_s:.1f} s", flush=True)
    generator = FrameGenerator(models, compile="off", max_batch=max(sizes))
    rows = throughput(generator, sizes, 2 if args.quick else 20)
    features_ms = feature_cost(renderer, 3 if args.quick else 20)
    print(f"  features of one segment (padded 30 s Whisper window): {features_ms:.1f} ms", flush=True)

    avatar, temporary = load_avatar(args.avatars, args.output_size, args.quick)
    renderer.prepare(avatar)
    renderer.open(avatar, args.output_size).close()  # scaled frames and pastes, once
    baseline = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    timings = instrument(renderer)
    runs: list[Run] = []
    for count in counts:
        run = asyncio.run(run_sessions(renderer, avatar, count, args, timings))
        runs.append(run)
        late_first = f"{run.late_first}/{run.replies} late first frames"
        print(f"  {count} sessions: {100 * run.late_share:.2f} % late, {late_first}", flush=True)
        if run.late_share > 0.10 and not args.quick:
            break  # far past capacity
    renderer.close()
    if temporary is not None:
        temporary.cleanup()

    capacity = max((run.sessions for run in runs if run.late_share < 0.01), default=0)
    print("\n```")
    print(
        f"### MuseTalk on {name}: {size} networks, random weights, {str(dtype).removeprefix('torch.')}, "
        f"compile {args.compile}, max batch {args.max_batch}, output {args.output_size} px "
        f"({datetime.date.today()}, torch {torch.__version__})"
    )
    print("\n| batch | ms/batch | frames/s | peak GPU MiB |\n|---|---|---|---|")
    for batch, ms, peak in rows:
        print(f"| {batch} | {ms:.1f} | {1000 * batch / ms:.1f} | {peak:.0f} |")
    print(f"\nFeatures of one reply segment (one padded 30 s Whisper-tiny window): {features_ms:.1f} ms.")
    print(
        f"\nSessions, end to end in one process ({args.seconds:.0f} s each; replies of 3 sentences, "
        f"1 s pauses; every frame JPEG-encoded):\n"
    )
    print(
        "| sessions | speaking frames | late % | late first frames | worst reply start (of 5) | mean batch "
        "| GPU busy % | features ms p50/p95 | render call ms p95 | JPEG ms p95 | peak GPU MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(session_row(run))
    print(f"\nLargest session count with < 1 % late frames: {capacity} ({capacity * 25} frames/s).")
    if device.type == "cuda" and len(runs) > 1:
        first, last = runs[0], runs[-1]
        per_session = (last.peak_mib - first.peak_mib) / max(1, last.sessions - first.sessions)
        print(f"GPU memory: models + avatar {baseline:.0f} MiB, about {per_session:.0f} MiB more per session.")
    print("```")


if __name__ == "__main__":
    main()
