"""Property-based fuzzing of the WebSocket protocol (docs/protocol.md) against one live server.

Each example opens a conversation, optionally configures it, and sends a
few generated frames: malformed JSON, JSON that is not an object, events
without or with unknown types, known events with wrong fields, semantic
mistakes (unsupported rates, unknown avatars, text before configuration),
huge strings around the size limits, arbitrary unicode, and binary frames of
odd and even lengths before and after configuration. The properties:

- every bad frame is answered by exactly one ``error`` event with the code
  docs/protocol.md gives for it (a well-formed frame by none), and every
  ``error`` event has a non-empty ``code`` and ``message``;
- the connection stays open, except that a message over the 4 MiB hard cap
  is closed with 1009 (and invalid UTF-8 in a text frame with 1007);
- the server never crashes: nothing is logged at ERROR, and at the end a
  fresh session still configures and answers a typed message.

Answers are matched to frames with a sentinel: after each frame the test
sends an event of a unique unknown type, whose ``unknown_event`` error names
it. The server handles a connection's frames in order, so every error it
sends for frame i arrives before the sentinel's. Errors with a ``turn_id``
come from a reply in progress (noise can sound like speech), not from the
frame, and only their shape is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avatalk.client import AvatalkClient, Event
from avatalk.config import Settings
from avatalk.media.timebase import SUPPORTED_SAMPLE_RATES
from avatalk.streaming.protocol import CLIENT_EVENT_TYPES

pytestmark = pytest.mark.slow

LIMITS = Settings().limits
TEXT_LIMIT = LIMITS.max_text_frame_bytes
AUDIO_LIMIT = LIMITS.max_audio_frame_bytes
HARD_CAP = LIMITS.max_ws_message_bytes
MAX_TEXT_CHARS = LIMITS.max_text_input_chars
DEFAULT_OUTPUT_RATE = 24000
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INVALID_PAYLOAD = 1007
#: Fields each known event accepts (extra ones are refused, docs/protocol.md "Client -> server").
EVENT_FIELDS = {
    "session.update": {"session"},
    "conversation.item.create": {"text"},
    "response.cancel": set(),
    "input_audio_buffer.commit": set(),
    "output_audio_buffer.commit": set(),
    "output_audio_buffer.clear": set(),
}
SESSION_FIELDS = (
    "mode", "input_sample_rate", "output_sample_rate", "greeting", "persona", "video", "avatar", "video_size"
)
#: What a well-formed event of each type may still be refused with, depending on the session's state.
SEMANTIC_CODES = {
    "session.update": {"invalid_session_config", "unknown_avatar", "video_unavailable"},
    "conversation.item.create": {"not_configured", "text_too_long"},
    "response.cancel": {"no_response"},
    "input_audio_buffer.commit": set(),
    # Render-session events; every session here is a conversation (or not configured yet).
    "output_audio_buffer.commit": {"wrong_mode"},
    "output_audio_buffer.clear": {"wrong_mode"},
}


@dataclass
class SessionState:
    """What the test knows about the conversation: its sample rates once configured."""

    rates: tuple[int, int] | None = None


@dataclass(frozen=True)
class Expect:
    """The server's answer to one frame: error codes allowed, whether one is required, or a close."""

    codes: frozenset[str] = frozenset()
    optional: bool = False
    close: int | None = None

    @staticmethod
    def error(*codes: str) -> Expect:
        return Expect(frozenset(codes))

    @staticmethod
    def maybe(codes: set[str]) -> Expect:
        return Expect(frozenset(codes), optional=True)


NO_ERROR = Expect()


@dataclass(frozen=True)
class Frame:
    """One generated frame and the rule that predicts the answer to it."""

    data: str | bytes
    kind: str
    predict: Callable[[SessionState], Expect] = field(repr=False)

    def __repr__(self) -> str:
        shown = self.data[:80]
        return f"Frame({self.kind}, {len(self.data)} {'bytes' if isinstance(self.data, bytes) else 'chars'}, {shown!r})"

    def expect(self, state: SessionState) -> Expect:
        size = len(self.data) if isinstance(self.data, bytes) else len(self.data.encode())
        if size > HARD_CAP:
            return Expect(close=CLOSE_MESSAGE_TOO_BIG)
        if size > (AUDIO_LIMIT if isinstance(self.data, bytes) else TEXT_LIMIT):
            return Expect.error("frame_too_large")
        return self.predict(state)


