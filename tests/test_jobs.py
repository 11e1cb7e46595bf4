import asyncio
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cluster_parts import PostgresServer

from avatalk.avatars.prepare_settings import avatar_progress
from avatalk.jobs import (
    ACTIVE_STATES,
    CANCELLED_MESSAGE,
    FINISHED_STATES,
    MISSING_INPUT_MESSAGE,
    NODE_LOST_MESSAGE,
    RESTART_MESSAGE,
    SHUTDOWN_MESSAGE,
    Job,
    JobConflict,
    JobContext,
    JobFailed,
    JobNotFound,
    JobOutcome,
    JobRunner,
    JobState,
    JobStore,
    QueueFull,
    SQLiteJobStore,
)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "jobs.sqlite3"


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL in a temporary folder (skipped, with the reason, where it is not installed)."""
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, db) -> Callable[..., JobStore]:
    """Opens (and reopens) one store of each kind: the SQLite file, or a fresh PostgreSQL database.

    Every test of the ``JobStore`` interface and of the runner runs against both.
    """
    if request.param == "sqlite":
        return lambda node="node-a": SQLiteJobStore(db)
    from avatalk.jobs.postgres_store import PostgresJobStore

    url = request.getfixturevalue("postgres").create_database()
    return lambda node="node-a": PostgresJobStore(url, node=node)


@pytest.fixture
def store(open_store):
    opened = open_store()
    yield opened
    opened.close()


# --- JobStore ---------------------------------------------------------------------------


def test_create_get_and_list(store):
    first = store.create("avatar", avatar_id="one", params={"input": None, "display_name": "One"})
    second = store.create("render", params={"text": "hi", "n": [1, 2]})
    assert first.state is JobState.QUEUED and first.progress == 0.0 and first.stage is None
    assert first.created_at == first.updated_at and first.finished_at is None
    assert store.get(second.id).params == {"text": "hi", "n": [1, 2]}
    assert [job.id for job in store.list()] == [second.id, first.id]  # newest first
    assert [job.id for job in store.list(oldest_first=True)] == [first.id, second.id]
    assert [job.id for job in store.list(kind="avatar")] == [first.id]
    assert [job.id for job in store.list(avatar_id="one")] == [first.id]
    assert [job.id for job in store.list(limit=1)] == [second.id]
    with pytest.raises(JobNotFound, match="no job 'nope'"):
        store.get("nope")


def test_lifecycle_updates(store):
    job = store.create("avatar", avatar_id="a")
    running = store.start(job.id)
    assert running is not None and running.state is JobState.RUNNING
    assert store.start(job.id) is None  # only a queued job starts
    store.set_progress(job.id, "analysing", 0.25)
    assert (store.get(job.id).stage, store.get(job.id).progress) == ("analysing", 0.25)
    done = store.finish(job.id, JobState.SUCCEEDED, "ready", result={"frames": 25})
    assert done is not None and done.state is JobState.SUCCEEDED
    assert (done.stage, done.progress, done.result, done.message) == ("done", 1.0, {"frames": 25}, "ready")
    assert done.finished_at is not None and done.finished_at >= done.created_at
    # A finished job does not move any more.
    store.set_progress(job.id, "analysing", 0.5)
    assert store.finish(job.id, JobState.FAILED, "late") is None
    assert store.get(job.id).state is JobState.SUCCEEDED and store.get(job.id).progress == 1.0
    with pytest.raises(ValueError):
        store.finish(job.id, JobState.RUNNING, "not final")


def test_exclusive_create_refuses_a_second_active_job_for_the_avatar(store):
    first = store.create("avatar", avatar_id="tutor", exclusive=True)
    with pytest.raises(JobConflict) as conflict:
        store.create("avatar", avatar_id="tutor", exclusive=True)
    assert conflict.value.job_id == first.id and "tutor" in str(conflict.value)
    assert store.active_for_avatar("tutor", "avatar").id == first.id
    store.create("render", avatar_id="tutor", exclusive=True)  # another kind is no conflict
    store.finish(first.id, JobState.FAILED, "no face")
    assert store.active_for_avatar("tutor", "avatar") is None
    store.create("avatar", avatar_id="tutor", exclusive=True)


def test_wal_mode(db):
    SQLiteJobStore(db).close()
    with sqlite3.connect(db) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_restart_fails_running_jobs_and_keeps_the_rest(db, tmp_path):
    kept_input = tmp_path / "kept.mp4"
    kept_input.write_bytes(b"video")
    store = SQLiteJobStore(db)
    running = store.create("avatar", avatar_id="running")
    store.start(running.id)
    store.set_progress(running.id, "analysing", 0.4)
    succeeded = store.create("avatar", avatar_id="done")
    store.start(succeeded.id)
    succeeded = store.finish(succeeded.id, JobState.SUCCEEDED, "ready", result={"frames": 3})
    failed = store.create("avatar", avatar_id="bad")
    store.finish(failed.id, JobState.FAILED, "no face was found")
    queued = store.create("avatar", avatar_id="queued", params={"input": str(kept_input)})
    orphan = store.create("avatar", avatar_id="orphan", params={"input": str(tmp_path / "gone.mp4")})
    store.close()  # as if the process died here

    reopened = SQLiteJobStore(db)
    try:
        interrupted = reopened.get(running.id)
        assert interrupted.state is JobState.FAILED and interrupted.message == RESTART_MESSAGE
        assert interrupted.finished_at is not None and interrupted.stage == "analysing"
        assert reopened.get(succeeded.id) == succeeded  # finished jobs are kept as they were
        assert reopened.get(failed.id).message == "no face was found"
        assert reopened.get(queued.id).state is JobState.QUEUED
        lost = reopened.get(orphan.id)
        assert lost.state is JobState.FAILED and lost.message == MISSING_INPUT_MESSAGE
        assert [job.id for job in reopened.list(states=[JobState.QUEUED])] == [queued.id]
    finally:
        reopened.close()


def test_avatar_progress_spans_the_stages_in_order():
    values = [avatar_progress(stage, f) for stage in ("analysing", "writing", "finishing") for f in (0, 0.5, 1)]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] == 1.0
    assert avatar_progress("done", 0.3) == 1.0


# --- JobRunner --------------------------------------------------------------------------


class Handlers:
    """Test handlers: each job's params say what it does."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.order: list[str] = []

    def __call__(self, context: JobContext) -> JobOutcome:
        params = context.job.params
        self.order.append(params.get("name", ""))
        action = params.get("action", "ok")
        if action == "block":  # runs until released or cancelled
            self.started.set()
            while not self.release.is_set():
                if context.cancel.wait(0.01):
                    raise JobFailed("stopped")
        if action == "steps":
            for step in range(101):
                context.progress("working", step / 100)
        if action == "fail":
            raise JobFailed("the input has no face")
        if action == "crash":
            raise ZeroDivisionError("bug")
        return JobOutcome(f"done {params.get('name')}", {"name": params.get("name")})


