"""The avatar REST API through a real ASGI app with its lifespan (job workers running)."""

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from face_video import write_face_video
from skimage import data as skimage_data

from avatalk.avatars.default_face import ensure_default_avatar
from avatalk.jobs import RESTART_MESSAGE, JobState, SQLiteJobStore
from avatalk.config import AvatarSettings, Settings
from avatalk.server.avatars_api import router, setup_avatars, shutdown_avatars
from avatalk.server.jobs_api import router as jobs_router
from avatalk.server.services import Services

FINISHED = {"succeeded", "failed", "cancelled"}


# --- Inputs, made once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A moving-face video, a face photo, a photo without a face and a text file."""
    folder = tmp_path_factory.mktemp("inputs")
    astronaut = skimage_data.astronaut()
    cv2.imwrite(str(folder / "astronaut.png"), cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR))
    gradient = np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))
    cv2.imwrite(str(folder / "gradient.png"), cv2.merge([gradient, gradient[::-1], gradient]))
    (folder / "notes.txt").write_text("this is not a video\n" * 20)
    write_face_video(folder / "clip.mp4", seconds=1)
    return folder


@pytest.fixture(scope="module")
def default_avatars(tmp_path_factory) -> Path:
    """The generated default avatar, drawn once and copied into each test's data folder."""
    root = tmp_path_factory.mktemp("default") / "avatars"
    ensure_default_avatar(root)
    return root


@pytest.fixture
def data_dir(tmp_path, default_avatars) -> Path:
    data = tmp_path / "data"
    shutil.copytree(default_avatars, data / "avatars")
    return data


def make_settings(data_dir: Path, **avatars) -> Settings:
    return Settings(data_dir=data_dir, avatars=AvatarSettings(output_size=128, **avatars))


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The avatar router in an app of its own, lifespan included."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await setup_avatars(app, settings)
        try:
            yield
        finally:
            await shutdown_avatars(app)

    app = FastAPI(lifespan=lifespan)
    app.state.services = Services.create(settings)
    app.include_router(router)
    app.include_router(jobs_router)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def upload(client: httpx.AsyncClient, path: Path, avatar_id: str, content_type: str, **fields) -> httpx.Response:
    return await client.post(
        "/v1/avatars",
        data={"id": avatar_id, **fields},
        files={"file": (path.name, path.read_bytes(), content_type)},
    )


async def wait_for_job(client: httpx.AsyncClient, job_id: str, timeout_s: float = 30.0) -> list[dict]:
    """Every status seen while polling, until the job has ended."""
    seen: list[dict] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not seen or seen[-1]["state"] not in FINISHED:
        assert asyncio.get_running_loop().time() < deadline, f"job still {seen[-1]}"
        response = await client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200
        seen.append(response.json())
        await asyncio.sleep(0.01)
    return seen


def uploads_left(data_dir: Path) -> list[str]:
    uploads = data_dir / "uploads"
    return sorted(os.listdir(uploads)) if uploads.exists() else []


# --- Creating avatars ------------------------------------------------------------------