def always(expect: Expect) -> Callable[[SessionState], Expect]:
    return lambda state: expect


# --- Strategies -------------------------------------------------------------------------

unicode_text = st.text(max_size=60)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | unicode_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(unicode_text, children, max_size=4),
    max_leaves=10,
)
#: Values that no int, bool or str field accepts, even in pydantic's lax mode.
not_int = (
    st.lists(json_scalars, max_size=3)
    | st.dictionaries(unicode_text, json_scalars, max_size=2)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
    | st.text(alphabet="abcxyz-_ ", min_size=1, max_size=10)
)
not_bool = st.lists(json_scalars, min_size=1, max_size=3) | st.dictionaries(unicode_text, json_scalars, max_size=2)
not_str = st.integers() | st.floats(allow_nan=False) | st.booleans() | st.none() | not_bool
avatar_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=4, max_size=20).map(
    lambda s: f"fuzz{s}"
)


def dumps(value: object, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def not_a_json_object(draw: st.DrawFn) -> Frame:
    """Text that is not JSON at all, or JSON that is not an object."""
    if draw(st.booleans()):
        text = draw(st.text(max_size=200) | st.sampled_from(["{", "[1,", '{"type":', "nul", "'single'", "{}}"]))
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(text), dict):
                text = "[" + text
    else:
        text = dumps(draw(st.lists(json_values, max_size=4) | json_scalars), draw(st.booleans()))
    return Frame(text, "not_object", always(Expect.error("invalid_json")))


