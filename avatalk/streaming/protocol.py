"""The WebSocket protocol codec (documented in docs/protocol.md).

Text frames are JSON events with a ``type`` field, named after the OpenAI
Realtime API where the concept matches. Binary frames from the client are raw
PCM16 mono audio at the declared input rate; binary frames to the client carry
a 12-byte header (kind, tick index, presentation time) and a payload, so a
client can schedule audio (and later video) on one timeline.
"""

from __future__ import annotations

import json
import struct
from enum import IntEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import ErrorDetails

from avatalk.media.timebase import SUPPORTED_SAMPLE_RATES
from avatalk.streaming.events import ErrorCode

BINARY_HEADER = struct.Struct("<BxxxII")  # kind, tick index, pts in ms


class BinaryKind(IntEnum):
    AUDIO = 1  # PCM16 mono at the session's output rate, 40 ms per tick
    VIDEO = 2  # one encoded image per tick


class ProtocolError(Exception):
    """A client message we cannot act on; becomes an ``error`` event (docs/protocol.md, "Errors")."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PersonaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=100)
    system_prompt: str | None = Field(None, max_length=8000)
    greeting: str | None = Field(None, max_length=1000)
    fallback: str | None = Field(None, max_length=1000)
    voice: str | None = Field(None, max_length=100)
    language: str | None = Field(None, max_length=16)


SessionMode = Literal["conversation", "render"]


class SessionOptions(BaseModel):
    """What a client may set with ``session.update``; every field optional after the first."""

    model_config = ConfigDict(extra="forbid")

    mode: SessionMode | None = Field(
        None, description="conversation (default), or render: the client sends reply audio and gets frames back"
    )
    input_sample_rate: int | None = None
    output_sample_rate: int | None = None
    persona: PersonaOptions | None = None
    greeting: bool | None = Field(None, description="speak the persona greeting when the session starts")
    avatar: str | None = Field(None, description="a prepared avatar's id (an id that cannot exist: unknown_avatar)")
    video: bool | None = None
    video_size: int | None = Field(None, ge=64, le=2048, description="longer side of the video in pixels, even")

    @field_validator("video_size")
    @classmethod
    def _even(cls, size: int | None) -> int | None:
        if size is not None and size % 2:
            raise ValueError(f"video_size must be even, not {size}")
        return size


class SessionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["session.update"]
    session: SessionOptions


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["conversation.item.create"]
    text: str = Field(min_length=1)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("text must not be empty or only whitespace")
        return text


class ResponseCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["response.cancel"]


class AudioCommit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_audio_buffer.commit"]


class OutputAudioCommit(BaseModel):
    """Render sessions: the reply audio sent since the last commit is one complete utterance."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["output_audio_buffer.commit"]


class OutputAudioClear(BaseModel):
    """Render sessions: drop all queued reply audio now (the agent was interrupted)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["output_audio_buffer.clear"]


ClientEvent = Annotated[
    SessionUpdate | TextInput | ResponseCancel | AudioCommit | OutputAudioCommit | OutputAudioClear,
    Field(discriminator="type"),
]
_client_event = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = (
    "session.update",
    "conversation.item.create",
    "response.cancel",
    "input_audio_buffer.commit",
    "output_audio_buffer.commit",
    "output_audio_buffer.clear",
)


def parse_client_event(text: str) -> ClientEvent:
    """Decode one text frame, raising ProtocolError with a precise reason.

    The checks run in the order docs/protocol.md states: JSON (``invalid_json``),
    then the ``type`` (``missing_type``, ``unknown_event``), then the event's
    own fields (``invalid_event``), then the values inside a ``session.update``'s
    ``session`` (``invalid_session_config``). A frame with several mistakes gets
    the code of the first check it fails.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError("invalid_json", f"text frames must be JSON objects: {error.msg} at position {error.pos}")
    except (ValueError, RecursionError) as error:  # e.g. nesting too deep, a 5000-digit number
        raise ProtocolError("invalid_json", f"the JSON cannot be decoded: {str(error)[:120]}")
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", f"text frames must be JSON objects with a 'type' field, not {_json_kind(data)}")
    kind = data.get("type")
    if kind is None:
        raise ProtocolError("missing_type", "the event has no 'type' field")
    if not isinstance(kind, str):
        raise ProtocolError("missing_type", f"the event's 'type' must be a string, not {_json_kind(kind)}")
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}; expected one of {', '.join(CLIENT_EVENT_TYPES)}")
    try:
        return _client_event.validate_python(data)
    except ValidationError as error:
        errors = error.errors()
        event_errors = [item for item in errors if not _in_session(item)]
        if event_errors:
            raise ProtocolError("invalid_event", f"invalid {kind} event: {_describe(event_errors)}")
        raise ProtocolError("invalid_session_config", f"invalid session.update: {_describe(errors, skip=2)}")


def _in_session(item: ErrorDetails) -> bool:
    """An error about a value inside ``session`` (a configuration value), not about the event itself."""
    location = item["loc"]  # (event type, field, ...)
    return len(location) > 2 and location[0] == "session.update" and location[1] == "session"


def _describe(errors: list[ErrorDetails], skip: int = 1) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in item['loc'][skip:]) or 'event'}: {item['msg']}" for item in errors)


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def check_sample_rate(rate: int | None, field_name: str) -> int:
    """A rate the first ``session.update`` must give; anything else is ``invalid_session_config``."""
    if rate is None:
        raise ProtocolError("invalid_session_config", f"{field_name} is required (one of {SUPPORTED_SAMPLE_RATES})")
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise ProtocolError(
            "invalid_session_config", f"{field_name} {rate} is not supported; use one of {SUPPORTED_SAMPLE_RATES}"
        )
    return rate


def encode_binary(kind: BinaryKind, tick: int, payload: bytes) -> bytes:
    return BINARY_HEADER.pack(int(kind), tick, tick * 40) + payload


def decode_binary(frame: bytes) -> tuple[BinaryKind, int, int, bytes]:
    """Split a server binary frame into (kind, tick, pts_ms, payload)."""
    if len(frame) < BINARY_HEADER.size:
        raise ValueError("binary frame shorter than its header")
    kind, tick, pts_ms = BINARY_HEADER.unpack_from(frame)
    return BinaryKind(kind), tick, pts_ms, frame[BINARY_HEADER.size :]