@pytest.fixture
def handlers():
    made = Handlers()
    yield made
    made.release.set()


async def started_runner(store: JobStore, handlers: Handlers, **options) -> JobRunner:
    runner = JobRunner(store, {"test": handlers}, **options)
    await runner.start()
    return runner


async def test_runner_runs_jobs_in_order_and_records_outcomes(store, handlers, tmp_path):
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "clip.mp4").write_bytes(b"x")
    runner = await started_runner(store, handlers)
    try:
        ok = await runner.submit("test", params={"name": "a", "cleanup": str(upload)})
        failing = await runner.submit("test", params={"name": "b", "action": "fail"})
        crashing = await runner.submit("test", params={"name": "c", "action": "crash"})
        ok, failing, crashing = [await runner.wait(job.id, 10) for job in (ok, failing, crashing)]
    finally:
        await runner.stop()
    assert handlers.order == ["a", "b", "c"]
    assert ok.state is JobState.SUCCEEDED and ok.message == "done a" and ok.result == {"name": "a"}
    assert not upload.exists()  # the job's files are removed once it has ended
    assert failing.state is JobState.FAILED and failing.message == "the input has no face"
    assert crashing.state is JobState.FAILED and "ZeroDivisionError" in crashing.message
    assert "server log" in crashing.message


