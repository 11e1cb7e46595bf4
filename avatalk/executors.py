"""Named thread pools for model work and frame work, sized from settings.

asyncio's default pool is shared by everything that calls ``to_thread``; if
model calls, renders and encodes all used it, one slow stage (an LLM holding
its thread for seconds) could starve every session's clock. Each kind of
blocking work gets its own small pool instead, so a saturated stage only
queues its own work. Waiting for a shared model happens in asyncio before
work is submitted (an ``asyncio.Lock``), never as a thread parked in a pool.

asyncio's default pool is left for short blocking file I/O (and for aiortc,
which runs its VP8/Opus encoders there).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import ParamSpec, TypeVar

from avatalk.config import ExecutorSettings

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Executors:
    """One pool per kind of blocking work; threads are named ``avatalk-<kind>_<n>``."""

    vad: ThreadPoolExecutor
    turn: ThreadPoolExecutor
    asr: ThreadPoolExecutor
    llm: ThreadPoolExecutor
    tts: ThreadPoolExecutor
    render: ThreadPoolExecutor
    encode: ThreadPoolExecutor

    @classmethod
    def create(cls, settings: ExecutorSettings | None = None) -> Executors:
        settings = settings or ExecutorSettings()
        return cls(
            **{
                field.name: ThreadPoolExecutor(getattr(settings, field.name), thread_name_prefix=f"avatalk-{field.name}")
                for field in fields(cls)
            }
        )

    def shutdown(self) -> None:
        """Stop accepting work; running calls finish in their threads, queued ones are dropped."""
        for field in fields(self):
            getattr(self, field.name).shutdown(wait=False, cancel_futures=True)


async def run_in(executor: Executor, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``await`` a blocking call on ``executor``.

    Cancelling the caller cancels the call if it has not started yet (it
    leaves the pool's queue); a call already running finishes in its thread
    and its result is dropped.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(function, *args, **kwargs))
