import threading
import time

from avatalk.fair_lock import FairLock


def test_waiters_are_served_in_arrival_order():
    lock = FairLock()
    order: list[int] = []
    lock.acquire()

    def worker(index: int) -> None:
        assert lock.acquire()
        order.append(index)
        lock.release()

    threads = []
    for index in range(5):
        thread = threading.Thread(target=worker, args=(index,))
        thread.start()
        threads.append(thread)
        time.sleep(0.02)  # arrive one after the other
    lock.release()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3, 4]


def test_a_waiter_that_gives_up_does_not_block_the_next():
    lock = FairLock()
    lock.acquire()
    stop = threading.Event()
    results: list[bool] = []
    quitter = threading.Thread(target=lambda: results.append(lock.acquire(stop)))
    quitter.start()
    time.sleep(0.05)
    stop.set()
    quitter.join(5)
    assert results == [False]
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(lock.acquire()))
    waiter.start()
    lock.release()
    waiter.join(5)
    assert got == [True]
