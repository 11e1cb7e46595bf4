"""kill -9 during avatar preparation: no job record lost, no half-written avatar."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from face_video import write_face_video
from fakes import free_port

from avatalk.jobs import JobState, SQLiteJobStore
from avatalk.avatars.store import AvatarStore

pytestmark = pytest.mark.slow


def test_kill_9_during_preparation(tmp_path):
    video = tmp_path / "long.mp4"
    write_face_video(video, seconds=12, size=(640, 480))  # long and large: preparing it takes seconds
    data_dir = tmp_path / "data"
    port = free_port()
    env = dict(os.environ, AVATALK_DATA_DIR=str(data_dir), AVATALK_PORT=str(port), AVATALK_LOG_LEVEL="warning")
    server = subprocess.Popen([sys.executable, "-m", "avatalk.cli", "serve"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            time.sleep(0.3)
        with video.open("rb") as upload:
            accepted = httpx.post(
                f"{base}/v1/avatars", data={"id": "victim"}, files={"file": ("long.mp4", upload, "video/mp4")}, timeout=60
            )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job"]["id"]
        while True:
            job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
            if job["state"] == "running" and job["progress"] > 0.05:
                break
            assert job["state"] in ("queued", "running"), job
            assert time.monotonic() < deadline
            time.sleep(0.1)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    avatars = data_dir / "avatars"
    assert not (avatars / "victim").exists()  # never a half-written avatar under its real name
    assert [manifest.id for manifest in AvatarStore(avatars, stale_after_s=0).list()] == ["ava"]
    assert not [p for p in avatars.iterdir() if p.name.startswith(".tmp-")]  # reopening cleans the debris
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    try:
        job = store.get(job_id)
        assert job.state is JobState.FAILED and "restart" in (job.message or "")
    finally:
        store.close()
