"""Envelope parsing and encoding (protocol.md §1.2-1.3)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.errors import INVALID_FORMAT, ProtocolClose
from pocketbridge.protocol import Message, encode, parse_frame


def test_text_frame_parses() -> None:
    msg = parse_frame('{"type":"event","payload":{"a":1},"extra":true}')
    assert msg == Message(type="event", payload={"a": 1}, raw={"type": "event", "payload": {"a": 1}, "extra": True})


def test_binary_frame_is_utf8_json() -> None:
    msg = parse_frame('{"type":"scratchpad_sync","payload":"héllo ✓"}'.encode())
    assert msg.type == "scratchpad_sync"
    assert msg.payload == "héllo ✓"


@pytest.mark.parametrize("data", [bytearray(b'{"type":"ping"}'), memoryview(b'{"type":"ping"}')])
def test_other_bytes_like_frames(data: bytes) -> None:
    assert parse_frame(data).type == "ping"


def test_payload_may_be_absent_or_anything() -> None:
    assert parse_frame('{"type":"ping"}').payload is None
    assert parse_frame('{"type":"x","payload":[1,2]}').payload == [1, 2]


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "",
        "[1,2,3]",
        '"type"',
        "null",
        "{}",
        '{"payload":{}}',
        '{"type":5}',
        '{"type":null}',
        '{"type":["event"]}',
        b"\xff\xfe{}",
        b'{"type":"event","payload":"\xc3"}',
        '{"type":"x","payload":NaN}',
        '{"type":"x","payload":-Infinity}',
        '{"type":"x","payload":' + "9" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
        '{"type":"x","payload":' + '{"a":' * 50_000 + "1" + "}" * 50_001,
    ],
    ids=lambda d: repr(d)[:30],
)
def test_invalid_format_closes(data: str | bytes) -> None:
    with pytest.raises(ProtocolClose) as exc:
        parse_frame(data)
    assert exc.value.close == INVALID_FORMAT
    assert exc.value.close.code == 1008
    assert exc.value.close.reason == "Invalid message format"


def test_encode_is_compact_and_keeps_unicode() -> None:
    text = encode({"type": "ack", "payload": {"device_seq": 1, "name": "Pixel ✓"}})
    assert text == '{"type":"ack","payload":{"device_seq":1,"name":"Pixel ✓"}}'
    assert parse_frame(text).raw == json.loads(text)


@given(st.one_of(st.text(), st.binary()))
def test_parse_frame_never_raises_anything_else(data: str | bytes) -> None:
    try:
        assert isinstance(parse_frame(data), Message)
    except ProtocolClose as exc:
        assert exc.close == INVALID_FORMAT


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["type", "payload", "x"]), _json))
def test_parse_frame_on_json_objects(obj: dict[str, object]) -> None:
    text = json.dumps(obj)
    try:
        msg = parse_frame(text)
    except ProtocolClose:
        assert not isinstance(obj.get("type"), str)
    else:
        assert msg.type == obj["type"]
