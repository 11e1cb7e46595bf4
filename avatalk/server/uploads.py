"""Receiving uploads: a multipart/form-data body streamed into a folder of its own.

Routes that take a file (``POST /v1/avatars``, ``POST /v1/renders/from-audio``)
parse the body here as it arrives instead of through FastAPI's ``UploadFile``,
which spools the whole body before the route runs. Streaming lets the size
limit be enforced while receiving (a client cannot make the server buffer
more than the limit: 413 at once), lets the route check the text fields and
the file's first bytes before the rest is sent, and keeps disk writes off
the event loop (worker threads).

Each upload gets a fresh folder under ``<data_dir>/uploads`` (``upload_folder``);
a job that takes the upload over names the folder in its ``cleanup`` param,
and the job runner removes it when the job has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO

from fastapi import HTTPException, Request, status
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from avatalk.config import Settings
from avatalk.jobs import JobState, JobStore
from avatalk.media.sniff import SNIFF_BYTES

logger = logging.getLogger(__name__)

#: The form field that carries the file.
FILE_FIELD = "file"
#: Room for the multipart framing and the text fields on top of the file's own limit.
_FORM_OVERHEAD_BYTES = 64 * 1024
_MAX_FIELD_BYTES = 4 * 1024

#: ``check_head(first_bytes, declared_content_type)``: called once with the file's first
#: ``SNIFF_BYTES`` (or all of a shorter file); raises ``HTTPException`` to refuse the upload.
HeadCheck = Callable[[bytes, str | None], None]
#: ``check_field(name, value)``: awaited as soon as a text field has arrived, before the rest
#: of the body is read; raises ``HTTPException`` to refuse the upload.
FieldCheck = Callable[[str, str], Awaitable[None]]


def uploads_dir(settings: Settings) -> Path:
    """Where uploads are received, one folder per upload, until their job has ended.

    Absolute, because the path is stored in the job and must mean the same
    after a restart from another working directory.
    """
    return (settings.data_dir / "uploads").absolute()


@contextlib.asynccontextmanager
async def upload_folder(settings: Settings) -> AsyncIterator[Path]:
    """A fresh folder path for one upload (created by the first write), removed if the block fails.

    On success the folder is left to whoever took it over (a job's ``cleanup``).
    """
    folder = uploads_dir(settings) / uuid.uuid4().hex
    try:
        yield folder
    except (Exception, asyncio.CancelledError) as error:
        await asyncio.to_thread(shutil.rmtree, folder, True)
        if isinstance(error, ClientDisconnect):
            logger.info("client went away during an upload")
        raise


#: With a shared store, uploads younger than this may be transfers in progress on another node.
SHARED_UPLOAD_GRACE_S = 3600.0


def remove_orphan_uploads(settings: Settings, store: JobStore) -> None:
    """Delete uploads left by a previous process: cut-off transfers and inputs of jobs that ended. Blocking.

    With a store several nodes share (one data folder for all), the other
    nodes are alive: their running jobs' inputs and their uploads still
    arriving (younger than ``SHARED_UPLOAD_GRACE_S``) are kept.
    """
    folder = uploads_dir(settings)
    if not folder.is_dir():
        return
    states = [JobState.QUEUED, JobState.RUNNING] if store.shared else [JobState.QUEUED]
    needed = {
        Path(job.params["cleanup"]) for job in store.list(limit=None, states=states) if job.params.get("cleanup")
    }
    now = time.time()
    for entry in folder.iterdir():
        if store.shared:
            try:
                if now - entry.stat().st_mtime < SHARED_UPLOAD_GRACE_S:
                    continue
            except FileNotFoundError:
                continue
        if entry not in needed:
            logger.info("removing leftover upload %s", entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def too_large(limit: int) -> HTTPException:
    """The 413 of every upload route."""
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"the upload is larger than the limit of {limit / 1_048_576:.1f} MiB ({limit} bytes, avatars.max_upload_bytes)",
    )


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail)


def safe_filename(name: str | None) -> str:
    """The client's file name reduced to a harmless base name."""
    base = re.split(r"[\\/]", name or "")[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._")[-100:]
    return cleaned or "upload"


def _field_list(text_fields: Sequence[str]) -> str:
    """``id, display_name and file``: the fields a form takes, for error messages."""
    return ", ".join(text_fields) + f" and {FILE_FIELD}"


class FormUpload:
    """A multipart/form-data body being received: small text fields in memory, the file on disk.

    python-multipart's callbacks are synchronous and run inside
    ``parser.write``; file data is only collected there and written out by
    ``flush`` in a worker thread, so the event loop never blocks on disk I/O.
    Callbacks raise ``HTTPException`` to refuse the upload mid-stream.
    """

    def __init__(
        self, folder: Path, max_file_bytes: int, text_fields: Sequence[str], check_head: HeadCheck | None
    ) -> None:
        self.folder = folder
        self.max_file_bytes = max_file_bytes
        self.text_fields = tuple(text_fields)
        self.fields: dict[str, str] = {}
        self.path: Path | None = None
        self.file_bytes = 0
        self.complete = False  # the closing boundary arrived
        self._check_head = check_head
        self._head_checked = check_head is None
        self._declared: str | None = None
        self._head = b""
        self._pending: list[bytes] = []
        self._handle: IO[bytes] | None = None
        self._part: str | None = None  # name of the part being received
        self._value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""

    def parser(self, boundary: bytes) -> MultipartParser:
        return MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD:
            if self.path is not None:
                raise unprocessable(f"send exactly one file in the form field {FILE_FIELD!r}")
            filename = options.get(b"filename")
            self.path = self.folder / safe_filename(None if filename is None else filename.decode("utf-8", "replace"))
            declared = self._headers.get(b"content-type")
            self._declared = None if declared is None else declared.decode("latin-1").split(";")[0].strip()
        elif name in self.text_fields:
            if name in self.fields:
                raise unprocessable(f"the form field {name!r} was sent twice")
            self._value = bytearray()
        else:
            raise unprocessable(f"unexpected form field {name!r}; send {_field_list(self.text_fields)}")
        self._part = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._part == FILE_FIELD:
            self.file_bytes += len(chunk)
            if self.file_bytes > self.max_file_bytes:
                raise too_large(self.max_file_bytes)
            if not self._head_checked:
                self._head += chunk[:SNIFF_BYTES]
                if len(self._head) >= SNIFF_BYTES:
                    self._inspect_head()
            self._pending.append(chunk)
        else:
            self._value += chunk
            if len(self._value) > _MAX_FIELD_BYTES:
                raise unprocessable(f"the form field {self._part!r} is too long")

    def _on_part_end(self) -> None:
        if self._part == FILE_FIELD:
            if self.file_bytes == 0:
                raise unprocessable("the uploaded file is empty")
            if not self._head_checked:  # a file shorter than SNIFF_BYTES
                self._inspect_head()
        elif self._part is not None:
            try:
                self.fields[self._part] = self._value.decode("utf-8")
            except UnicodeDecodeError:
                raise unprocessable(f"the form field {self._part!r} is not UTF-8 text") from None
        self._part = None

    def _on_end(self) -> None:
        self.complete = True

    def _inspect_head(self) -> None:
        self._head_checked = True
        if self._check_head is not None:
            self._check_head(self._head[:SNIFF_BYTES], self._declared)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        """Write the file data received so far (blocking: run it in a thread)."""
        if not self._pending:
            return
        if self._handle is None:
            assert self.path is not None  # data only arrives for a named file part
            self.folder.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("xb")
        self._handle.writelines(self._pending)
        self._pending.clear()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def receive_form(
    request: Request,
    folder: Path,
    *,
    max_file_bytes: int,
    text_fields: Sequence[str],
    file_what: str,
    check_head: HeadCheck | None = None,
    check_field: FieldCheck | None = None,
) -> FormUpload:
    """Stream the request's multipart body (``text_fields`` and one ``file``) into ``folder``.

    Raises ``HTTPException`` on a bad request: 415 when the body is not a
    form, 413 past ``max_file_bytes`` (checked on Content-Length first, then
    while receiving), 400 for a malformed or cut-off form, 422 for unknown,
    repeated or oversized fields, an empty file or none (``file_what`` says
    what it should have been), and whatever ``check_head`` and
    ``check_field`` raise. The text fields are only parsed: required fields
    and their values are for the caller to check.
    """
    content_type, options = parse_options_header(request.headers.get("content-type"))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send multipart/form-data with the fields {_field_list(text_fields)}",
        )
    body_limit = max_file_bytes + _FORM_OVERHEAD_BYTES
    declared_length = request.headers.get("content-length", "")
    if declared_length.isdigit() and int(declared_length) > body_limit:
        raise too_large(max_file_bytes)
    upload = FormUpload(folder, max_file_bytes, text_fields, check_head)
    parser = upload.parser(boundary)
    received = 0
    checked = 0  # how many text fields have been handed to check_field
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise too_large(max_file_bytes)
            parser.write(chunk)
            if upload.has_pending:
                await asyncio.to_thread(upload.flush)
            if check_field is not None:
                for name, value in list(upload.fields.items())[checked:]:
                    checked += 1
                    await check_field(name, value)
        parser.finalize()
    except FormParserError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the multipart form is malformed") from None
    finally:
        await asyncio.to_thread(upload.close)
    if not upload.complete:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the upload ended before the form was complete")
    if upload.path is None:
        raise unprocessable(f"the form field {FILE_FIELD!r} with {file_what} is missing")
    return upload
