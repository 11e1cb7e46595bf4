"""Run blocking iterators (model generation loops) off the event loop.

Model libraries (llama.cpp, piper, transformers) expose synchronous
generators. ``iterate_in_thread`` drives one in a worker thread and hands its
items to the event loop through a bounded queue, so a slow consumer applies
back-pressure and cancelling the consumer stops the producer at its next item.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


async def iterate_in_thread(
    make_iterator: Callable[[threading.Event], Iterator[T]],
    maxsize: int = 16,
) -> AsyncIterator[T]:
    """Yield the items of ``make_iterator(stop)`` produced in a worker thread.

    ``make_iterator`` receives a ``threading.Event`` that is set when the
    consumer goes away (cancelled, closed or finished early); long-running
    producers should check it between items. Exceptions raised in the thread
    are re-raised in the consumer.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=maxsize)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Blocking put from the worker thread; False once the consumer left."""
        while not stop.is_set():
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                future.result(timeout=0.25)
                return True
            except TimeoutError:
                future.cancel()
            except Exception:  # loop closed or put cancelled
                return False
        return False

    def produce() -> None:
        try:
            for item in make_iterator(stop):
                if not put(item):
                    return
        except BaseException as error:  # re-raised in the consumer
            put(_Failure(error))
            return
        put(_DONE)

    worker = loop.run_in_executor(None, produce)
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue, then let it finish.
        while not queue.empty():
            queue.get_nowait()
        # The producer exits at its next item; nobody awaits it, so mark its
        # outcome as retrieved to keep asyncio from logging it.
        worker.add_done_callback(lambda future: future.cancelled() or future.exception())


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
