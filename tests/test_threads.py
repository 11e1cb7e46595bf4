"""Blocking producers on named executors: back-pressure, departure, and fair turns on a shared model."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from avatalk.executors import Executors
from avatalk.llm import ChatMessage, LlamaCppLLM
from avatalk.threads import Emit, ModelTurns, iterate_in_thread


class CountingExecutor(ThreadPoolExecutor):
    """A pool that counts the jobs submitted to it (waiting for a model must submit none)."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers)
        self.submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def pool() -> Iterator[CountingExecutor]:
    executor = CountingExecutor(1)
    yield executor
    executor.shutdown(wait=False, cancel_futures=True)


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let the loop run until ``condition`` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# --- the thread -> event loop hand-off ----------------------------------------


async def test_a_slow_consumer_holds_the_producer_back(pool: CountingExecutor) -> None:
    produced: list[int] = []

    def numbers(stop: threading.Event) -> Iterator[int]:
        for number in range(100):
            produced.append(number)
            yield number

    stream = iterate_in_thread(pool, numbers, maxsize=3)
    assert await anext(stream) == 0
    await asyncio.sleep(0.2)
    # One taken, three waiting, one made and waiting for room: not the hundred.
    assert len(produced) <= 5
    await stream.aclose()


async def test_a_consumer_that_leaves_frees_a_blocked_producer(pool: CountingExecutor) -> None:
    finished = threading.Event()

    def endless(stop: threading.Event) -> Iterator[int]:
        try:
            while True:
                yield 1
        finally:
            finished.set()

    stream = iterate_in_thread(pool, endless, maxsize=2)
    await anext(stream)
    await asyncio.sleep(0.05)  # the producer now waits for room
    await stream.aclose()
    assert await asyncio.to_thread(finished.wait, 2)
    # The pool's only thread is free again.
    assert await asyncio.wrap_future(pool.submit(lambda: "free")) == "free"


async def test_a_producer_failure_reaches_the_consumer(pool: CountingExecutor) -> None:
    def failing(stop: threading.Event) -> Iterator[int]:
        yield 1
        raise ValueError("model exploded")

    with pytest.raises(ValueError, match="model exploded"):
        _ = [item async for item in iterate_in_thread(pool, failing)]


# --- fair turns on one shared model -----------------------------------------


class Holder:
    """A job that keeps the model until ``release`` is set."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.release = threading.Event()

    def __call__(self, emit: Emit[str], stop: threading.Event) -> None:
        self.running.set()
        emit("held")
        self.release.wait(5)


def recorder(order: list[str], name: str) -> Callable[[Emit[str], threading.Event], None]:
    def produce(emit: Emit[str], stop: threading.Event) -> None:
        order.append(name)
        emit(name)

    return produce


async def drain(turns: ModelTurns, produce: Callable[[Emit[str], threading.Event], None]) -> list[str]:
    return [item async for item in turns.stream(produce)]


async def test_waiters_get_the_model_in_arrival_order(pool: CountingExecutor) -> None:
    turns = ModelTurns(pool)
    holder = Holder()
    holding = asyncio.create_task(drain(turns, holder))
    await until(holder.running.is_set)
    order: list[str] = []
    waiters = []
    for index in range(5):
        waiters.append(asyncio.create_task(drain(turns, recorder(order, f"w{index}"))))
        await asyncio.sleep(0.01)  # arrive one after the other
    # Waiting happens in asyncio: nothing but the holder's job reached the pool.
    assert pool.submitted == 1
    holder.release.set()
    await holding
    assert [await waiter for waiter in waiters] == [[f"w{index}"] for index in range(5)]
    assert order == [f"w{index}" for index in range(5)]


async def test_a_cancelled_waiter_does_not_block_the_rest(pool: CountingExecutor) -> None:
    turns = ModelTurns(pool)
    holder = Holder()
    holding = asyncio.create_task(drain(turns, holder))
    await until(holder.running.is_set)
    order: list[str] = []
    first = asyncio.create_task(drain(turns, recorder(order, "first")))
    await asyncio.sleep(0.01)
    quitter = asyncio.create_task(drain(turns, recorder(order, "quitter")))
    await asyncio.sleep(0.01)
    last = asyncio.create_task(drain(turns, recorder(order, "last")))
    await asyncio.sleep(0.01)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    holder.release.set()
    await asyncio.wait_for(asyncio.gather(holding, first, last), 5)
    assert order == ["first", "last"]
    assert pool.submitted == 3  # the one who left never took a thread


async def test_the_turn_ends_when_the_thread_does_not_when_the_consumer_leaves(pool: CountingExecutor) -> None:
    turns = ModelTurns(pool)
    holder = Holder()
    stream = turns.stream(holder)
    assert await anext(stream) == "held"
    await stream.aclose()  # the consumer left, but the job still runs on the model
    order: list[str] = []
    next_caller = asyncio.create_task(drain(turns, recorder(order, "next")))
    await asyncio.sleep(0.1)
    assert order == []  # two jobs never run on the model at once
    holder.release.set()
    assert await asyncio.wait_for(next_caller, 5) == ["next"]


# --- the llama.cpp backend takes turns the same way ---------------------------


class FakeLlama:
    """Stands in for ``llama_cpp.Llama``: answers with the user's words, one per token, and
    records how many generations run at once."""

    running = 0
    most_at_once = 0
    started: list[str] = []
    lock = threading.Lock()

    def __init__(self, **kwargs: object) -> None:
        self.closed = False

    def create_chat_completion(self, messages: list[dict[str, str]], **kwargs: object) -> Iterator[dict[str, Any]]:
        def chunks() -> Iterator[dict[str, Any]]:
            with FakeLlama.lock:
                FakeLlama.running += 1
                FakeLlama.most_at_once = max(FakeLlama.most_at_once, FakeLlama.running)
                FakeLlama.started.append(messages[-1]["content"])
            try:
                for word in messages[-1]["content"].split():
                    time.sleep(0.01)
                    yield {"choices": [{"delta": {"content": word}}]}
            finally:
                with FakeLlama.lock:
                    FakeLlama.running -= 1

        return chunks()

    def close(self) -> None:
        self.closed = True


async def test_llama_cpp_sessions_take_turns_in_arrival_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pool: CountingExecutor
) -> None:
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "Llama", FakeLlama)
    monkeypatch.setattr(FakeLlama, "started", [])
    monkeypatch.setattr(FakeLlama, "most_at_once", 0)
    model_file = tmp_path / "fake.gguf"
    model_file.write_bytes(b"GGUF")
    executors = dataclasses.replace(Executors.create(), llm=pool)
    llm = LlamaCppLLM(model_file, executors)

    async def reply(text: str) -> str:
        return " ".join([delta async for delta in llm.stream([ChatMessage("user", text)])])

    sessions = []
    for index in range(4):
        sessions.append(asyncio.create_task(reply(f"session {index} " + "word " * 30)))
        await asyncio.sleep(0.005)
    assert pool.submitted == 1  # the other three wait in asyncio
    replies = await asyncio.wait_for(asyncio.gather(*sessions), 10)
    assert [reply.split()[:2] for reply in replies] == [["session", str(index)] for index in range(4)]
    assert [text.split()[1] for text in FakeLlama.started] == ["0", "1", "2", "3"]
    assert FakeLlama.most_at_once == 1
    await llm.aclose()
    executors.shutdown()
