"""Run blocking producers (model generation loops) on a named executor, off the event loop.

Model libraries (llama.cpp, piper, transformers) produce their output in a
blocking loop. ``emit_in_thread`` runs such a loop on an executor and hands
each item to the event loop: at most ``maxsize`` items wait for the consumer,
so a slow consumer holds the producer back (back-pressure), and a consumer
that goes away (cancelled, closed, or done early) wakes a waiting producer and
refuses its next item, so the thread is free at the producer's next item.
``iterate_in_thread`` is the same for a producer written as an iterator.

``ModelTurns`` serialises the producers of one shared model: callers wait for
their turn in asyncio, in arrival order, and only then is work submitted, so a
waiting session never holds a thread of any pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from typing import Generic, TypeVar

T = TypeVar("T")

#: Hands one item to the consumer, waiting while ``maxsize`` items are pending;
#: False once the consumer has gone away (the producer should then return).
Emit = Callable[[T], bool]
#: A blocking producer: calls ``emit`` per item, and may watch the event, which
#: is set when the consumer goes away, to stop work that emits nothing.
Produce = Callable[[Emit[T], threading.Event], None]


class _Handoff(Generic[T]):
    """A bounded hand-off from one producer thread to one asyncio consumer.

    The bound is counted under a ``threading.Condition`` and the items travel
    through ``loop.call_soon_threadsafe``: a put is never issued twice and
    never left behind in the loop, whatever the timing of a departure.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self._loop = loop
        self._maxsize = maxsize
        self._items: asyncio.Queue[object] = asyncio.Queue()  # bounded by _pending
        self._pending = 0
        self._condition = threading.Condition()
        self.stop = threading.Event()

    def put(self, item: object) -> bool:
        """Producer side: wait for room, then hand ``item`` over; False once the consumer left."""
        with self._condition:
            while self._pending >= self._maxsize and not self.stop.is_set():
                self._condition.wait()
            return self._send(item)

    def finish(self, item: object) -> None:
        """Producer side: hand over the final marker or failure without waiting for room."""
        with self._condition:
            self._send(item)

    def _send(self, item: object) -> bool:
        if self.stop.is_set():
            return False
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody will read it
            self.stop.set()
            return False
        self._pending += 1
        return True

    async def get(self) -> object:
        """Consumer side: the next item; makes room for the producer."""
        item = await self._items.get()
        with self._condition:
            self._pending -= 1
            self._condition.notify()
        return item

    def close(self) -> None:
        """Consumer side: gone; a waiting producer wakes and every later put is refused."""
        with self._condition:
            self.stop.set()
            self._condition.notify_all()


class _Failure:
    """An exception raised by the producer, re-raised in the consumer."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


_DONE = object()


async def emit_in_thread(
    executor: ThreadPoolExecutor,
    produce: Produce[T],
    *,
    maxsize: int = 16,
    on_finished: Callable[[], None] | None = None,
) -> AsyncIterator[T]:
    """Yield what ``produce(emit, stop)`` emits while it runs on ``executor``.

    Exceptions raised by ``produce`` are re-raised in the consumer.
    ``on_finished`` is called on the event loop once the producer has really
    returned (or will never run: the executor refused or dropped it), which
    can be after the consumer has gone: that is the moment a shared model is
    free again. It is called only if iteration has started.
    """
    loop = asyncio.get_running_loop()
    handoff: _Handoff[T] = _Handoff(loop, maxsize)

    def run() -> None:
        if handoff.stop.is_set():  # the consumer left while this waited in the pool's queue
            return
        try:
            produce(handoff.put, handoff.stop)
        except BaseException as error:  # re-raised in the consumer
            handoff.finish(_Failure(error))
        else:
            handoff.finish(_DONE)

    try:
        worker = loop.run_in_executor(executor, run)
    except BaseException:  # e.g. the executor has been shut down
        if on_finished is not None:
            on_finished()
        raise
    # The worker is never cancelled: its end, not the consumer's, is what frees the thread.
    if on_finished is not None:
        worker.add_done_callback(lambda _: on_finished())
    try:
        while True:
            item = await handoff.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        handoff.close()


def iterate_in_thread(
    executor: ThreadPoolExecutor,
    make_iterator: Callable[[threading.Event], Iterator[T]],
    *,
    maxsize: int = 16,
    on_finished: Callable[[], None] | None = None,
) -> AsyncIterator[T]:
    """Yield the items of ``make_iterator(stop)``, iterated on ``executor``; see ``emit_in_thread``.

    The iterator is advanced only while the consumer is there: once it has
    gone, the thread stops at the next item (and closes the iterator), so
    work between two items should check ``stop`` if it can be long.
    """

    def produce(emit: Emit[T], stop: threading.Event) -> None:
        iterator = make_iterator(stop)
        try:
            for item in iterator:
                if not emit(item):
                    return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    return emit_in_thread(executor, produce, maxsize=maxsize, on_finished=on_finished)


class ModelTurns:
    """One model that runs one blocking job at a time, shared fairly by every session.

    Callers wait in asyncio (an ``asyncio.Lock``, which serves waiters in
    arrival order) and their work is submitted to ``executor`` only once it is
    their turn, so waiting never parks a thread in a pool. A caller cancelled
    while waiting leaves the line without holding up the others. A turn ends
    when the job's thread returns, not when its consumer leaves, so two jobs
    never run on the model at once.
    """

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        """Jobs run on ``executor``; the lock binds to the event loop that first waits on it."""
        self._executor = executor
        self._lock = asyncio.Lock()

    async def stream(self, produce: Produce[T], *, maxsize: int = 16) -> AsyncIterator[T]:
        """Wait for the model, then yield what ``produce`` emits; see ``emit_in_thread``."""
        await self._lock.acquire()
        # No await between taking the turn and starting the producer: from here on
        # the turn is released by the producer's end (``on_finished``).
        items = emit_in_thread(self._executor, produce, maxsize=maxsize, on_finished=self._lock.release)
        async with aclosing(items):
            async for item in items:
                yield item

    async def run(self, function: Callable[[], T]) -> T:
        """Wait for the model, then run ``function`` on the executor (e.g. to free the model)."""
        await self._lock.acquire()
        try:
            job = asyncio.get_running_loop().run_in_executor(self._executor, function)
        except BaseException:  # e.g. the executor has been shut down
            self._lock.release()
            raise
        job.add_done_callback(lambda _: self._lock.release())
        # Shielded: a caller that leaves does not end the turn before the job's thread does.
        return await asyncio.shield(job)
