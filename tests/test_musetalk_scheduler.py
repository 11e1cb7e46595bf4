"""The MuseTalk scheduler with a stand-in generator whose batch time grows with the batch size.

Time is simulated: the generator advances a fake clock by the cost of each
batch, and the test submits frames in lockstep with the worker (between
batches), so what is on time is decided by the scheduler's logic alone,
never by how busy the machine running the test is.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("diffusers")
import torch  # noqa: E402

from avatalk.avatars.renderers.musetalk import FrameGenerator, RenderScheduler  # noqa: E402
from avatalk.avatars.renderers.musetalk.random_models import build_models  # noqa: E402

TICK = 0.040
BUDGET = 0.034


class FakeClock:
    """Simulated seconds; only the test and the stand-in generator move it."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance_to(self, when: float) -> None:
        with self._lock:
            self.now = max(self.now, when)


class SteppedGeneratorFake:
    """Test double of ``FrameGenerator``: a batch of n costs ``base + per_frame * n`` simulated seconds.

    A batch moves the clock to its end at once, then waits in ``generate``
    until the test lets it return (``step``): the test submits the frames
    that arrived while it ran before the worker can take the next batch.
    """

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, clock: FakeClock, *, base_s: float, per_frame_s: float, max_batch: int) -> None:
        self.clock = clock
        self.base_s = base_s
        self.per_frame_s = per_frame_s
        self.max_batch = max_batch
        self.entered: queue.Queue[list[int]] = queue.Queue()
        self.finished: dict[int, float] = {}  # job id -> simulated time its batch ended
        self.sizes: list[int] = []
        self._go = threading.Semaphore(0)

    def cost(self, size: int) -> float:
        return self.base_s + self.per_frame_s * size

    def bucket(self, size: int) -> int:
        return size

    def warmup(self, clock: Callable[[], float]) -> dict[int, float]:
        return {size: self.cost(size) for size in range(1, self.max_batch + 1)}

    def generate(self, latents: torch.Tensor, features: torch.Tensor) -> np.ndarray:
        ids = [int(value) for value in latents[:, 0, 0, 0]]
        self.clock.advance_to(self.clock() + self.cost(len(ids)))
        for job in ids:
            self.finished[job] = self.clock()
        self.sizes.append(len(ids))
        self.entered.put(ids)
        self._go.acquire()
        return np.zeros((len(ids), 1, 1, 3), np.uint8)

    def step(self) -> None:
        self._go.release()


@dataclass
class Frame:
    session: int
    first: bool  # the first frame of a reply (the one the user waits for)
    deadline: float
    future: Future[np.ndarray | None] | None = None


def simulate(
    scheduler: RenderScheduler, generator: SteppedGeneratorFake, arrivals: list[tuple[float, Frame]]
) -> list[Frame]:
    """Submit each frame at its arrival time, between batches; run until every frame is resolved."""
    clock = generator.clock
    pending = sorted(arrivals, key=lambda item: item[0])
    submitted: list[Frame] = []

    def arrive() -> None:
        while pending and pending[0][0] <= clock():
            _, frame = pending.pop(0)
            latents = torch.full((8, 32, 32), float(len(submitted)))  # the job's id, read back by the generator
            frame.future = scheduler.submit(latents, np.zeros((1, 1), np.float32), frame.deadline)
            submitted.append(frame)

    while True:
        arrive()
        if all(frame.future is not None and frame.future.done() for frame in submitted):
            if not pending:
                return submitted
            clock.advance_to(pending[0][0])  # the GPU is idle until the next frame arrives
            continue
        try:
            batch = generator.entered.get(timeout=0.05)
        except queue.Empty:
            continue  # the worker dropped what was queued without running a batch
        arrive()  # the frames that arrived while the batch ran are queued before the next one is taken
        generator.step()
        for job in batch:
            future = submitted[job].future
            assert future is not None
            future.result(timeout=10)


