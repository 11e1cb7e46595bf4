"""``/v1/renders``: make a talking-avatar MP4 from a script or an audio file, as a job."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from avatalk.avatars.jobs import JobNotFound, JobState, QueueFull
from avatalk.avatars.offline import RENDER_JOB, RenderError, renders_dir, synthesize_script
from avatalk.avatars.store import AvatarNotFound, InvalidAvatarId, validate_avatar_id
from avatalk.media.audio import write_wav
from avatalk.server.avatars_api import JobOut, uploads_dir

router = APIRouter(tags=["renders"])

MAX_SCRIPT_CHARS = 5000
_CHUNK = 1024 * 1024


class RenderRequest(BaseModel):
    avatar: str = Field(description="id of a prepared avatar")
    text: str = Field(min_length=1, max_length=MAX_SCRIPT_CHARS, description="the script to speak")
    size: int | None = Field(None, ge=64, le=2048, description="longer side of the video in pixels (even)")


class RenderAccepted(BaseModel):
    job: JobOut
    video_url: str = Field(description="GET it once the job has succeeded")


async def _check_avatar(request: Request, avatar_id: str) -> None:
    try:
        validate_avatar_id(avatar_id)
        await asyncio.to_thread(request.app.state.avatar_store.get, avatar_id)
    except InvalidAvatarId as error:
        raise HTTPException(422, f"invalid avatar id: {error}") from error
    except AvatarNotFound as error:
        raise HTTPException(404, f"there is no avatar {avatar_id!r}") from error


def _check_size(size: int | None) -> None:
    if size is not None and size % 2:
        raise HTTPException(422, f"size must be even, not {size}")


async def _submit(request: Request, response: Response, folder: Path, audio: Path, avatar: str, size: int | None) -> RenderAccepted:
    try:
        job = await request.app.state.jobs.submit(
            RENDER_JOB, params={"input": str(audio), "cleanup": str(folder), "avatar": avatar, "size": size}
        )
    except QueueFull as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise HTTPException(503, str(error), headers={"Retry-After": "30"}) from error
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return RenderAccepted(job=JobOut.of(job), video_url=f"/v1/renders/{job.id}")


@router.post("/v1/renders", status_code=202, response_model=RenderAccepted)
async def create_render(body: RenderRequest, request: Request, response: Response) -> RenderAccepted:
    """Speak ``text`` with the server's TTS and render the avatar saying it (a job; poll /v1/jobs/{id})."""
    await _check_avatar(request, body.avatar)
    _check_size(body.size)
    models = request.app.state.models
    if models is None:
        raise HTTPException(503, "the server is still loading its models", headers={"Retry-After": "10"})
    try:
        audio, rate = await synthesize_script(models.tts, body.text)
    except RenderError as error:
        raise HTTPException(422, str(error)) from error
    folder = uploads_dir(request.app.state.settings) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    script_audio = folder / "script.wav"
    await asyncio.to_thread(write_wav, script_audio, audio, rate)
    return await _submit(request, response, folder, script_audio, body.avatar, body.size)


@router.post("/v1/renders/from-audio", status_code=202, response_model=RenderAccepted)
async def create_render_from_audio(
    request: Request,
    response: Response,
    avatar: str = Form(..., description="id of a prepared avatar"),
    file: UploadFile = File(..., description="speech audio (wav, mp3, ogg, m4a, ...)"),
    size: int | None = Form(None, ge=64, le=2048),
) -> RenderAccepted:
    """Render the avatar lip-syncing an uploaded audio file (a job)."""
    await _check_avatar(request, avatar)
    _check_size(size)
    limit = request.app.state.settings.avatars.max_upload_bytes
    folder = uploads_dir(request.app.state.settings) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    target = folder / "audio"
    written = 0
    try:
        with target.open("wb") as out:
            while chunk := await file.read(_CHUNK):
                written += len(chunk)
                if written > limit:
                    raise HTTPException(413, f"the upload is larger than the limit of {limit} bytes")
                await asyncio.to_thread(out.write, chunk)
        if written == 0:
            raise HTTPException(422, "the uploaded file is empty")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return await _submit(request, response, folder, target, avatar, size)


@router.get(
    "/v1/renders/{job_id}",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}}}, 404: {"description": "no such render"}, 409: {"description": "not finished"}},
)
async def get_render(job_id: str, request: Request) -> FileResponse:
    """The finished MP4 of a render job."""
    try:
        job = await asyncio.to_thread(request.app.state.jobs.store.get, job_id)
    except JobNotFound as error:
        raise HTTPException(404, f"there is no job {job_id!r}") from error
    if job.kind != RENDER_JOB:
        raise HTTPException(404, f"job {job_id} is not a render")
    if job.state is not JobState.SUCCEEDED:
        raise HTTPException(409, f"the render is {job.state.value}: {job.message or job.stage or 'waiting'}")
    path = renders_dir(request.app.state.settings) / f"{job.id}.mp4"
    if not path.is_file():
        raise HTTPException(404, "the video file of this render is gone")
    return FileResponse(path, media_type="video/mp4", filename=f"render-{job.id}.mp4")
