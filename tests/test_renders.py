"""Offline renders: CLI and the /v1/renders job API, with the real TTS and classic renderer."""

from __future__ import annotations

import asyncio

import av
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from avatalk.cli import app as cli_app
from avatalk.media.audio import write_wav

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(live_server_factory):
    return live_server_factory()


@pytest.fixture(scope="module")
def small_upload_server(live_server_factory):
    """Uploads limited to 4 KiB, and no job rate limit in the way of many refused requests."""
    return live_server_factory(avatars={"max_upload_bytes": 4096}, limits={"jobs_per_minute": 100_000})


async def wait_job(http: httpx.AsyncClient, job_id: str, timeout: float = 120.0) -> dict:
    for _ in range(int(timeout / 0.2)):
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.2)
    raise TimeoutError(job)


async def download_when_done(http: httpx.AsyncClient, job_id: str, timeout: float = 120.0) -> httpx.Response:
    """Poll ``GET /v1/renders/{id}`` until it answers 200; every answer must match the job's state.

    200 only for a job that has succeeded (its state read after the answer is
    ``succeeded``), 409 only for one that had not (its state read before the
    answer is not ``succeeded``), and nothing else.
    """
    for _ in range(int(timeout / 0.2)):
        before = (await http.get(f"/v1/jobs/{job_id}")).json()["state"]
        video = await http.get(f"/v1/renders/{job_id}")
        after = (await http.get(f"/v1/jobs/{job_id}")).json()["state"]
        if video.status_code == 200:
            assert after == "succeeded", (before, after)
            return video
        assert video.status_code == 409, video.text
        assert before != "succeeded", (before, video.text)
        assert video.json()["detail"].startswith("the render is ")
        assert after not in ("failed", "cancelled"), video.text
        await asyncio.sleep(0.2)
    raise TimeoutError(f"render {job_id} did not finish")


def probe(path) -> tuple[int, float, bool]:
    with av.open(str(path)) as container:
        has_audio = bool(container.streams.audio)
        frames = sum(1 for _ in container.decode(video=0))
    return frames, frames / 25, has_audio


async def test_render_a_script_over_rest(server, tmp_path):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        accepted = await http.post("/v1/renders", json={"avatar": "ava", "text": "Welcome to the course.", "size": 256})
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job"]["id"]
        video = await download_when_done(http, job_id)
        job = (await http.get(f"/v1/jobs/{job_id}")).json()
        assert job["state"] == "succeeded", job
        assert job["result"]["frames"] > 25
        assert video.headers["content-type"] == "video/mp4"
        assert (await http.get(accepted.json()["video_url"])).content == video.content
        path = tmp_path / "render.mp4"
        path.write_bytes(video.content)
        frames, _seconds, has_audio = probe(path)
        assert frames == job["result"]["frames"] and has_audio


async def test_render_from_uploaded_audio_and_bad_audio(server, speech, tmp_path):
    wav = tmp_path / "speech.wav"
    write_wav(wav, speech("One, two, three."), 16000)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
        accepted = await http.post(
            "/v1/renders/from-audio", data={"avatar": "ava", "size": "128"}, files={"file": ("speech.wav", wav.read_bytes())}
        )
        assert accepted.status_code == 202, accepted.text
        job = await wait_job(http, accepted.json()["job"]["id"])
        assert job["state"] == "succeeded", job
        expected = int(np.ceil(len(speech("One, two, three.")) / 640))
        assert job["result"]["frames"] == expected

        corrupt = await http.post(
            "/v1/renders/from-audio", data={"avatar": "ava"}, files={"file": ("x.wav", b"RIFF....garbage" * 10)}
        )
        assert corrupt.status_code == 202
        job = await wait_job(http, corrupt.json()["job"]["id"])
        assert job["state"] == "failed" and not job["result"]
        assert "audio" in job["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"avatar": "nobody", "text": "hi"}, 404),
        ({"avatar": "../../etc", "text": "hi"}, 422),
        ({"avatar": "ava", "text": ""}, 422),
        ({"avatar": "ava", "text": "hi", "size": 101}, 422),
        ({"avatar": "ava", "text": "x" * 6000}, 422),
    ],
)
async def test_render_bad_requests(server, body, status):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        response = await http.post("/v1/renders", json=body)
        assert response.status_code == status, response.text
        assert response.json()["detail"]


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"avatar": "nobody"}, 404),
        ({"avatar": "../../etc"}, 422),
        ({}, 422),
        ({"avatar": "ava", "size": "101"}, 422),
        ({"avatar": "ava", "size": "4096"}, 422),
        ({"avatar": "ava", "size": "big"}, 422),
    ],
)
async def test_render_from_audio_bad_forms(small_upload_server, fields, status):
    async with httpx.AsyncClient(base_url=small_upload_server.base_url) as http:
        response = await http.post("/v1/renders/from-audio", data=fields, files={"file": ("a.wav", b"RIFF" * 100)})
        assert response.status_code == status, response.text
        assert response.json()["detail"]


async def test_oversized_audio_upload_is_refused(small_upload_server):
    async with httpx.AsyncClient(base_url=small_upload_server.base_url) as http:
        response = await http.post(
            "/v1/renders/from-audio", data={"avatar": "ava"}, files={"file": ("big.wav", bytes(10_000))}
        )
        assert response.status_code == 413, response.text
        assert "4096 bytes" in response.json()["detail"]
        assert (await http.get("/v1/jobs")).json()["jobs"] == []


