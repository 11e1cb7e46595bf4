"""The client-event codec: every mistake gets the one code docs/protocol.md ("Errors") gives it."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from avatalk.streaming.events import ErrorCode, ErrorEvent, WarningCode
from avatalk.streaming.protocol import (
    BinaryKind,
    ProtocolError,
    SessionUpdate,
    TextInput,
    check_sample_rate,
    decode_binary,
    encode_binary,
    parse_client_event,
)

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_parses_session_update() -> None:
    event = parse_client_event('{"type":"session.update","session":{"input_sample_rate":16000}}')
    assert isinstance(event, SessionUpdate) and event.session.input_sample_rate == 16000


def test_parses_text_input() -> None:
    event = parse_client_event('{"type":"conversation.item.create","text":"hi"}')
    assert isinstance(event, TextInput) and event.text == "hi"


def update(session: str) -> str:
    return '{"type":"session.update","session":' + session + "}"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # Not JSON, undecodable JSON, JSON that is not an object.
        ("not json", "invalid_json"),
        ("[" * 100000 + "]" * 100000, "invalid_json"),
        (update('{"input_sample_rate":' + "7" * 5000 + "}"), "invalid_json"),
        ("[1,2]", "invalid_json"),
        ('"session.update"', "invalid_json"),
        ("42", "invalid_json"),
        ("null", "invalid_json"),
        # No type, or one that is not a string.
        ('{"no":"type"}', "missing_type"),
        ('{"type":123}', "missing_type"),
        ('{"type":null}', "missing_type"),
        ('{"type":["session.update"]}', "missing_type"),
        ('{"type":"launch.rockets"}', "unknown_event"),
        # The event's own fields.
        ('{"type":"session.update"}', "invalid_event"),
        ('{"type":"session.update","session":7}', "invalid_event"),
        ('{"type":"session.update","session":{},"extra":1}', "invalid_event"),
        ('{"type":"conversation.item.create","text":""}', "invalid_event"),
        ('{"type":"conversation.item.create","text":" \\n\\t "}', "invalid_event"),
        ('{"type":"conversation.item.create","text":5}', "invalid_event"),
        ('{"type":"conversation.item.create"}', "invalid_event"),
        ('{"type":"response.cancel","now":true}', "invalid_event"),
        # Both kinds of mistake: the event's shape is checked first.
        ('{"type":"session.update","session":{"video_size":"big"},"extra":1}', "invalid_event"),
        # Any bad value inside "session": one code.
        (update('{"bogus":1}'), "invalid_session_config"),
        (update('{"input_sample_rate":"fast"}'), "invalid_session_config"),
        (update('{"output_sample_rate":[16000]}'), "invalid_session_config"),
        (update('{"video_size":101}'), "invalid_session_config"),
        (update('{"video_size":-512}'), "invalid_session_config"),
        (update('{"video_size":100000}'), "invalid_session_config"),
        (update('{"video_size":"big"}'), "invalid_session_config"),
        (update('{"persona":7}'), "invalid_session_config"),
        (update('{"persona":{"mood":"grumpy"}}'), "invalid_session_config"),
        (update('{"persona":{"name":"' + "x" * 101 + '"}}'), "invalid_session_config"),
        (update('{"greeting":[true]}'), "invalid_session_config"),
        (update('{"avatar":42}'), "invalid_session_config"),
    ],
)
def test_bad_frames_have_precise_codes(frame: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_event(frame)
    assert info.value.code == code and info.value.message


def test_an_avatar_id_is_not_judged_by_the_codec() -> None:
    """Any string is left to the avatar store, which answers unknown_avatar (tests/test_server.py)."""
    event = parse_client_event(update('{"input_sample_rate":16000,"avatar":"../' + "x" * 100 + '"}'))
    assert isinstance(event, SessionUpdate) and event.session.avatar is not None


def test_sample_rate_checks() -> None:
    assert check_sample_rate(48000, "x") == 48000
    with pytest.raises(ProtocolError, match="required") as missing:
        check_sample_rate(None, "input_sample_rate")
    with pytest.raises(ProtocolError, match="not supported") as unsupported:
        check_sample_rate(12345, "input_sample_rate")
    assert missing.value.code == unsupported.value.code == "invalid_session_config"


def test_binary_roundtrip() -> None:
    frame = encode_binary(BinaryKind.AUDIO, 42, b"\x01\x02")
    assert decode_binary(frame) == (BinaryKind.AUDIO, 42, 42 * 40, b"\x01\x02")
    with pytest.raises(ValueError):
        decode_binary(b"\x01")


def documented_codes(heading: str) -> set[str]:
    """The codes in the first column of the table under ``heading`` in docs/protocol.md."""
    text = PROTOCOL_DOC.read_text()
    section = text[text.index(heading) :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


def test_every_error_code_is_typed_and_documented_and_nothing_else() -> None:
    typed = set(typing.get_args(ErrorCode))
    assert documented_codes("## Errors") == typed
    warning_row = next(line for line in PROTOCOL_DOC.read_text().splitlines() if line.startswith("| `warning` |"))
    for code in typing.get_args(WarningCode):
        assert f"`{code}`" in warning_row, code


def test_an_error_event_refuses_an_undocumented_code() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ErrorEvent(code="unsupported_sample_rate", message="gone")  # type: ignore[arg-type]
