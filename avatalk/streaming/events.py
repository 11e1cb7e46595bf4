"""Every server -> client event of docs/protocol.md as a typed model.

Stages build these objects; a transport turns one into JSON exactly once
(``encode_event``) and metrics look at the objects themselves, so nothing ever
parses an event string back. The wire format is the protocol's: a JSON object
whose ``type`` comes first, with optional fields left out when they are unset.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

State = Literal["listening", "thinking", "speaking"]
InterruptReason = Literal["barge_in", "client_cancel", "new_input"]
TurnStatus = Literal["completed", "interrupted", "failed", "empty"]

#: Every ``error`` code the server sends; docs/protocol.md ("Errors") gives the exact condition of each.
ErrorCode = Literal[
    # A frame the server cannot act on (the frame is dropped; the session stays open).
    "frame_too_large",  # a text frame over limits.max_text_frame_bytes, or a binary one over max_audio_frame_bytes
    "invalid_json",  # a text frame that is not JSON, cannot be decoded, or is JSON but not an object
    "missing_type",  # a JSON object without a "type" field, or with one that is not a string
    "unknown_event",  # a "type" string that names no client event
    "invalid_event",  # a known event whose own fields are malformed (wrong type, missing, extra; empty text)
    "invalid_audio",  # a binary frame with an odd number of bytes
    # A well-formed event the session cannot act on now (the session stays open).
    "invalid_session_config",  # any bad value inside session.update's "session", or changing a fixed one
    "unknown_avatar",  # "avatar" names no prepared avatar (or cannot be an avatar id)
    "video_unavailable",  # video asked of a server without avatars or a renderer
    "audio_before_configuration",  # audio before the first successful session.update
    "not_configured",  # typed text before the first successful session.update
    "text_too_long",  # typed text over limits.max_text_input_chars
    "no_response",  # response.cancel with no reply in progress
    "wrong_mode",  # an event of the other session mode (typed text in a render session, a commit of reply audio in a conversation)
    # Render-only sessions (session.update "mode": "render").
    "render_buffer_full",  # reply audio beyond limits.render_buffer_s ahead of playback: that frame was not queued
    "no_utterance",  # output_audio_buffer.commit with no reply audio sent since the last commit or clear
    # A reply failed (turn_id set; the turn ends with response.done status "failed").
    "llm_error",
    "tts_error",
    "internal_error",
    # The connection (fatal, or sent just before the server closes it).
    "server_full",
    "not_ready",
    "idle_timeout",
    "session_expired",
    "server_shutdown",
]
#: Every ``warning`` code.
WarningCode = Literal["renderer_behind", "renderer_fallback", "render_buffer_high"]

#: The latency marks of a turn, in the order they happen (milliseconds after end of user speech or text receipt).
LATENCY_MARKS = ("asr_final", "llm_first_token", "first_sentence", "tts_first_audio", "first_audio", "first_frame")


class ServerEvent(BaseModel):
    """Base of every server -> client event."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SessionDescription(BaseModel):
    """What ``session.created`` / ``session.updated`` say about the session."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    input_sample_rate: int | None
    output_sample_rate: int | None
    video: bool
    avatar: str | None
    video_size: list[int] | None  # [width, height]
    persona: dict[str, Any]
    turn_detection: dict[str, Any]
    mode: Literal["conversation", "render"] = "conversation"


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionDescription


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionDescription


class StateChanged(ServerEvent):
    type: Literal["state"] = "state"
    state: State


class SpeechStarted(ServerEvent):
    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    turn_id: int


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    turn_id: int


class SpeechIgnored(ServerEvent):
    type: Literal["input_audio_buffer.speech_ignored"] = "input_audio_buffer.speech_ignored"
    speech_ms: float


class TranscriptionPartial(ServerEvent):
    type: Literal["input_audio_transcription.partial"] = "input_audio_transcription.partial"
    turn_id: int
    transcript: str


class TranscriptionCompleted(ServerEvent):
    type: Literal["input_audio_transcription.completed"] = "input_audio_transcription.completed"
    turn_id: int
    transcript: str


class ResponseCreated(ServerEvent):
    type: Literal["response.created"] = "response.created"
    turn_id: int


class ResponseTextDelta(ServerEvent):
    type: Literal["response.text.delta"] = "response.text.delta"
    turn_id: int
    delta: str


class ResponseTextDone(ServerEvent):
    type: Literal["response.text.done"] = "response.text.done"
    turn_id: int
    text: str


class Latency(ServerEvent):
    type: Literal["latency"] = "latency"
    turn_id: int
    marks_ms: dict[str, float]
    preemptive: bool | None = None  # true when the reply was prepared before the end of the turn


class ResponseInterrupted(ServerEvent):
    type: Literal["response.interrupted"] = "response.interrupted"
    turn_id: int
    reason: InterruptReason
    spoken_text: str


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    turn_id: int
    status: TurnStatus
    text: str
    latency_ms: dict[str, float] | None = None
    preemptive: bool | None = None  # true when the reply was prepared before the end of the turn


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    turn_id: int | None = None
    fatal: bool | None = None


class WarningEvent(ServerEvent):
    type: Literal["warning"] = "warning"
    code: WarningCode
    message: str
    late_frames: int | None = None
    #: renderer_fallback only: no_latents, gpu_full, model_unavailable or device_error.
    reason: str | None = None


class OutputAudioStarted(ServerEvent):
    """Render sessions: the utterance's first audio (and lip-synced frame) went out at ``start_tick``."""

    type: Literal["output_audio_buffer.started"] = "output_audio_buffer.started"
    utterance_id: int
    start_tick: int


class OutputAudioStopped(ServerEvent):
    """Render sessions: the committed utterance played ticks ``[start_tick, end_tick)`` and is over."""

    type: Literal["output_audio_buffer.stopped"] = "output_audio_buffer.stopped"
    utterance_id: int
    start_tick: int
    end_tick: int


class OutputAudioCleared(ServerEvent):
    """Render sessions: ``output_audio_buffer.clear`` dropped these utterances and ticks of queued audio."""

    type: Literal["output_audio_buffer.cleared"] = "output_audio_buffer.cleared"
    utterance_ids: list[int]
    dropped_ticks: int


AnyServerEvent = Annotated[
    SessionCreated
    | SessionUpdated
    | StateChanged
    | SpeechStarted
    | SpeechStopped
    | SpeechIgnored
    | TranscriptionPartial
    | TranscriptionCompleted
    | ResponseCreated
    | ResponseTextDelta
    | ResponseTextDone
    | Latency
    | ResponseInterrupted
    | ResponseDone
    | OutputAudioStarted
    | OutputAudioStopped
    | OutputAudioCleared
    | ErrorEvent
    | WarningEvent,
    Field(discriminator="type"),
]


#: Decodes a server event from its JSON (clients and tests).
server_event_adapter: TypeAdapter[ServerEvent] = TypeAdapter(AnyServerEvent)


def encode_event(event: ServerEvent) -> str:
    """The event as one compact JSON text frame; unset optional fields are left out."""
    fields = {name: value for name, value in event.model_dump(mode="json").items() if value is not None}
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
