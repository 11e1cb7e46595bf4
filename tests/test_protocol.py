import pytest

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


def test_parses_session_update():
    event = parse_client_event('{"type":"session.update","session":{"input_sample_rate":16000}}')
    assert isinstance(event, SessionUpdate) and event.session.input_sample_rate == 16000


def test_parses_text_input():
    event = parse_client_event('{"type":"conversation.item.create","text":"hi"}')
    assert isinstance(event, TextInput) and event.text == "hi"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("[1,2]", "invalid_json"),
        ('{"no":"type"}', "missing_type"),
        ('{"type":"launch.rockets"}', "unknown_event"),
        ('{"type":"session.update","session":{"bogus":1}}', "invalid_event"),
        ('{"type":"conversation.item.create","text":""}', "invalid_event"),
        ('{"type":"session.update","session":{"input_sample_rate":"fast"}}', "invalid_event"),
        ("[" * 100000 + "]" * 100000, "invalid_json"),
        ('{"type":"session.update","session":{"input_sample_rate":' + "7" * 5000 + "}}", "invalid_json"),
    ],
)
def test_bad_frames_have_precise_codes(frame, code):
    with pytest.raises(ProtocolError) as info:
        parse_client_event(frame)
    assert info.value.code == code and info.value.message


def test_sample_rate_checks():
    assert check_sample_rate(48000, "x") == 48000
    with pytest.raises(ProtocolError, match="required"):
        check_sample_rate(None, "input_sample_rate")
    with pytest.raises(ProtocolError) as info:
        check_sample_rate(12345, "input_sample_rate")
    assert info.value.code == "unsupported_sample_rate"


def test_binary_roundtrip():
    frame = encode_binary(BinaryKind.AUDIO, 42, b"\x01\x02")
    assert decode_binary(frame) == (BinaryKind.AUDIO, 42, 42 * 40, b"\x01\x02")
    with pytest.raises(ValueError):
        decode_binary(b"\x01")
