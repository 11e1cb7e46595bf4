"""A first-come, first-served lock for one shared model.

``threading.Lock`` is not fair: a session that has just finished generating can
take the model again before a session that has been waiting for seconds, and
under load one session starves. Tickets make the order the arrival order; a
waiter whose consumer went away gives its ticket up without blocking the rest.
"""

from __future__ import annotations

import threading

_POLL_S = 0.05


class FairLock:
    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._abandoned: set[int] = set()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Wait for our turn; False (without the lock) if ``stop`` is set first."""
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                if stop is not None and stop.is_set():
                    self._abandoned.add(ticket)
                    return False
                self._condition.wait(_POLL_S)
            return True

    def release(self) -> None:
        with self._condition:
            self._serving += 1
            while self._serving in self._abandoned:
                self._abandoned.discard(self._serving)
                self._serving += 1
            self._condition.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