async def test_unknown_render_is_404(server):
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/v1/renders/nope")).status_code == 404


def test_cli_render_from_audio(tmp_path, speech, monkeypatch):
    monkeypatch.setenv("AVATALK_DATA_DIR", str(tmp_path / "data"))
    wav = tmp_path / "speech.wav"
    write_wav(wav, speech("Hello there."), 16000)
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(cli_app, ["render", "--avatar", "ava", "--audio", str(wav), "-o", str(out), "--size", "128"])
    assert result.exit_code == 0, result.output
    frames, _seconds, has_audio = probe(out)
    assert frames == int(np.ceil(len(speech("Hello there.")) / 640)) and has_audio


def test_cli_render_needs_exactly_one_source(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATALK_DATA_DIR", str(tmp_path / "data"))
    result = CliRunner().invoke(cli_app, ["render", "--avatar", "ava", "-o", str(tmp_path / "o.mp4")])
    assert result.exit_code == 2 and "exactly one" in result.output


async def test_render_jobs_across_a_restart(engine_models, tmp_path, speech):
    """docs/avatars.md: a job a crash interrupted is failed with the reason; queued ones run after the restart."""
    from fakes import LiveServer

    from avatalk.avatars.render_job import RENDER_JOB
    from avatalk.config import Settings
    from avatalk.jobs import SQLiteJobStore
    from avatalk.jobs.model import RESTART_MESSAGE
    from avatalk.server.app import create_app

    settings = Settings(data_dir=tmp_path / "data")
    first = LiveServer(create_app(settings, engine_models))
    try:
        async with httpx.AsyncClient(base_url=first.base_url, timeout=60) as http:
            accepted = await http.post("/v1/renders", json={"avatar": "ava", "text": "Before the restart.", "size": 64})
            assert accepted.status_code == 202, accepted.text
            before = accepted.json()["job"]["id"]
            earlier_video = (await download_when_done(http, before)).content
    finally:
        first.stop()

    # What a killed server leaves behind: one render running, one queued with its audio on disk.
    inputs = tmp_path / "data" / "uploads" / "queued-render"
    inputs.mkdir(parents=True)
    write_wav(inputs / "speech.wav", speech("After the restart."), 16000)
    store = SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3")
    interrupted = store.create(RENDER_JOB, params={"input": str(inputs / "gone.wav"), "avatar": "ava", "size": 64})
    store.start(interrupted.id)
    queued = store.create(
        RENDER_JOB, params={"input": str(inputs / "speech.wav"), "cleanup": str(inputs), "avatar": "ava", "size": 64}
    )
    store.close()

    second = LiveServer(create_app(settings, engine_models))
    try:
        async with httpx.AsyncClient(base_url=second.base_url, timeout=60) as http:
            failed = (await http.get(f"/v1/jobs/{interrupted.id}")).json()
            assert failed["state"] == "failed" and failed["message"] == RESTART_MESSAGE
            refused = await http.get(f"/v1/renders/{interrupted.id}")
            assert refused.status_code == 409 and RESTART_MESSAGE in refused.json()["detail"]
            resumed = await download_when_done(http, queued.id)
            assert (await http.get(f"/v1/jobs/{queued.id}")).json()["state"] == "succeeded"
            path = tmp_path / "resumed.mp4"
            path.write_bytes(resumed.content)
            frames, _seconds, has_audio = probe(path)
            assert frames == int(np.ceil(len(speech("After the restart.")) / 640)) and has_audio
            # The render finished before the restart is still there.
            kept = await http.get(f"/v1/renders/{before}")
            assert kept.status_code == 200 and kept.content == earlier_video
    finally:
        second.stop()
    assert not inputs.exists()  # the queued job's upload folder was cleaned up when it ended


def test_cli_render_from_text_has_audio_and_video_in_sync(tmp_path, monkeypatch):
    """``avatalk render --text``: the script is spoken and drawn on one timeline (same start, same length)."""
    monkeypatch.setenv("AVATALK_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "script.mp4"
    result = CliRunner().invoke(
        cli_app, ["render", "--avatar", "ava", "--text", "Welcome to the course, everyone.", "-o", str(out), "--size", "128"]
    )
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.codec_context.width == video.codec_context.height == 128 and container.streams.audio
        frames = [frame for frame in container.decode(video=0)]
    with av.open(str(out)) as container:
        chunks = [frame for frame in container.decode(audio=0)]
    samples = np.concatenate([chunk.to_ndarray().reshape(-1) for chunk in chunks])
    rate = chunks[0].sample_rate
    assert len(frames) > 25  # more than a second of speech
    assert frames[0].time == 0.0 and chunks[0].time <= 0.0  # both start at zero
    video_seconds, audio_seconds = len(frames) / 25, len(samples) / rate
    # The same length, to within one 40 ms frame plus the AAC encoder's padding (one 1024-sample frame).
    assert abs(audio_seconds - video_seconds) <= 0.04 + 1024 / rate, (audio_seconds, video_seconds)
    # The script was spoken (not silence).
    assert float(np.sqrt(np.mean(samples**2))) > 0.01
    assert "wrote" in result.output and f"{len(frames)} frames" in result.output