def replies(sessions: int, *, stagger_s: float, ahead: int, ticks: int) -> list[tuple[float, Frame]]:
    """Each session starts a reply (staggered): its first frame and ``ahead`` look-ahead frames arrive at once,
    then one more frame per tick as playback moves on, as the renderer's look-ahead submits them."""
    arrivals: list[tuple[float, Frame]] = []
    for session in range(sessions):
        start = 0.001 + session * stagger_s
        for tick in range(ticks):
            arrival = start if tick <= ahead else start + (tick - ahead) * TICK
            arrivals.append((arrival, Frame(session, tick == 0, start + BUDGET + tick * TICK)))
    return arrivals


def test_the_first_frame_of_every_reply_is_on_time_while_look_ahead_work_is_queued() -> None:
    clock = FakeClock()
    # 16 frames take 38 ms: more than a first frame's 34 ms budget, fine for look-ahead frames.
    generator = SteppedGeneratorFake(clock, base_s=0.006, per_frame_s=0.002, max_batch=16)
    scheduler = RenderScheduler(
        generator, max_batch=16, batch_window_s=0.0, warmup=True, urgent_s=BUDGET, clock=clock
    )
    try:
        frames = simulate(scheduler, generator, replies(8, stagger_s=0.013, ahead=25, ticks=60))
    finally:
        generator.step()  # never leave the worker parked
        scheduler.close()
    assert all(frame.future is not None and frame.future.result() is not None for frame in frames)  # none dropped
    finished = [generator.finished[job] for job in range(len(frames))]
    firsts = [(end, frame) for end, frame in zip(finished, frames, strict=True) if frame.first]
    assert len(firsts) == 8 and all(end <= frame.deadline for end, frame in firsts)
    late = sum(end > frame.deadline for end, frame in zip(finished, frames, strict=True))
    assert late == 0
    assert scheduler.stats.capped > 0  # batches did stop growing for a first frame
    assert max(generator.sizes) > 4 and scheduler.stats.mean_batch > 2  # and still batched the look-ahead work


def test_frames_left_out_of_a_capped_batch_stay_queued() -> None:
    clock = FakeClock()
    generator = SteppedGeneratorFake(clock, base_s=0.010, per_frame_s=0.005, max_batch=8)
    scheduler = RenderScheduler(generator, max_batch=8, batch_window_s=0.0, warmup=True, clock=clock)
    urgent = Frame(0, True, 0.021)  # room for a batch of 2 (20 ms), not 3 (25 ms)
    later = [Frame(1, False, 0.2) for _ in range(6)]
    try:
        frames = simulate(scheduler, generator, [(0.0, urgent)] + [(0.0, frame) for frame in later])
    finally:
        generator.step()
        scheduler.close()
    assert generator.sizes[0] <= 2 and generator.finished[0] <= urgent.deadline
    assert all(frame.future is not None and frame.future.result() is not None for frame in frames)
    assert scheduler.stats.expired == 0 and sum(generator.sizes) == 7


def test_a_frame_that_cannot_be_on_time_even_alone_is_not_run() -> None:
    clock = FakeClock()
    generator = SteppedGeneratorFake(clock, base_s=0.050, per_frame_s=0.001, max_batch=4)
    scheduler = RenderScheduler(generator, max_batch=4, batch_window_s=0.0, warmup=True, clock=clock)
    hopeless, fine = Frame(0, True, 0.030), Frame(1, False, 0.5)
    try:
        simulate(scheduler, generator, [(0.0, hopeless), (0.0, fine)])
    finally:
        generator.step()
        scheduler.close()
    assert hopeless.future is not None and hopeless.future.result() is None
    assert fine.future is not None and fine.future.result() is not None
    assert scheduler.stats.expired == 1 and generator.sizes == [1]


def test_warm_up_runs_every_batch_size_up_to_the_maximum() -> None:
    models = build_models("tiny", device=torch.device("cpu"), dtype=torch.float32)
    generator = FrameGenerator(models, max_batch=5)
    sizes: list[int] = []
    models.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    costs = generator.warmup()
    assert sorted(costs) == [1, 2, 3, 4, 5] and all(cost > 0 for cost in costs.values())
    assert sorted(set(sizes)) == [1, 2, 3, 4, 5] and generator.batches == 0
    scheduler = RenderScheduler(generator, max_batch=5, warmup=True)
    try:
        assert sorted(scheduler._cost) == [1, 2, 3, 4, 5]  # planned with a measured cost from the first batch
    finally:
        scheduler.close()