async def test_progress_is_throttled(store, handlers, monkeypatch):
    writes: list[tuple[str, float]] = []
    original = store.set_progress

    def record(job_id: str, stage: str, progress: float) -> None:
        writes.append((stage, progress))
        original(job_id, stage, progress)

    monkeypatch.setattr(store, "set_progress", record)
    runner = await started_runner(store, handlers, progress_interval_s=60.0)
    try:
        job = await runner.submit("test", params={"action": "steps"})
        job = await runner.wait(job.id, 10)
    finally:
        await runner.stop()
    assert job.state is JobState.SUCCEEDED and job.progress == 1.0
    assert writes == [("working", 0.0)]  # 101 reports, one write within the interval


async def test_cancel_queued_and_running_jobs(store, handlers, tmp_path):
    upload = tmp_path / "queued-upload.mp4"
    upload.write_bytes(b"x")
    runner = await started_runner(store, handlers)
    try:
        blocking = await runner.submit("test", params={"action": "block"})
        waiting = await runner.submit("test", params={"name": "never", "cleanup": str(upload)})
        assert await asyncio.to_thread(handlers.started.wait, 10)
        cancelled_waiting = await runner.cancel(waiting.id)
        assert cancelled_waiting.state is JobState.CANCELLED and not upload.exists()
        cancelled_running = await runner.cancel(blocking.id)
        assert cancelled_running.state is JobState.CANCELLED and cancelled_running.message == CANCELLED_MESSAGE
        assert (await runner.cancel(blocking.id)).state is JobState.CANCELLED  # harmless twice
        after = await runner.submit("test", params={"name": "after"})
        assert (await runner.wait(after.id, 10)).state is JobState.SUCCEEDED
    finally:
        await runner.stop()
    assert "never" not in handlers.order


async def test_queue_is_bounded(store, handlers):
    runner = await started_runner(store, handlers, max_queued=2)
    try:
        await runner.submit("test", params={"action": "block"})
        assert await asyncio.to_thread(handlers.started.wait, 10)
        await runner.submit("test")
        await runner.submit("test")
        with pytest.raises(QueueFull, match="too many queued jobs"):
            await runner.submit("test")
        assert len(store.list()) == 3  # the refused job was never created
    finally:
        await runner.stop()


async def test_stop_requeues_the_running_job_and_start_resumes_queued_jobs(open_store, handlers):
    store = open_store()
    runner = await started_runner(store, handlers)
    blocking = await runner.submit("test", params={"name": "first", "action": "block"})
    waiting = await runner.submit("test", params={"name": "second"})
    assert await asyncio.to_thread(handlers.started.wait, 10)
    await runner.stop()  # returns although the blocking job was never released: stop cancelled it
    assert not handlers.release.is_set()
    requeued = store.get(blocking.id)
    assert requeued.state is JobState.QUEUED and requeued.message == SHUTDOWN_MESSAGE and requeued.progress == 0
    assert store.get(waiting.id).state is JobState.QUEUED
    store.close()

    handlers.release.set()
    handlers.order.clear()
    reopened = open_store()
    runner = await started_runner(reopened, handlers)
    try:
        results = [await runner.wait(job.id, 10) for job in (blocking, waiting)]
    finally:
        await runner.stop()
        reopened.close()
    assert [job.state for job in results] == [JobState.SUCCEEDED, JobState.SUCCEEDED]
    assert handlers.order == ["first", "second"]  # resumed in creation order


# --- The interface alone ------------------------------------------------------------------


