"""REST API for background jobs (avatar preparations and offline renders): list, status, cancel."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field

from avatalk.jobs import Job, JobNotFound, JobState
from avatalk.server.services import services

router = APIRouter(tags=["jobs"])


class ErrorOut(BaseModel):
    detail: str = Field(description="what went wrong, for the user")


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error answers ``codes`` (every error body is ``{"detail": ...}``)."""
    return {code: {"model": ErrorOut, "description": _DESCRIPTIONS[code]} for code in codes}


_DESCRIPTIONS = {
    400: "the multipart form is malformed or cut off",
    403: "the path is outside the import folder, or importing is disabled",
    404: "not found",
    409: "the id is taken, the avatar is being prepared, or the job already ended",
    413: "the upload is larger than avatars.max_upload_bytes",
    415: "not a supported video or photo",
    422: "invalid id, display name or form",
    503: "too many jobs are queued; retry later",
}


class JobOut(BaseModel):
    """A background job as clients see it (its server-side parameters stay private)."""

    id: str
    kind: str = Field(description='"avatar" for avatar preparation, "render" for an offline render')
    state: JobState
    stage: str | None = Field(description='current step, e.g. "analysing", "writing", "finishing", "done"')
    progress: float = Field(ge=0.0, le=1.0, description="overall progress, 0..1")
    message: str | None = Field(description="outcome or reason of failure, for the user")
    avatar_id: str | None
    result: dict[str, Any] | None = Field(description="what a succeeded job produced")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        """The job's public fields, read from its attributes (``params`` is not one of them)."""
        return cls.model_validate(job, from_attributes=True)


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="newest first")


@router.get("/v1/jobs", response_model=JobList, summary="Recent jobs")
async def list_jobs(
    request: Request,
    limit: int = Query(50, ge=1, le=500, description="at most this many, newest first"),
    avatar_id: str | None = Query(None, description="only the jobs of this avatar"),
) -> JobList:
    jobs = await asyncio.to_thread(services(request).require_jobs().store.list, limit=limit, avatar_id=avatar_id)
    return JobList(jobs=[JobOut.of(job) for job in jobs])


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=error_responses(404), summary="Get a job's status")
async def get_job(job_id: str, request: Request) -> JobOut:
    try:
        return JobOut.of(await asyncio.to_thread(services(request).require_jobs().store.get, job_id))
    except JobNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, responses=error_responses(404, 409), summary="Cancel a job")
async def cancel_job(job_id: str, request: Request) -> JobOut:
    """Cancel a queued or running job and return it once it has stopped. Cancelling a
    cancelled job is harmless; a job that already succeeded or failed gives 409."""
    runner = services(request).require_jobs()
    try:
        job = await asyncio.to_thread(runner.store.get, job_id)
        if job.active:
            job = await runner.cancel(job_id)
    except JobNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    if job.state in (JobState.SUCCEEDED, JobState.FAILED):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already ended: {job.state}")
    return JobOut.of(job)
