"""REST API for avatars: create (upload or server-side file), list, get, delete.

Creating an avatar takes a while, so ``POST /v1/avatars`` answers 202 with a
job to poll at ``/v1/jobs/{id}`` (DESIGN.md section 4). Uploads are streamed
to ``<data_dir>/uploads`` by ``avatalk.server.uploads``: the size limit is
enforced while receiving (a client cannot make the server buffer more than
the limit) and the content type is checked on the first bytes, so a wrong
file is refused before it is fully sent. Requests are checked before any
job is queued: the id (422), the id being free (409), the size (413) and
the type (415); what only preparation can find out (no face, an undecodable
stream) ends in a ``failed`` job whose message says why.

The routes read the app's ``Services`` (settings, avatar store and job
runner); ``setup_avatars`` opens the store and the jobs and
``shutdown_avatars`` closes them in the app's lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from avatalk.avatars.default_face import ensure_default_avatar
from avatalk.avatars.preparation_job import AVATAR_JOB, AvatarJobHandler
from avatalk.avatars.prepare_settings import avatars_root
from avatalk.avatars.render_job import RENDER_JOB, RenderJobHandler
from avatalk.avatars.store import (
    MAX_DISPLAY_NAME,
    AvatarManifest,
    AvatarNotFound,
    AvatarStore,
    InvalidAvatarId,
    SourceInfo,
    validate_avatar_id,
)
from avatalk.config import Settings
from avatalk.jobs import JobConflict, JobRunner, QueueFull, open_job_store
from avatalk.server.jobs_api import JobOut, error_responses
from avatalk.media.sniff import MediaType, sniff_file, sniff_media
from avatalk.server.services import services
from avatalk.server.uploads import receive_form, remove_orphan_uploads, unprocessable, upload_folder

logger = logging.getLogger(__name__)

router = APIRouter(tags=["avatars"])

_TEXT_FIELDS = ("id", "display_name")
_RETRY_AFTER_S = "30"


# --- Response and request models --------------------------------------------------


class AvatarJobAccepted(BaseModel):
    job: JobOut
    avatar_id: str


class AvatarSummary(BaseModel):
    id: str
    display_name: str
    frame_count: int
    fps: int
    width: int
    height: int
    created_at: datetime
    source_kind: str = Field(description='"video", "image" or "generated"')

    @classmethod
    def of(cls, manifest: AvatarManifest) -> AvatarSummary:
        return cls(
            id=manifest.id,
            display_name=manifest.display_name,
            frame_count=manifest.frame_count,
            fps=manifest.fps,
            width=manifest.width,
            height=manifest.height,
            created_at=manifest.created_at,
            source_kind=manifest.source.kind,
        )


class AvatarDetail(AvatarSummary):
    duration_s: float = Field(description="length of one pass through the frames")
    missing_faces: int = Field(description="frames whose face was interpolated from their neighbours")
    default: bool = Field(description="the server's default avatar (cannot be deleted)")
    source: SourceInfo


class AvatarList(BaseModel):
    avatars: list[AvatarSummary] = Field(description="sorted by id")


class FromPathRequest(BaseModel):
    path: str = Field(description="file under the server's import folder (relative to it, or absolute)")
    id: str = Field(description="new avatar id: 1-64 of a-z, 0-9, '-', '_', starting with a letter or digit")
    display_name: str | None = Field(None, description="shown to users; defaults to the id")


# The upload body is parsed by hand (streamed), so FastAPI cannot derive its schema.
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "id"],
                    "properties": {
                        "id": {"type": "string", "description": "new avatar id (send it before the file)"},
                        "display_name": {"type": "string", "description": "defaults to the id"},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "video (mp4, mov, webm, mkv, avi) or photo (jpeg, png, webp, bmp)",
                        },
                    },
                }
            }
        },
    }
}


# --- Lifespan ----------------------------------------------------------------------


async def setup_avatars(app: FastAPI, settings: Settings) -> None:
    """Open the avatar store and the jobs, and start the job workers (call in the lifespan).

    Generates the default avatar on a fresh install, settles the jobs of a
    previous process (see ``avatalk.jobs.store``) and removes uploads that
    no queued job needs any more.
    """
    root = avatars_root(settings)
    await asyncio.to_thread(ensure_default_avatar, root)
    svc = services(app)
    avatar_store = await asyncio.to_thread(AvatarStore, root)
    svc.avatar_store = avatar_store
    node = settings.cluster.node_id or socket.gethostname()
    store = await asyncio.to_thread(
        open_job_store, settings.jobs.database_url, settings.data_dir / "jobs.sqlite3", node=node
    )
    try:
        await asyncio.to_thread(remove_orphan_uploads, settings, store)
        runner = JobRunner(
            store,
            {
                AVATAR_JOB: AvatarJobHandler(settings),
                RENDER_JOB: RenderJobHandler(
                    settings, avatar_store, lambda: None if svc.models is None else svc.models.renderer
                ),
            },
            workers=settings.avatars.preparation_workers,
            poll_s=settings.jobs.poll_s,
            node=node,
        )
        await runner.start()
    except BaseException:
        store.close()
        raise
    svc.jobs = runner


async def shutdown_avatars(app: FastAPI) -> None:
    """Stop the job workers (running jobs are put back in the queue) and close the jobs database."""
    svc = services(app)
    runner = svc.jobs
    if runner is None:
        return
    await runner.stop()
    runner.store.close()
    svc.jobs = None


# --- Helpers -------------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    return services(request).settings


def _avatars(request: Request) -> AvatarStore:
    return services(request).require_avatar_store()


def _jobs(request: Request) -> JobRunner:
    return services(request).require_jobs()


def _valid_id(avatar_id: str) -> str:
    try:
        return validate_avatar_id(avatar_id)
    except InvalidAvatarId as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None


def _display_name(name: str | None, avatar_id: str) -> str:
    if name is None or name == "":
        return avatar_id
    if not name.strip() or len(name) > MAX_DISPLAY_NAME:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"the display name must be 1 to {MAX_DISPLAY_NAME} characters"
        )
    return name


async def _ensure_id_free(request: Request, avatar_id: str) -> None:
    """409 when the avatar exists or is being prepared (the job store re-checks the latter atomically)."""
    if await asyncio.to_thread(_avatars(request).exists, avatar_id):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"an avatar with id {avatar_id!r} already exists; delete it or choose another id"
        )
    active = await asyncio.to_thread(_jobs(request).store.active_for_avatar, avatar_id, AVATAR_JOB)
    if active is not None:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"avatar {avatar_id!r} is already being prepared (job {active.id})"
        )


async def _queue_avatar_job(
    request: Request, response: Response, avatar_id: str, display_name: str, source: Path, cleanup: Path | None
) -> AvatarJobAccepted:
    await _ensure_id_free(request, avatar_id)
    params = {"input": str(source), "display_name": display_name, "cleanup": None if cleanup is None else str(cleanup)}
    try:
        job = await _jobs(request).submit(AVATAR_JOB, avatar_id=avatar_id, params=params, exclusive=True)
    except JobConflict as error:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"avatar {avatar_id!r} is already being prepared (job {error.job_id})"
        ) from None
    except QueueFull as error:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, str(error), headers={"Retry-After": _RETRY_AFTER_S}
        ) from None
    response.headers["Location"] = str(request.app.url_path_for("get_job", job_id=job.id))
    return AvatarJobAccepted(job=JobOut.of(job), avatar_id=avatar_id)


def _check_media(media: MediaType | None, declared: str | None, name: str) -> None:
    """415 unless the content is a supported video or photo and the declared type does not contradict it."""
    if media is None:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"{name} is not a supported video (mp4, mov, webm, mkv, avi) or photo (jpeg, png, webp, bmp)",
        )
    family = (declared or "").split("/", 1)[0].strip().lower()
    if declared and declared.lower() != "application/octet-stream" and family not in ("video", "image"):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"{name} was sent as {declared}; send a video or a photo"
        )
    if family in ("video", "image") and family != media.kind:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"{name} was sent as {declared} but its content is a {media.format} {media.kind}",
        )


def _check_uploaded_media(head: bytes, declared: str | None) -> None:
    _check_media(sniff_media(head), declared, "the uploaded file")


# --- Routes ----------------------------------------------------------------------------


@router.post(
    "/v1/avatars",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AvatarJobAccepted,
    responses=error_responses(400, 409, 413, 415, 422, 503),
    openapi_extra=_UPLOAD_BODY,
    summary="Create an avatar from an uploaded video or photo",
)
async def create_avatar(request: Request, response: Response) -> AvatarJobAccepted:
    """Queue the preparation of an uploaded video or photo; poll the job in the Location header."""
    settings = _settings(request)

    async def check_field(name: str, value: str) -> None:
        # The id is checked as soon as it arrives: a client that sends it before the
        # file learns of a problem (422, 409) before sending the whole file.
        if name == "id":
            await _ensure_id_free(request, _valid_id(value))

    async with upload_folder(settings) as folder:
        upload = await receive_form(
            request,
            folder,
            max_file_bytes=settings.avatars.max_upload_bytes,
            text_fields=_TEXT_FIELDS,
            file_what="the video or photo",
            check_head=_check_uploaded_media,
            check_field=check_field,
        )
        if "id" not in upload.fields:
            raise unprocessable("the form field 'id' is missing")
        avatar_id = _valid_id(upload.fields["id"])
        display_name = _display_name(upload.fields.get("display_name"), avatar_id)
        assert upload.path is not None
        accepted = await _queue_avatar_job(request, response, avatar_id, display_name, upload.path, folder)
    logger.info("received a %d-byte upload for avatar %s (job %s)", upload.file_bytes, avatar_id, accepted.job.id)
    return accepted


@router.post(
    "/v1/avatars/from-path",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AvatarJobAccepted,
    responses=error_responses(403, 404, 409, 415, 422, 503),
    summary="Create an avatar from a file in the server's import folder",
)
async def create_avatar_from_path(body: FromPathRequest, request: Request, response: Response) -> AvatarJobAccepted:
    """Queue the preparation of a file already on the server, under ``avatars.import_root`` only."""
    settings = _settings(request)
    avatar_id = _valid_id(body.id)
    display_name = _display_name(body.display_name, avatar_id)
    root = settings.avatars.import_root
    if root is None:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "importing server-side files is disabled; set avatars.import_root (AVATALK_AVATARS__IMPORT_ROOT)",
        )
    source = await asyncio.to_thread(_resolve_import, root, body.path)
    try:
        media = await asyncio.to_thread(sniff_file, source)
    except OSError:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"the server cannot read {body.path!r}") from None
    _check_media(media, None, repr(body.path))
    return await _queue_avatar_job(request, response, avatar_id, display_name, source, None)


def _resolve_import(root: Path, given: str) -> Path:
    """``given`` inside ``root`` with every symlink and ``..`` resolved, or an HTTP error.

    Containment is checked on the resolved path before existence, so the
    answer never reveals whether a file outside the import folder exists.
    """
    try:
        base = root.resolve(strict=True)
    except OSError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the server's import folder does not exist") from None
    try:
        candidate = (base / given).resolve()
    except (OSError, ValueError):
        raise unprocessable(f"invalid path {given!r}") from None
    if not candidate.is_relative_to(base):
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{given!r} is outside the server's import folder")
    if not candidate.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {given!r} in the server's import folder")
    return candidate


@router.get("/v1/avatars", response_model=AvatarList, summary="List the prepared avatars")
async def list_avatars(request: Request) -> AvatarList:
    manifests = await asyncio.to_thread(_avatars(request).list)
    return AvatarList(avatars=[AvatarSummary.of(manifest) for manifest in manifests])


@router.get(
    "/v1/avatars/{avatar_id}", response_model=AvatarDetail, responses=error_responses(404, 422), summary="Get one avatar"
)
async def get_avatar(avatar_id: str, request: Request) -> AvatarDetail:
    avatar_id = _valid_id(avatar_id)
    try:
        manifest = await asyncio.to_thread(_avatars(request).get, avatar_id)
    except AvatarNotFound:
        active = await asyncio.to_thread(_jobs(request).store.active_for_avatar, avatar_id, AVATAR_JOB)
        if active is not None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"avatar {avatar_id!r} is still being prepared; see /v1/jobs/{active.id}",
            ) from None
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no avatar {avatar_id!r}") from None
    except ValueError:
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            f"avatar {avatar_id!r} has an unreadable manifest; delete it and create it again",
        ) from None
    summary = AvatarSummary.of(manifest)
    return AvatarDetail(
        **summary.model_dump(),
        duration_s=manifest.frame_count / manifest.fps,
        missing_faces=len(manifest.missing_faces),
        default=manifest.id == _settings(request).avatars.default_avatar,
        source=manifest.source,
    )


@router.delete(
    "/v1/avatars/{avatar_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(404, 409, 422),
    summary="Delete an avatar (cancelling its preparation if one is under way)",
)
async def delete_avatar(avatar_id: str, request: Request) -> Response:
    """Delete an avatar. A queued or running preparation of it is cancelled first (and
    whatever it produced is deleted too), so DELETE always leaves the id free. The
    configured default avatar cannot be deleted: sessions fall back on it."""
    avatar_id = _valid_id(avatar_id)
    if avatar_id == _settings(request).avatars.default_avatar:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"{avatar_id!r} is the server's default avatar (avatars.default_avatar)"
        )
    runner = _jobs(request)
    active = await asyncio.to_thread(runner.store.active_for_avatar, avatar_id, AVATAR_JOB)
    if active is not None:
        await runner.cancel(active.id)
    try:
        await asyncio.to_thread(_avatars(request).delete, avatar_id)
    except AvatarNotFound:
        if active is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no avatar {avatar_id!r}") from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)
