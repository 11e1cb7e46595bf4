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

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from avatalk.media.timebase import SUPPORTED_SAMPLE_RATES

BINARY_HEADER = struct.Struct("<BxxxII")  # kind, tick index, pts in ms


class BinaryKind(IntEnum):
    AUDIO = 1  # PCM16 mono at the session's output rate, 40 ms per tick
    VIDEO = 2  # one encoded image per tick


class ProtocolError(Exception):
    """A client message we cannot act on; becomes an ``error`` event."""

    def __init__(self, code: str, message: str) -> None:
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


class SessionOptions(BaseModel):
    """What a client may set with ``session.update``; every field optional after the first."""

    model_config = ConfigDict(extra="forbid")

    input_sample_rate: int | None = None
    output_sample_rate: int | None = None
    persona: PersonaOptions | None = None
    greeting: bool | None = Field(None, description="speak the persona greeting when the session starts")
    avatar: str | None = Field(None, max_length=64)
    video: bool | None = None
    video_size: int | None = Field(None, ge=64, le=2048)


class SessionUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["session.update"]
    session: SessionOptions


class TextInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["conversation.item.create"]
    text: str = Field(min_length=1)


class ResponseCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["response.cancel"]


class AudioCommit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_audio_buffer.commit"]


ClientEvent = Annotated[SessionUpdate | TextInput | ResponseCancel | AudioCommit, Field(discriminator="type")]
_client_event = TypeAdapter(ClientEvent)
CLIENT_EVENT_TYPES = ("session.update", "conversation.item.create", "response.cancel", "input_audio_buffer.commit")


def parse_client_event(text: str) -> SessionUpdate | TextInput | ResponseCancel | AudioCommit:
    """Decode one text frame, raising ProtocolError with a precise reason."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError("invalid_json", f"text frames must be JSON objects: {error.msg} at position {error.pos}")
    except (ValueError, RecursionError) as error:  # e.g. nesting too deep, a 5000-digit number
        raise ProtocolError("invalid_json", f"the JSON cannot be decoded: {str(error)[:120]}")
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", "text frames must be JSON objects with a 'type' field")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("missing_type", "event has no string 'type' field")
    if kind not in CLIENT_EVENT_TYPES:
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}; expected one of {', '.join(CLIENT_EVENT_TYPES)}")
    try:
        return _client_event.validate_python(data)
    except ValidationError as error:
        details = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'][1:]) or 'event'}: {item['msg']}" for item in error.errors()
        )
        raise ProtocolError("invalid_event", f"invalid {kind} event: {details}")


def check_sample_rate(rate: int | None, field_name: str) -> int:
    if rate is None:
        raise ProtocolError("invalid_session_config", f"{field_name} is required (one of {SUPPORTED_SAMPLE_RATES})")
    if rate not in SUPPORTED_SAMPLE_RATES:
        raise ProtocolError(
            "unsupported_sample_rate", f"{field_name} {rate} is not supported; use one of {SUPPORTED_SAMPLE_RATES}"
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