@st.composite
def huge_numbers_and_nesting(draw: st.DrawFn) -> Frame:
    """Integers past Python's 4300-digit parsing limit, and arrays nested far past its recursion limit.

    (The depth at which ``json`` gives up follows ``sys.getrecursionlimit()``, which test tools raise;
    20000 levels are past any limit in use, and still fit in a 64 KiB frame.)
    """
    if draw(st.booleans()):
        digits = "7" * draw(st.integers(min_value=4301, max_value=20000))
        text = draw(
            st.sampled_from([digits, f'{{"type": "session.update", "session": {{"input_sample_rate": {digits}}}}}'])
        )
    else:
        depth = draw(st.integers(min_value=20000, max_value=(TEXT_LIMIT - 12) // 2))
        text = '{"type": ' + "[" * depth + "]" * depth + "}"
    return Frame(text, "huge_json", always(Expect.error("invalid_json")))


@st.composite
def missing_type(draw: st.DrawFn) -> Frame:
    event = draw(st.dictionaries(unicode_text.filter(lambda key: key != "type"), json_values, max_size=4))
    if draw(st.booleans()):
        event["type"] = draw(json_values.filter(lambda value: not isinstance(value, str)))
    return Frame(dumps(event, draw(st.booleans())), "missing_type", always(Expect.error("missing_type")))


@st.composite
def unknown_type(draw: st.DrawFn) -> Frame:
    event = draw(st.dictionaries(unicode_text, json_values, max_size=3))
    event["type"] = draw(st.text(max_size=80).filter(lambda kind: kind not in CLIENT_EVENT_TYPES))
    return Frame(dumps(event, draw(st.booleans())), "unknown_type", always(Expect.error("unknown_event")))


@st.composite
def wrong_fields(draw: st.DrawFn) -> Frame:
    """A known event type whose fields cannot be valid: wrong types, out of range, missing or extra.

    A mistake in the event's own fields is ``invalid_event``; one inside a ``session.update``'s
    ``session`` (an unknown setting, a value of the wrong type or out of range) is
    ``invalid_session_config``, whatever the session's state.
    """
    kind = draw(st.sampled_from(CLIENT_EVENT_TYPES))
    event: dict[str, object] = {"type": kind}
    code = "invalid_event"
    extra_key = unicode_text.filter(lambda key: key not in EVENT_FIELDS[kind] and key != "type")
    if kind == "conversation.item.create":
        mistake = draw(st.sampled_from(["wrong_type", "missing", "empty", "extra"]))
        if mistake == "wrong_type":
            event["text"] = draw(not_str)
        elif mistake == "empty":
            event["text"] = ""
        elif mistake == "extra":
            event["text"] = "hello"
            event[draw(extra_key)] = draw(json_values)
    elif kind == "session.update":
        session: dict[str, object] = {"input_sample_rate": 16000, "greeting": False}
        mistake = draw(st.sampled_from(["not_object", "extra", "rate", "size", "greeting", "persona", "missing"]))
        if mistake == "not_object":
            event["session"] = draw(json_scalars | st.lists(json_scalars, max_size=3))
        elif mistake != "missing":
            code = "invalid_session_config"
            if mistake == "extra":
                session[draw(unicode_text.filter(lambda key: key not in SESSION_FIELDS))] = draw(json_values)
            elif mistake == "rate":
                session[draw(st.sampled_from(["input_sample_rate", "output_sample_rate"]))] = draw(not_int)
            elif mistake == "size":
                session["video_size"] = draw(
                    st.integers(max_value=63)
                    | st.integers(min_value=2049)
                    | st.integers(min_value=32, max_value=1024).map(lambda half: 2 * half + 1)
                    | not_int
                )
            elif mistake == "greeting":
                session["greeting"] = draw(not_bool)
            else:
                persona_key = unicode_text.filter(
                    lambda key: key not in ("name", "system_prompt", "greeting", "fallback", "voice", "language")
                )
                session["persona"] = {draw(persona_key): draw(json_values)}
            event["session"] = session
    else:
        event[draw(extra_key)] = draw(json_values)
    return Frame(dumps(event, draw(st.booleans())), f"wrong_fields:{kind}", always(Expect.error(code)))


@st.composite
def typed_text(draw: st.DrawFn) -> Frame:
    """Typed text that is only whitespace (malformed), or longer than the limit (a valid reply is never asked for)."""
    if draw(st.booleans()):
        text = draw(st.text(alphabet=" \t\n\r\u3000\u00a0", min_size=1, max_size=20))
        frame = dumps({"type": "conversation.item.create", "text": text}, draw(st.booleans()))
        return Frame(frame, "typed_text", always(Expect.error("invalid_event")))  # before any state check
    # Up to past the 64 KiB frame limit: the huge-string case.
    length = draw(st.integers(min_value=MAX_TEXT_CHARS + 1, max_value=TEXT_LIMIT + 2000))
    text = draw(st.sampled_from(["a", "é", "語", "🙂"])) * length
    frame = dumps({"type": "conversation.item.create", "text": text}, draw(st.booleans()))

    def predict(state: SessionState) -> Expect:
        return Expect.error("text_too_long" if state.rates else "not_configured")

    return Frame(frame, "typed_text", predict)


@st.composite
def session_update(draw: st.DrawFn) -> Frame:
    """Well-formed ``session.update``: good or unsupported rates, no rate, an unknown avatar."""
    choice = draw(st.sampled_from(["rates", "no_rate", "unknown_avatar"]))
    session: dict[str, object] = {"greeting": False}
    rates = None
    if choice == "rates":
        input_rate = draw(st.sampled_from(SUPPORTED_SAMPLE_RATES) | st.integers(min_value=-(2**40), max_value=2**40))
        session["input_sample_rate"] = input_rate
        output_rate = draw(
            st.none() | st.sampled_from(SUPPORTED_SAMPLE_RATES) | st.integers(min_value=1, max_value=10**6)
        )
        if output_rate is not None:
            session["output_sample_rate"] = output_rate
        rates = (input_rate, DEFAULT_OUTPUT_RATE if output_rate is None else output_rate)
    elif choice == "no_rate":
        session["persona"] = {"name": draw(st.text(max_size=30))}
    else:
        session["input_sample_rate"] = 16000
        session["avatar"] = draw(avatar_ids)

    def predict(state: SessionState) -> Expect:
        if state.rates is None:
            if choice == "no_rate":
                return Expect.error("invalid_session_config")
            if choice == "unknown_avatar":
                return Expect.error("unknown_avatar")
            assert rates is not None
            if any(rate not in SUPPORTED_SAMPLE_RATES for rate in rates):
                return Expect.error("invalid_session_config")
            return NO_ERROR
        if choice == "unknown_avatar":
            return Expect.error("invalid_session_config")  # the avatar is fixed by the first update
        if rates is not None and (
            rates[0] != state.rates[0] or ("output_sample_rate" in session and rates[1] != state.rates[1])
        ):
            return Expect.error("invalid_session_config")
        return NO_ERROR

    return Frame(
        dumps({"type": "session.update", "session": session}, draw(st.booleans())), f"session:{choice}", predict
    )


@st.composite
def control_event(draw: st.DrawFn) -> Frame:
    """``response.cancel`` (nothing to cancel, unless noise started a reply), ``input_audio_buffer.commit``,
    and the render-session events, which a conversation refuses."""
    kind = draw(
        st.sampled_from(
            ["response.cancel", "input_audio_buffer.commit", "output_audio_buffer.commit", "output_audio_buffer.clear"]
        )
    )
    frame = dumps({"type": kind}, True)
    if kind == "input_audio_buffer.commit":
        return Frame(frame, kind, always(NO_ERROR))
    if kind.startswith("output_audio_buffer."):
        return Frame(frame, kind, always(Expect.error("wrong_mode")))
    return Frame(
        frame, kind, lambda state: Expect.maybe({"no_response"}) if state.rates else Expect.error("no_response")
    )


@st.composite
def arbitrary_object(draw: st.DrawFn) -> Frame:
    """Any JSON object, its type known, unknown or absent, with real and random field names."""
    field_names = st.sampled_from(["session", "text", "type", *SESSION_FIELDS]) | unicode_text
    event = draw(st.dictionaries(field_names, json_values, max_size=4))
    if draw(st.booleans()):
        event["type"] = draw(st.sampled_from(CLIENT_EVENT_TYPES))
    kind = event.get("type")
    if not isinstance(kind, str):
        expect = Expect.error("missing_type")
    elif kind not in CLIENT_EVENT_TYPES:
        expect = Expect.error("unknown_event")
    elif set(event) - {"type"} - EVENT_FIELDS[kind] or (
        kind == "session.update" and not isinstance(event.get("session"), dict)
    ):
        expect = Expect.error("invalid_event")
    else:
        expect = Expect.maybe({"invalid_event", *SEMANTIC_CODES[kind]})
    return Frame(dumps(event, draw(st.booleans())), "arbitrary", always(expect))


@st.composite
def audio_frame(draw: st.DrawFn) -> Frame:
    """Binary frames: small random bytes (odd or even), and lengths at the audio frame limit."""
    if draw(st.integers(min_value=0, max_value=4)):
        data = draw(st.binary(max_size=3000))
    else:
        length = draw(
            st.sampled_from([AUDIO_LIMIT - 1, AUDIO_LIMIT, AUDIO_LIMIT + 1]) | st.integers(AUDIO_LIMIT, 4 * AUDIO_LIMIT)
        )
        data = random.Random(draw(st.integers(0, 2**32))).randbytes(length)

    def predict(state: SessionState) -> Expect:
        if state.rates is None:
            return Expect.error("audio_before_configuration")
        return Expect.error("invalid_audio") if len(data) % 2 else NO_ERROR

    return Frame(data, "audio", predict)


@st.composite
def over_the_hard_cap(draw: st.DrawFn) -> Frame:
    """A message over 4 MiB, binary or text: the socket is closed with 1009 (sent last)."""
    length = HARD_CAP + draw(st.integers(min_value=1, max_value=64 * 1024))
    if draw(st.booleans()):
        return Frame(random.Random(length).randbytes(length), "over_cap", always(NO_ERROR))
    return Frame(dumps({"type": "conversation.item.create", "text": "x" * length}, True), "over_cap", always(NO_ERROR))


frames = st.one_of(
    not_a_json_object(),
    huge_numbers_and_nesting(),
    missing_type(),
    unknown_type(),
    wrong_fields(),
    typed_text(),
    session_update(),
    control_event(),
    arbitrary_object(),
    audio_frame(),
)
scenarios = st.tuples(
    st.none() | st.sampled_from(SUPPORTED_SAMPLE_RATES),  # configure first at this input rate, or not
    st.lists(frames, min_size=1, max_size=6),
    st.none() | over_the_hard_cap(),
)


# --- The server and the checks ------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps every record at ERROR or above that the server (or anything else) logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(live_server_factory: Callable[..., Any]) -> Any:
    return live_server_factory()


@pytest.fixture(scope="module")
def error_log() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    # uvicorn's own loggers do not propagate to the root logger.
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def check_error_shape(event: Event) -> None:
    assert isinstance(event.get("code"), str) and event["code"], event
    assert isinstance(event.get("message"), str) and event["message"], event


async def answer_to(client: AvatalkClient, frame: Frame, index: int) -> list[Event]:
    """Send ``frame`` then a sentinel; the events that arrived in between."""
    mark = len(client.events)
    await client.send_raw(frame.data)
    sentinel = f"fuzz.sentinel.{index}"
    await client.send_event(sentinel)
    marker = await client.wait_for(
        lambda e: e["type"] == "error" and e.get("code") == "unknown_event" and repr(sentinel) in e["message"],
        since=mark,
        timeout=30,
    )
    return client.events[mark : client.events.index(marker)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios)
async def test_every_bad_frame_gets_an_error_and_the_connection_survives(
    server: Any, error_log: ErrorLog, scenario: tuple[int | None, list[Frame], Frame | None]
) -> None:
    input_rate, sent, last = scenario
    state = SessionState()
    async with AvatalkClient(server.ws_url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created", timeout=30)
        if input_rate is not None:
            configured = await client.configure(input_rate, DEFAULT_OUTPUT_RATE, greeting=False)
            assert configured["type"] == "session.updated", configured
            state.rates = (input_rate, DEFAULT_OUTPUT_RATE)
        for index, frame in enumerate(sent):
            expect = frame.expect(state)
            answer = await answer_to(client, frame, index)
            errors = [e for e in answer if e["type"] == "error" and "turn_id" not in e]
            codes = [e["code"] for e in errors]
            if expect.optional:
                assert len(errors) <= 1 and set(codes) <= expect.codes, (frame, codes)
            elif expect.codes:
                assert len(errors) == 1 and codes[0] in expect.codes, (frame, expect.codes, errors)
            else:
                assert errors == [], (frame, errors)
            updated = [e["session"] for e in answer if e["type"] == "session.updated"]
            if updated and state.rates is None:
                state.rates = (updated[0]["input_sample_rate"], updated[0]["output_sample_rate"])
        if last is not None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await client.send_raw(last.data)
            await asyncio.wait_for(client.closed.wait(), 30)
            assert client.close_code == last.expect(state).close == CLOSE_MESSAGE_TOO_BIG
        else:
            assert not client.closed.is_set(), f"the server closed the connection (code {client.close_code})"
        for event in client.events:
            if event["type"] == "error":
                check_error_shape(event)


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(server: Any) -> None:
    async with websockets.connect(server.ws_url) as ws:
        await ws.recv()  # session.created
        await ws.send(b'{"type": "\xff\xfe"}', text=True)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_INVALID_PAYLOAD


async def test_the_server_still_answers_after_the_fuzzing(server: Any, error_log: ErrorLog) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
    async with AvatalkClient(server.ws_url) as client:
        await client.wait_for(lambda e: e["type"] == "session.created")
        configured = await client.configure(16000, DEFAULT_OUTPUT_RATE, greeting=False)
        assert configured["type"] == "session.updated", configured
        await client.send_event("conversation.item.create", text="Say hello.")
        reply = await client.wait_for(lambda e: e["type"] in ("response.text.done", "error"), timeout=90)
        assert reply["type"] == "response.text.done" and reply["text"].strip(), reply
        await client.wait_for(lambda e: e["type"] == "latency", timeout=60)  # sent with the first reply audio
    # Client mistakes (invalid UTF-8 included) are warnings: anything at ERROR is a crash.
    assert error_log.records == [], [f"{r.name}: {r.getMessage()}" for r in error_log.records]