class MemoryJobStore(JobStore):
    """A job store in a dict: the runner must need nothing but the ``JobStore`` interface."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise JobNotFound(f"no job {job_id!r}")
            return self._jobs[job_id]

    def list(self, *, limit=50, kind=None, avatar_id=None, states=None, oldest_first=False) -> list[Job]:
        with self._lock:
            jobs = [
                job
                for job in self._jobs.values()  # insertion order is creation order
                if (kind is None or job.kind == kind)
                and (avatar_id is None or job.avatar_id == avatar_id)
                and (states is None or job.state in set(states))
            ]
        ordered = jobs if oldest_first else jobs[::-1]
        return ordered if limit is None else ordered[:limit]

    def create(self, kind, *, avatar_id=None, params=None, exclusive=False) -> Job:
        if exclusive and avatar_id is not None and (other := self.active_for_avatar(avatar_id, kind)):
            raise JobConflict(f"avatar {avatar_id!r} is busy", other.id)
        now = datetime.now(UTC)
        job = Job(uuid.uuid4().hex, kind, JobState.QUEUED, None, 0.0, None, avatar_id, dict(params or {}), None, now, now, None)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def _move(self, job_id: str, allowed: Iterable[JobState], **changes) -> Job | None:
        with self._lock:
            job = self._jobs[job_id]
            if job.state not in set(allowed):
                return None
            self._jobs[job_id] = replace(job, updated_at=datetime.now(UTC), **changes)
            return self._jobs[job_id]

    def start(self, job_id: str) -> Job | None:
        return self._move(job_id, [JobState.QUEUED], state=JobState.RUNNING, message=None)

    def set_progress(self, job_id: str, stage: str, progress: float) -> None:
        self._move(job_id, [JobState.RUNNING], stage=stage, progress=min(max(progress, 0.0), 1.0))

    def finish(self, job_id, state, message, *, result=None, from_states=ACTIVE_STATES) -> Job | None:
        if state not in FINISHED_STATES:
            raise ValueError(f"{state} is not a final state")
        done = {"stage": "done", "progress": 1.0} if state is JobState.SUCCEEDED else {}
        return self._move(
            job_id,
            from_states,
            state=state,
            message=message,
            result=None if result is None else dict(result),
            finished_at=datetime.now(UTC),
            **done,
        )

    def requeue(self, job_id: str, message: str) -> Job | None:
        return self._move(job_id, [JobState.RUNNING], state=JobState.QUEUED, stage=None, progress=0.0, message=message)


def count_words(context: JobContext) -> JobOutcome:
    """A job kind of this test: count the words of ``params["text"]``, reporting progress per word."""
    words = context.job.params["text"].split()
    for index, _ in enumerate(words):
        if context.cancel.is_set():
            raise JobFailed("stopped")
        context.progress("counting", (index + 1) / len(words))
    if not words:
        raise JobFailed("there is nothing to count")
    return JobOutcome(f"{len(words)} words", {"words": len(words)})


async def test_the_runner_needs_only_the_store_interface(tmp_path):
    store = MemoryJobStore()
    leftover = tmp_path / "upload.txt"
    leftover.write_text("x")
    runner = JobRunner(store, {"count": count_words}, workers=2)
    await runner.start()
    try:
        counted = await runner.submit("count", params={"text": "one two three", "cleanup": str(leftover)})
        empty = await runner.submit("count", params={"text": ""})
        counted, empty = [await runner.wait(job.id, 10) for job in (counted, empty)]
        with pytest.raises(ValueError, match="no handler"):
            await runner.submit("unknown")
    finally:
        await runner.stop()
    assert counted.state is JobState.SUCCEEDED and counted.result == {"words": 3} and counted.progress == 1.0
    assert counted.message == "3 words" and not leftover.exists()
    assert empty.state is JobState.FAILED and empty.message == "there is nothing to count"
    assert [job.id for job in store.list()] == [empty.id, counted.id]


def test_the_jobs_package_imports_no_upper_layer():
    """``avatalk.jobs`` stays generic: importing it loads nothing of avatars, streaming or server."""
    code = (
        "import sys, avatalk.jobs\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['avatalk', 'avatars'], ['avatalk', 'streaming'], ['avatalk', 'server']))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    finished = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout + finished.stderr


# --- Several nodes sharing PostgreSQL -------------------------------------------------------


@pytest.fixture
def postgres_url(postgres) -> str:
    return postgres.create_database()


def postgres_store(url: str, node: str) -> JobStore:
    from avatalk.jobs.postgres_store import PostgresJobStore

    return PostgresJobStore(url, node=node)


def test_nodes_never_take_the_same_job(postgres_url):
    stores = [postgres_store(postgres_url, f"node-{i}") for i in range(2)]
    try:
        queued = {stores[0].create("test", params={"n": n}).id for n in range(24)}
        taken: list[str] = []
        lock = threading.Lock()

        def take_all(store: JobStore) -> None:
            while (job := store.claim(["test"])) is not None:
                with lock:
                    taken.append(job.id)
                store.finish(job.id, JobState.SUCCEEDED, "done")

        threads = [threading.Thread(target=take_all, args=(stores[i % 2],)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(taken) == sorted(queued)  # every job once, none twice
        assert stores[1].count([JobState.SUCCEEDED]) == 24
    finally:
        for store in stores:
            store.close()


def test_exclusive_jobs_are_exclusive_across_nodes(postgres_url):
    stores = [postgres_store(postgres_url, f"node-{i}") for i in range(2)]
    try:
        outcomes: list[object] = []

        def create(store: JobStore) -> None:
            try:
                outcomes.append(store.create("avatar", avatar_id="tutor", exclusive=True))
            except JobConflict as conflict:
                outcomes.append(conflict)

        threads = [threading.Thread(target=create, args=(stores[i % 2],)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        created = [o for o in outcomes if isinstance(o, Job)]
        conflicts = [o for o in outcomes if isinstance(o, JobConflict)]
        assert len(created) == 1 and len(conflicts) == 3
        assert all(c.job_id == created[0].id for c in conflicts)
    finally:
        for store in stores:
            store.close()


_DOOMED_NODE = """
import sys, time
from avatalk.jobs.postgres_store import PostgresJobStore
store = PostgresJobStore(sys.argv[1], node="doomed")
job = store.claim(["test"])
store.set_progress(job.id, "working", 0.3)
print(job.id, flush=True)
time.sleep(600)
"""


def test_a_killed_node_leaves_its_running_job_failed_and_its_queue_to_the_others(postgres_url):
    survivor = postgres_store(postgres_url, "survivor")
    try:
        running = survivor.create("test", params={"name": "running"})
        waiting = survivor.create("test", params={"name": "waiting"})
        doomed = subprocess.Popen(
            [sys.executable, "-c", _DOOMED_NODE, postgres_url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert doomed.stdout is not None
            assert doomed.stdout.readline().strip() == running.id  # the oldest job, taken by the other node
            assert survivor.settle_orphans() == []  # its node is alive: the job is left alone
            assert survivor.get(running.id).state is JobState.RUNNING
        finally:
            doomed.send_signal(signal.SIGKILL)
            doomed.wait(30)
        deadline = time.monotonic() + 30
        settled: list[Job] = []
        while not settled and time.monotonic() < deadline:  # PostgreSQL notices the closed connection at once
            settled = survivor.settle_orphans()
            time.sleep(0.05)
        assert [job.id for job in settled] == [running.id]
        failed = survivor.get(running.id)
        assert failed.state is JobState.FAILED and failed.message == NODE_LOST_MESSAGE.format(node="doomed")
        assert failed.finished_at is not None and failed.stage == "working"
        taken = survivor.claim(["test"])  # the queued job was never the dead node's: another takes it
        assert taken is not None and taken.id == waiting.id
        assert survivor.settle_orphans() == []  # and a live node's job is not settled
    finally:
        survivor.close()


async def test_runners_on_two_nodes_share_the_queue_and_cancel_across_nodes(postgres_url):
    stores = [postgres_store(postgres_url, name) for name in ("node-a", "node-b")]
    handlers = [Handlers(), Handlers()]
    runners = [
        JobRunner(store, {"test": handler}, poll_s=0.1, node=name)
        for store, handler, name in zip(stores, handlers, ("node-a", "node-b"), strict=True)
    ]
    await runners[0].start()
    try:
        blocking = await runners[0].submit("test", params={"name": "blocking", "action": "block"})
        assert await asyncio.to_thread(handlers[0].started.wait, 10)  # node-a is busy with it
        await runners[1].start()
        second = await runners[0].submit("test", params={"name": "second"})
        done = await runners[0].wait(second.id, 30)  # queued through node-a, run by node-b
        assert done.state is JobState.SUCCEEDED and handlers[1].order == ["second"]
        cancelled = await runners[1].cancel(blocking.id, 30)  # asked on node-b, running on node-a
        assert cancelled.state is JobState.CANCELLED and cancelled.message == CANCELLED_MESSAGE
        assert handlers[0].order == ["blocking"]
    finally:
        for runner in runners:
            await runner.stop()
        for handler in handlers:
            handler.release.set()
        for store in stores:
            store.close()
