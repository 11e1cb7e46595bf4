"""``/v1/renders``: make a talking-avatar MP4 from a script or an audio file, as a job.

The uploaded audio is streamed to disk by ``avatalk.server.uploads`` (the
same helper and limit as avatar uploads), and every other file operation
runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from avatalk.avatars.offline import RenderError, synthesize_script
from avatalk.avatars.render_job import RENDER_JOB, render_path
from avatalk.avatars.store import AvatarNotFound, InvalidAvatarId, validate_avatar_id
from avatalk.jobs import JobNotFound, JobState, QueueFull
from avatalk.media.audio import write_wav
from avatalk.server.jobs_api import JobOut
from avatalk.server.services import services
from avatalk.server.uploads import receive_form, unprocessable, upload_folder

router = APIRouter(tags=["renders"])

MAX_SCRIPT_CHARS = 5000
MIN_SIZE = 64
MAX_SIZE = 2048
_TEXT_FIELDS = ("avatar", "size")

# The upload body is parsed by hand (streamed), so FastAPI cannot derive its schema.
_AUDIO_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["avatar", "file"],
                    "properties": {
                        "avatar": {"type": "string", "description": "id of a prepared avatar (send it before the file)"},
                        "size": {
                            "type": "integer",
                            "minimum": MIN_SIZE,
                            "maximum": MAX_SIZE,
                            "description": "longer side of the video in pixels (even)",
                        },
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "speech audio (wav, mp3, ogg, m4a, ...)",
                        },
                    },
                }
            }
        },
    }
}


class RenderRequest(BaseModel):
    avatar: str = Field(description="id of a prepared avatar")
    text: str = Field(min_length=1, max_length=MAX_SCRIPT_CHARS, description="the script to speak")
    size: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, description="longer side of the video in pixels (even)")


class RenderAccepted(BaseModel):
    job: JobOut
    video_url: str = Field(description="GET it once the job has succeeded")


async def _check_avatar(request: Request, avatar_id: str) -> None:
    try:
        validate_avatar_id(avatar_id)
        await asyncio.to_thread(services(request).require_avatar_store().get, avatar_id)
    except InvalidAvatarId as error:
        raise HTTPException(422, f"invalid avatar id: {error}") from error
    except AvatarNotFound as error:
        raise HTTPException(404, f"there is no avatar {avatar_id!r}") from error


def _check_size(size: int | None) -> None:
    if size is not None and size % 2:
        raise HTTPException(422, f"size must be even, not {size}")


def _form_size(value: str | None) -> int | None:
    """The ``size`` form field as the JSON route's ``size``: absent or empty means the default."""
    if not value:
        return None
    try:
        size = int(value)
    except ValueError:
        raise unprocessable(f"size must be a whole number of pixels, not {value!r}") from None
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise unprocessable(f"size must be between {MIN_SIZE} and {MAX_SIZE}, not {size}")
    _check_size(size)
    return size


def _write_script_audio(path: Path, audio: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_wav(path, audio, rate)


async def _submit(request: Request, response: Response, folder: Path, audio: Path, avatar: str, size: int | None) -> RenderAccepted:
    """Queue the render of ``audio``; the job takes ``folder`` over and removes it when it ends."""
    try:
        job = await services(request).require_jobs().submit(
            RENDER_JOB, params={"input": str(audio), "cleanup": str(folder), "avatar": avatar, "size": size}
        )
    except QueueFull as error:
        raise HTTPException(503, str(error), headers={"Retry-After": "30"}) from error
    response.status_code = 202
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return RenderAccepted(job=JobOut.of(job), video_url=f"/v1/renders/{job.id}")


@router.post("/v1/renders", status_code=202, response_model=RenderAccepted)
async def create_render(body: RenderRequest, request: Request, response: Response) -> RenderAccepted:
    """Speak ``text`` with the server's TTS and render the avatar saying it (a job; poll /v1/jobs/{id})."""
    await _check_avatar(request, body.avatar)
    _check_size(body.size)
    models = services(request).models
    if models is None:
        raise HTTPException(503, "the server is still loading its models", headers={"Retry-After": "10"})
    try:
        audio, rate = await synthesize_script(models.tts, body.text)
    except RenderError as error:
        raise HTTPException(422, str(error)) from error
    async with upload_folder(services(request).settings) as folder:
        script_audio = folder / "script.wav"
        await asyncio.to_thread(_write_script_audio, script_audio, audio, rate)
        return await _submit(request, response, folder, script_audio, body.avatar, body.size)


@router.post(
    "/v1/renders/from-audio",
    status_code=202,
    response_model=RenderAccepted,
    responses={
        404: {"description": "no such avatar"},
        413: {"description": "the upload is larger than avatars.max_upload_bytes"},
        422: {"description": "invalid avatar id, size or form, or an empty file"},
        503: {"description": "too many jobs are queued; retry later"},
    },
    openapi_extra=_AUDIO_UPLOAD_BODY,
)
async def create_render_from_audio(request: Request, response: Response) -> RenderAccepted:
    """Render the avatar lip-syncing an uploaded audio file (multipart ``avatar``, ``size``, ``file``; a job)."""
    settings = services(request).settings

    async def check_field(name: str, value: str) -> None:
        # Checked as soon as they arrive, so a wrong avatar or size is refused before the audio is sent.
        if name == "avatar":
            await _check_avatar(request, value)
        elif name == "size":
            _form_size(value)

    async with upload_folder(settings) as folder:
        upload = await receive_form(
            request,
            folder,
            max_file_bytes=settings.avatars.max_upload_bytes,
            text_fields=_TEXT_FIELDS,
            file_what="the speech audio",
            check_field=check_field,
        )
        avatar = upload.fields.get("avatar")
        if avatar is None:
            raise unprocessable("the form field 'avatar' is missing")
        assert upload.path is not None
        return await _submit(request, response, folder, upload.path, avatar, _form_size(upload.fields.get("size")))


@router.get(
    "/v1/renders/{job_id}",
    response_class=FileResponse,
    responses={200: {"content": {"video/mp4": {}}}, 404: {"description": "no such render"}, 409: {"description": "not finished"}},
)
async def get_render(job_id: str, request: Request) -> FileResponse:
    """The finished MP4 of a render job."""
    try:
        job = await asyncio.to_thread(services(request).require_jobs().store.get, job_id)
    except JobNotFound as error:
        raise HTTPException(404, f"there is no job {job_id!r}") from error
    if job.kind != RENDER_JOB:
        raise HTTPException(404, f"job {job_id} is not a render")
    if job.state is not JobState.SUCCEEDED:
        raise HTTPException(409, f"the render is {job.state.value}: {job.message or job.stage or 'waiting'}")
    path = render_path(services(request).settings, job.id)
    if not await asyncio.to_thread(path.is_file):
        raise HTTPException(404, "the video file of this render is gone")
    return FileResponse(path, media_type="video/mp4", filename=f"render-{job.id}.mp4")