async def test_video_upload_becomes_an_avatar(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        response = await upload(client, inputs / "clip.mp4", "tutor", "video/mp4", display_name="Tutor")
        assert response.status_code == 202, response.text
        body = response.json()
        job = body["job"]
        assert body["avatar_id"] == "tutor" and job["state"] == "queued" and job["kind"] == "avatar"
        assert response.headers["location"] == f"/v1/jobs/{job['id']}"

        seen = await wait_for_job(client, job["id"])
        final = seen[-1]
        assert final["state"] == "succeeded", final
        assert final["progress"] == 1.0 and final["stage"] == "done" and final["finished_at"]
        assert "ready" in final["message"] and final["result"]["frame_count"] == 25
        running = [s for s in seen if s["state"] == "running"]
        assert running and any(0 < s["progress"] < 1 for s in running)
        progress = [s["progress"] for s in seen]
        assert progress == sorted(progress)
        assert uploads_left(data_dir) == []  # the upload is removed once the job has ended

        listed = (await client.get("/v1/avatars")).json()["avatars"]
        assert [a["id"] for a in listed] == ["ava", "tutor"]
        avatar = (await client.get("/v1/avatars/tutor")).json()
        assert avatar["display_name"] == "Tutor" and avatar["source_kind"] == "video"
        assert (avatar["frame_count"], avatar["fps"], avatar["width"], avatar["height"]) == (25, 25, 128, 128)
        assert avatar["source"]["filename"] == "clip.mp4" and not avatar["default"]
        assert [j["id"] for j in (await client.get("/v1/jobs")).json()["jobs"]] == [job["id"]]

        assert (await client.delete("/v1/avatars/tutor")).status_code == 204
        missing = await client.get("/v1/avatars/tutor")
        assert missing.status_code == 404 and missing.json()["detail"] == "no avatar 'tutor'"
        assert (await client.delete("/v1/avatars/tutor")).status_code == 404
        assert not (data_dir / "avatars" / "tutor").exists()


async def test_photo_upload_becomes_an_avatar(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        response = await upload(client, inputs / "astronaut.png", "astro", "image/png")
        assert response.status_code == 202, response.text
        final = (await wait_for_job(client, response.json()["job"]["id"]))[-1]
        assert final["state"] == "succeeded", final
        avatar = (await client.get("/v1/avatars/astro")).json()
        assert avatar["source_kind"] == "image" and avatar["display_name"] == "astro"  # defaults to the id
        assert (avatar["width"], avatar["height"]) == (128, 128)


async def test_photo_without_a_face_fails_cleanly(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        response = await upload(client, inputs / "gradient.png", "nobody", "image/png")
        assert response.status_code == 202
        final = (await wait_for_job(client, response.json()["job"]["id"]))[-1]
        assert final["state"] == "failed"
        assert final["message"] == "no face was found in the photo gradient.png"
        assert (await client.get("/v1/avatars/nobody")).status_code == 404
    assert sorted(os.listdir(data_dir / "avatars")) == ["ava"]  # no partial or hidden folder
    assert uploads_left(data_dir) == []


async def test_refused_uploads(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        text = await upload(client, inputs / "notes.txt", "notes", "text/plain")
        assert text.status_code == 415 and "not a supported video" in text.json()["detail"]
        disguised = await upload(client, inputs / "notes.txt", "notes", "video/mp4")
        assert disguised.status_code == 415
        mislabelled = await upload(client, inputs / "astronaut.png", "astro", "video/mp4")
        assert mislabelled.status_code == 415 and "png image" in mislabelled.json()["detail"]
        no_file = await client.post("/v1/avatars", data={"id": "x"}, files={"other": ("a", b"b")})
        assert no_file.status_code == 422
        not_a_form = await client.post("/v1/avatars", json={"id": "x"})
        assert not_a_form.status_code == 415
        duplicate = await upload(client, inputs / "astronaut.png", "ava", "image/png")
        assert duplicate.status_code == 409 and "already exists" in duplicate.json()["detail"]
        long_name = await upload(client, inputs / "astronaut.png", "astro", "image/png", display_name="x" * 201)
        assert long_name.status_code == 422
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
    assert uploads_left(data_dir) == []


async def test_a_second_upload_for_an_id_being_prepared_is_refused(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        first = await upload(client, inputs / "clip.mp4", "twice", "video/mp4")
        second = await upload(client, inputs / "clip.mp4", "twice", "video/mp4")
        assert first.status_code == 202 and second.status_code == 409
        assert "twice" in second.json()["detail"]
        assert (await wait_for_job(client, first.json()["job"]["id"]))[-1]["state"] == "succeeded"


async def test_oversized_upload_is_refused_while_streaming(data_dir, inputs):
    assert (inputs / "clip.mp4").stat().st_size > 4096
    async with serve(make_settings(data_dir, max_upload_bytes=4096)) as client:
        # Without a Content-Length, the limit can only be enforced while the body streams in.
        async def chunks():
            body = (inputs / "clip.mp4").read_bytes()
            yield b'--b\r\nContent-Disposition: form-data; name="id"\r\n\r\nbig\r\n'
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="clip.mp4"\r\n'
            yield b"Content-Type: video/mp4\r\n\r\n"
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]
            yield b"\r\n--b--\r\n"

        streamed = await client.post(
            "/v1/avatars", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert streamed.status_code == 413, streamed.text
        assert "4096 bytes" in streamed.json()["detail"]
        declared = await upload(client, inputs / "clip.mp4", "big", "video/mp4")  # Content-Length is too big
        assert declared.status_code == 413
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
    assert uploads_left(data_dir) == []


async def test_unsafe_ids_write_nothing_outside_the_data_folder(tmp_path, data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        for bad in ("../evil", "a/b", "..", ".", "", "Ava", "/etc/passwd"):
            response = await upload(client, inputs / "astronaut.png", bad, "image/png")
            assert response.status_code == 422, bad
            if bad:
                assert "invalid avatar id" in response.json()["detail"]
        for path in ("/v1/avatars/..%2Fevil", "/v1/avatars/a%2Fb", "/v1/avatars/%2E%2E", "/v1/avatars/EVIL"):
            assert (await client.get(path)).status_code in (404, 422), path
            assert (await client.delete(path)).status_code in (404, 405, 422), path
        assert (await client.get("/v1/jobs")).json()["jobs"] == []
    assert sorted(os.listdir(tmp_path)) == ["data"]
    assert sorted(os.listdir(data_dir / "avatars")) == ["ava"]
    assert uploads_left(data_dir) == []


async def test_default_avatar_is_there_and_cannot_be_deleted(data_dir):
    async with serve(make_settings(data_dir)) as client:
        ava = (await client.get("/v1/avatars/ava")).json()
        assert ava["default"] and ava["source_kind"] == "generated"
        refused = await client.delete("/v1/avatars/ava")
        assert refused.status_code == 409 and "default avatar" in refused.json()["detail"]


async def test_delete_cancels_a_queued_preparation(data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        ahead = await upload(client, inputs / "clip.mp4", "ahead", "video/mp4")
        behind = await upload(client, inputs / "astronaut.png", "behind", "image/png")
        assert (await client.delete("/v1/avatars/behind")).status_code == 204
        job = (await client.get(f"/v1/jobs/{behind.json()['job']['id']}")).json()
        assert job["state"] == "cancelled"
        assert (await wait_for_job(client, ahead.json()["job"]["id"]))[-1]["state"] == "succeeded"
        assert (await client.get("/v1/avatars/behind")).status_code == 404
        cancel_again = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancel_again.status_code == 200 and cancel_again.json()["state"] == "cancelled"
        cancel_done = await client.post(f"/v1/jobs/{ahead.json()['job']['id']}/cancel")
        assert cancel_done.status_code == 409
    assert uploads_left(data_dir) == []


# --- Importing server-side files -----------------------------------------------------------


async def test_from_path_only_reads_inside_the_import_root(tmp_path, data_dir, inputs):
    async with serve(make_settings(data_dir)) as client:
        disabled = await client.post("/v1/avatars/from-path", json={"path": "x.png", "id": "x"})
        assert disabled.status_code == 403 and "import_root" in disabled.json()["detail"]

    imports = tmp_path / "imports"
    imports.mkdir()
    shutil.copy(inputs / "astronaut.png", imports / "face.png")
    secret = tmp_path / "secret.png"
    shutil.copy(inputs / "astronaut.png", secret)
    (imports / "link.png").symlink_to(secret)
    async with serve(make_settings(data_dir, import_root=imports)) as client:

        async def from_path(path: str, avatar_id: str = "imported") -> httpx.Response:
            return await client.post("/v1/avatars/from-path", json={"path": path, "id": avatar_id})

        for outside in ("../secret.png", str(secret), "link.png", "/etc/passwd", "../../../../etc/passwd"):
            response = await from_path(outside)
            assert response.status_code == 403, (outside, response.text)
            assert "outside" in response.json()["detail"]
        assert (await from_path("missing.png")).status_code == 404
        assert (await from_path("face.png", "../evil")).status_code == 422
        response = await from_path("face.png")
        assert response.status_code == 202, response.text
        final = (await wait_for_job(client, response.json()["job"]["id"]))[-1]
        assert final["state"] == "succeeded"
        assert (await client.get("/v1/avatars/imported")).json()["source"]["filename"] == "face.png"
    assert (imports / "face.png").is_file()  # the user's file is never removed


# --- Restarts --------------------------------------------------------------------------------


async def test_restart_keeps_jobs_and_settles_unfinished_ones(data_dir, inputs):
    settings = make_settings(data_dir)
    async with serve(settings) as client:
        response = await upload(client, inputs / "astronaut.png", "kept", "image/png")
        finished = (await wait_for_job(client, response.json()["job"]["id"]))[-1]
        assert finished["state"] == "succeeded"

    # Jobs as a killed server leaves them: one running, one queued with its input on disk.
    store = SQLiteJobStore(data_dir / "jobs.sqlite3")
    interrupted = store.create("avatar", avatar_id="killed", params={"input": str(inputs / "clip.mp4")})
    store.start(interrupted.id)
    pending_input = data_dir / "uploads" / "pending"
    pending_input.mkdir(parents=True)
    shutil.copy(inputs / "astronaut.png", pending_input / "astronaut.png")
    pending = store.create(
        "avatar",
        avatar_id="pending",
        params={"input": str(pending_input / "astronaut.png"), "display_name": "P", "cleanup": str(pending_input)},
    )
    (data_dir / "uploads" / "cut-off").mkdir()  # an upload the killed server never finished
    store.close()

    async with serve(settings) as client:
        assert (await client.get(f"/v1/jobs/{finished['id']}")).json() == finished
        failed = (await client.get(f"/v1/jobs/{interrupted.id}")).json()
        assert failed["state"] == JobState.FAILED and failed["message"] == RESTART_MESSAGE
        resumed = (await wait_for_job(client, pending.id))[-1]
        assert resumed["state"] == "succeeded", resumed
        ids = [a["id"] for a in (await client.get("/v1/avatars")).json()["avatars"]]
        assert ids == ["ava", "kept", "pending"]
    assert uploads_left(data_dir) == []


async def test_openapi_documents_the_routes(data_dir):
    async with serve(make_settings(data_dir)) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/v1/avatars",
        "/v1/avatars/from-path",
        "/v1/avatars/{avatar_id}",
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/cancel",
    ):
        assert path in paths, path
    create = paths["/v1/avatars"]["post"]
    assert create["tags"] == ["avatars"]
    assert "file" in create["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert create["responses"]["202"]["content"]["application/json"]["schema"]["$ref"].endswith("AvatarJobAccepted")
    assert {"413", "415", "409", "422"} <= set(create["responses"])
    assert {"AvatarSummary", "AvatarDetail", "JobOut", "JobList"} <= set(schema["components"]["schemas"])
