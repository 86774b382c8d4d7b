"""Bad input over real sockets (protocol.md §1.2–1.5, §5.1–5.4, §9): framing, sizes, event validation,
unknown messages and the per-user event rate. Each case gets exactly the spec's close, rejection ack or
error frame; the connection stays usable whenever the spec says so; the daemon keeps serving."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from pocketbridge.app import Running
from pocketbridge.client import DeviceKey, connect, new_device_id, new_event_id
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import (
    DROP,
    TIMEOUT,
    RawHandshake,
    WireSocket,
    assert_close,
    assert_no_tracebacks,
    assert_pong,
    assert_relay_works,
    dumps,
    e2e_config,
    each_case,
    established,
    event_body,
    expect_close,
    open_ws,
    recv_json,
    send,
    send_valid_event,
)

INVALID_FORMAT = (1008, "Invalid message format")
TOO_BIG = (1009, "Message too big")
TOO_MANY_EVENTS = (1013, "Too many events. Please slow down.")
MAX_MESSAGE = 2048
MAX_PAYLOAD = 1000
OTHER_KEY = DeviceKey.generate().public_hex


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


@pytest.fixture
async def server(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    config = e2e_config(config_factory, ws={"max_message_bytes": MAX_MESSAGE},
                        events={"max_payload_bytes": MAX_PAYLOAD})
    async with run_daemon(config) as (_, running):
        yield running
        await assert_relay_works(running.ws_url)


@pytest.fixture
async def session(server: Running) -> AsyncIterator[tuple[WebSocketConnection, RawHandshake]]:
    """An established raw connection of a fresh user."""
    async with established(server.ws_url) as pair:
        yield pair


# --- §1.3 envelope -----------------------------------------------------------------------------------------
NOT_AN_ENVELOPE: dict[str, str | bytes] = {
    "not-json": "hello",
    "empty": "",
    "whitespace": "   ",
    "truncated": '{"type":"ping"',
    "trailing-data": '{"type":"ping"} {}',
    "array": '[{"type":"ping"}]',
    "string": '"ping"',
    "number": "5",
    "null": "null",
    "true": "true",
    "no-type": '{"payload":{"type":"ping"}}',
    "type-number": '{"type":5}',
    "type-null": '{"type":null}',
    "type-list": '{"type":["ping"]}',
    "type-object": '{"type":{"name":"ping"}}',
    "type-bool": '{"type":true}',
    "nan": '{"type":"ping","payload":{"timestamp":NaN}}',
    "infinity": '{"type":"ping","x":-Infinity}',
    "single-quotes": "{'type':'ping'}",
    "deep-nesting": '{"type":"ping","payload":' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep-array": "[" * 200_000 + "]" * 200_000,
    "binary-not-utf8": b"\xff\xfe{}",
    "binary-overlong": b'{"type":"\xc0\xaf"}',
    "binary-surrogate": b'{"type":"ping","x":"\xed\xa0\x80"}',
    "binary-truncated-utf8": b'{"type":"ping","x":"\xc3"}',
    "binary-not-json": b"\x00\x01\x02",
}


def text_and_binary(cases: dict[str, str | bytes]) -> dict[str, str | bytes]:
    """Every text case also as a binary frame (same UTF-8 bytes); bytes cases as they are."""
    out: dict[str, str | bytes] = {}
    for name, frame in cases.items():
        out[name] = frame
        if isinstance(frame, str):
            out[name + "-as-binary"] = frame.encode("utf-8")
    return out


@pytest.fixture
async def big_server(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    """Default message size: the deep-nesting cases are 200-400 KB."""
    config = e2e_config(config_factory, ws={"max_handshake_message_bytes": 1024 * 1024})
    async with run_daemon(config) as (_, running):
        yield running
        await assert_relay_works(running.ws_url)


async def test_invalid_format_before_handshake(big_server: Running) -> None:
    async def check(_: str, frame: str | bytes) -> None:
        async with open_ws(big_server.ws_url) as ws:
            await send(ws, frame)
            await assert_close(ws, *INVALID_FORMAT)

    await each_case(text_and_binary(NOT_AN_ENVELOPE), check)


async def test_invalid_format_after_handshake(big_server: Running) -> None:
    async def check(_: str, frame: str | bytes) -> None:
        async with established(big_server.ws_url) as (ws, _hs):
            await send(ws, frame)
            await assert_close(ws, *INVALID_FORMAT)

    await each_case(text_and_binary(NOT_AN_ENVELOPE), check)


async def test_invalid_format_in_auth_step(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        await send(ws, '{"type":"client_auth",')
        await assert_close(ws, *INVALID_FORMAT)


# --- §1.2 binary frames ------------------------------------------------------------------------------------
async def test_binary_json_frames_are_accepted(session: tuple[WebSocketConnection, RawHandshake]) -> None:
    ws, hs = session
    await assert_pong(ws, binary=True)
    body = event_body(hs.key.public_hex, hs.device_id, 1)
    await send(ws, {"type": "event", "payload": body}, binary=True)
    assert await recv_json(ws) == {
        "type": "ack", "payload": {"device_seq": 1, "event_id": body["event_id"], "status": "stored"}
    }
    # non-ASCII UTF-8 inside a binary frame
    await send(ws, {"type": "ping", "payload": {"note": "h\u00e9llo \u263a \U0001f600"}}, binary=True)
    assert (await recv_json(ws))["type"] == "pong"


# --- §1.2 invalid UTF-8 in a text frame: 1007 by the WebSocket layer --------------------------------------------
TEXT_OPCODE, BINARY_OPCODE, CONTINUATION = 0x1, 0x2, 0x0
BAD_UTF8 = {
    "ff": b"\xff\xfe",
    "in-json": b'{"type":"ping","x":"\xc3\x28"}',
    "surrogate": b'{"type":"ping","x":"\xed\xa0\x80"}',
    "overlong": b'{"type":"\xc0\xaf"}',
    "truncated": b'{"type":"ping"}\xe2\x82',
}


async def test_invalid_utf8_text_frame_before_handshake(server: Running) -> None:
    async def check(_: str, data: bytes) -> None:
        async with WireSocket.open(server.ws_url) as ws:
            await ws.send_frame(TEXT_OPCODE, data)
            code, _reason = await expect_close(ws)
            assert code == 1007

    await each_case(BAD_UTF8, check)


async def test_invalid_utf8_text_frame_after_handshake(server: Running) -> None:
    async def check(_: str, data: bytes) -> None:
        async with WireSocket.open(server.ws_url) as ws:
            await RawHandshake(ws, DeviceKey.generate()).run()
            await ws.send_frame(TEXT_OPCODE, data)
            code, _reason = await expect_close(ws)
            assert code == 1007

    await each_case(BAD_UTF8, check)


async def test_invalid_utf8_split_over_fragments(server: Running) -> None:
    async with WireSocket.open(server.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate()).run()
        await ws.send_frame(TEXT_OPCODE, b'{"type":"ping","x":"', fin=False)
        await ws.send_frame(CONTINUATION, b'\xc3\xc3"}')
        code, _reason = await expect_close(ws)
        assert code == 1007


async def test_valid_utf8_split_inside_a_character(server: Running) -> None:
    """A multi-byte character split over two fragments is fine."""
    async with WireSocket.open(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.run()
        data = dumps({"type": "ping", "payload": {"x": "\u20ac"}}).replace("\\u20ac", "\u20ac").encode()
        cut = data.index(b"\xe2\x82\xac") + 1
        await ws.send_frame(TEXT_OPCODE, data[:cut], fin=False)
        await ws.send_frame(CONTINUATION, data[cut:])
        assert (await recv_json(ws))["type"] == "pong"
        await ws.send_frame(BINARY_OPCODE, b'{"type":"ping"}')
        assert (await recv_json(ws))["type"] == "pong"
        await send_valid_event(ws, hs, 1)


# --- §1.2 message size: 1009 above [ws] max_message_bytes ------------------------------------------------------
def ping_of_size(size: int, fill: str = "x") -> str:
    """A ping message of exactly ``size`` UTF-8 bytes (``fill`` is one character)."""
    head = '{"type":"ping","payload":{"pad":"'
    tail = '"}}'
    room = size - len(head) - len(tail)
    width = len(fill.encode())
    text = head + fill * (room // width) + "x" * (room % width) + tail
    assert len(text.encode()) == size
    return text


async def test_message_too_big_before_handshake(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        await send(ws, ping_of_size(MAX_MESSAGE + 1))
        await assert_close(ws, *TOO_BIG)


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_message_too_big_after_handshake(session: tuple[WebSocketConnection, RawHandshake],
                                               binary: bool) -> None:
    ws, _ = session
    await send(ws, ping_of_size(MAX_MESSAGE), binary=binary)  # exactly the limit: fine
    assert (await recv_json(ws))["type"] == "pong"
    await send(ws, ping_of_size(MAX_MESSAGE + 1), binary=binary)
    await assert_close(ws, *TOO_BIG)


async def test_message_size_is_counted_in_bytes(session: tuple[WebSocketConnection, RawHandshake]) -> None:
    ws, _ = session
    text = ping_of_size(MAX_MESSAGE + 1, fill="\u00e9")  # fewer characters than the limit, more bytes
    assert len(text) < MAX_MESSAGE
    await send(ws, text)
    await assert_close(ws, *TOO_BIG)


async def test_message_too_big_in_fragments(server: Running) -> None:
    async with WireSocket.open(server.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate()).run()
        data = ping_of_size(MAX_MESSAGE + 100).encode()
        for start in range(0, len(data), 500):
            chunk = data[start:start + 500]
            first, last = start == 0, start + 500 >= len(data)
            await ws.send_frame(TEXT_OPCODE if first else CONTINUATION, chunk, fin=last)
        assert await expect_close(ws) == TOO_BIG


# --- §5.1 payload size: rejection ack below the message limit ------------------------------------------------------
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
async def test_oversized_event_is_rejected_not_closed(session: tuple[WebSocketConnection, RawHandshake],
                                                      padded: bool) -> None:
    ws, hs = session
    encoded = base64.b64encode(b"\x01" * (MAX_PAYLOAD + 1)).decode()
    if not padded:
        encoded = encoded.rstrip("=")
    body = event_body(hs.key.public_hex, hs.device_id, 1, encrypted_payload=encoded)
    message = dumps({"type": "event", "payload": body})
    assert len(message) < MAX_MESSAGE
    await send(ws, message)
    assert await recv_json(ws) == {
        "type": "ack",
        "payload": {"device_seq": 1, "event_id": body["event_id"], "status": "rejected",
                    "code": "PAYLOAD_TOO_LARGE", "error": f"Payload too large (max {MAX_PAYLOAD} bytes)"},
    }
    # exactly the limit is stored, on the same connection
    exact = event_body(hs.key.public_hex, hs.device_id, 2,
                       encrypted_payload=base64.b64encode(b"\x02" * MAX_PAYLOAD).decode())
    await send(ws, {"type": "event", "payload": exact})
    assert (await recv_json(ws))["payload"]["status"] == "stored"
    await assert_pong(ws)


async def test_oversized_event_with_sdk_client(server: Running) -> None:
    with trio.fail_after(TIMEOUT):
        async with connect(server.ws_url, DeviceKey.generate(), new_device_id(), handshake_timeout=TIMEOUT) as c:
            ack = await c.send_event("files:main", "file:chunk", b"z" * (MAX_PAYLOAD + 1))
            assert (ack.status, ack.code, ack.error) == (
                "rejected", "PAYLOAD_TOO_LARGE", f"Payload too large (max {MAX_PAYLOAD} bytes)")
            assert (await c.send_event("files:main", "file:chunk", b"z" * MAX_PAYLOAD)).status == "stored"


# --- §5.2 event validation -----------------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


def err(text: str) -> tuple[str, str]:
    return ("error", text)


def rej(text: str, code: str = "INVALID_EVENT", with_id: bool = True) -> tuple[str, str, str, bool]:
    return ("rejected", code, text, with_id)


STORED = ("stored",)
UNSET = object()

# name -> (payload overrides or a whole non-object payload (key "__payload__"), expected outcome)
EVENT_CASES: dict[str, tuple[dict[str, Any], tuple[Any, ...]]] = {
    # check 2: payload is an object
    "payload-string": ({"__payload__": "event"}, err("Invalid event structure")),
    "payload-list": ({"__payload__": [1, 2]}, err("Invalid event structure")),
    "payload-null": ({"__payload__": None}, err("Invalid event structure")),
    "payload-number": ({"__payload__": 5}, err("Invalid event structure")),
    "payload-true": ({"__payload__": True}, err("Invalid event structure")),
    "payload-missing": ({"__payload__": DROP}, err("Invalid event structure")),
    # check 3: device_seq
    "seq-string": ({"device_seq": "5"}, err("Device sequence must be an integer")),
    "seq-true": ({"device_seq": True}, err("Device sequence must be an integer")),
    "seq-false": ({"device_seq": False}, err("Device sequence must be an integer")),
    "seq-null": ({"device_seq": None}, err("Device sequence must be an integer")),
    "seq-missing": ({"device_seq": DROP}, err("Device sequence must be an integer")),
    "seq-fraction": ({"device_seq": 5.5}, err("Device sequence must be an integer")),
    "seq-list": ({"device_seq": [5]}, err("Device sequence must be an integer")),
    "seq-zero": ({"device_seq": 0}, err("Device sequence must be >= 1")),
    "seq-zero-float": ({"device_seq": 0.0}, err("Device sequence must be >= 1")),
    "seq-negative": ({"device_seq": -1}, err("Device sequence must be >= 1")),
    "seq-2^53": ({"device_seq": 2**53}, err("Device sequence too large")),
    "seq-2^64": ({"device_seq": 2**64}, err("Device sequence too large")),
    "seq-1e300": ({"device_seq": 1e300}, err("Device sequence too large")),
    "seq-string-and-bad-id": ({"device_seq": "x", "event_id": "bad"}, err("Device sequence must be an integer")),
    "seq-5.0": ({"device_seq": 5.0}, STORED),
    "seq-max": ({"device_seq": 2**53 - 1}, STORED),
    # check 4: event_id
    "event_id-missing": ({"event_id": DROP}, rej("Event ID is required", with_id=False)),
    "event_id-empty": ({"event_id": ""}, rej("Event ID is required", with_id=False)),
    "event_id-null": ({"event_id": None}, rej("Event ID is required", with_id=False)),
    "event_id-number": ({"event_id": 7}, rej("Event ID is required", with_id=False)),
    "event_id-v4": ({"event_id": str(uuid.uuid4())}, rej("Invalid event ID format (must be UUIDv7)", with_id=False)),
    "event_id-text": ({"event_id": "evt-1"}, rej("Invalid event ID format (must be UUIDv7)", with_id=False)),
    "event_id-braces": ({"event_id": "{" + new_event_id() + "}"},
                        rej("Invalid event ID format (must be UUIDv7)", with_id=False)),
    "event_id-variant-unchecked": ({"event_id": new_event_id()[:19] + "c" + new_event_id()[20:]}, STORED),
    "event_id-upper": ({"event_id": new_event_id().upper()}, STORED),
    # check 5: user_id format
    "user_id-bad": ({"user_id": "xyz"}, rej("Invalid user ID format (must be Ed25519 public key hex)")),
    "user_id-number": ({"user_id": 5}, rej("Invalid user ID format (must be Ed25519 public key hex)")),
    "user_id-list": ({"user_id": []}, rej("Invalid user ID format (must be Ed25519 public key hex)")),
    "user_id-63": ({"user_id": OTHER_KEY[:-1]}, rej("Invalid user ID format (must be Ed25519 public key hex)")),
    "user_id-null": ({"user_id": None}, STORED),
    "user_id-empty": ({"user_id": ""}, STORED),
    "user_id-blank": ({"user_id": "  \t"}, STORED),
    "user_id-missing": ({"user_id": DROP}, STORED),
    "user_id-K-upper": ({"user_id": "K-UPPER"}, STORED),
    # check 6: device_id format
    "device_id-missing": ({"device_id": DROP}, rej("Device ID is required")),
    "device_id-empty": ({"device_id": ""}, rej("Device ID is required")),
    "device_id-null": ({"device_id": None}, rej("Device ID is required")),
    "device_id-number": ({"device_id": 4}, rej("Device ID is required")),
    "device_id-text": ({"device_id": "phone"}, rej("Invalid device ID format (must be UUIDv4)")),
    "device_id-v7": ({"device_id": new_event_id()}, rej("Invalid device ID format (must be UUIDv4)")),
    "device_id-v1": ({"device_id": str(uuid.uuid1())}, rej("Invalid device ID format (must be UUIDv4)")),
    "device_id-D-upper": ({"device_id": "D-UPPER"}, STORED),
    # check 7: stream_id
    "stream_id-missing": ({"stream_id": DROP}, rej("Stream ID is required")),
    "stream_id-empty": ({"stream_id": ""}, rej("Stream ID is required")),
    "stream_id-number": ({"stream_id": 1}, rej("Stream ID is required")),
    "stream_id-257": ({"stream_id": "s" * 257}, rej("Stream ID is too long")),
    "stream_id-257-bad-chars": ({"stream_id": "\u00fc" * 257}, rej("Stream ID is too long")),
    "stream_id-space": ({"stream_id": "a b"}, rej("Invalid stream ID format")),
    "stream_id-slash": ({"stream_id": "a/b"}, rej("Invalid stream ID format")),
    "stream_id-dot": ({"stream_id": "a.b"}, rej("Invalid stream ID format")),
    "stream_id-umlaut": ({"stream_id": "\u00fc"}, rej("Invalid stream ID format")),
    "stream_id-newline": ({"stream_id": "ab\n"}, rej("Invalid stream ID format")),
    "stream_id-256": ({"stream_id": "s" * 256}, STORED),
    "stream_id-all-chars": ({"stream_id": "AZaz09:_-"}, STORED),
    # check 8: type
    "type-missing": ({"type": DROP}, rej("Event type is required")),
    "type-empty": ({"type": ""}, rej("Event type is required")),
    "type-null": ({"type": None}, rej("Event type is required")),
    "type-65": ({"type": "t" * 65}, rej("Event type is too long")),
    "type-space": ({"type": "clipboard text"}, rej("Invalid event type format")),
    "type-dot": ({"type": "clipboard.text"}, rej("Invalid event type format")),
    "type-64": ({"type": "t" * 64}, STORED),
    # check 9: encrypted_payload
    "payload-field-missing": ({"encrypted_payload": DROP}, rej("Encrypted payload is required")),
    "payload-field-empty": ({"encrypted_payload": ""}, rej("Encrypted payload is required")),
    "payload-field-number": ({"encrypted_payload": 12}, rej("Encrypted payload is required")),
    "payload-field-bang": ({"encrypted_payload": "!!!!"}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-space": ({"encrypted_payload": "aGVs bG8="}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-newline": ({"encrypted_payload": "aGVsbG8=\n"}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-urlsafe": ({"encrypted_payload": "-_-_"}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-one-char": ({"encrypted_payload": "a"}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-3-pad": ({"encrypted_payload": "aGVsbG8==="}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-inner-pad": ({"encrypted_payload": "aG=sbG8="}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-only-pad": ({"encrypted_payload": "===="}, rej("Invalid encrypted payload (must be base64)")),
    "payload-field-unpadded": ({"encrypted_payload": "aGVsbG8"}, STORED),
    "payload-field-padded": ({"encrypted_payload": "aGVsbG8="}, STORED),
    # check 10: ttl
    "ttl-string": ({"ttl": "soon"}, rej("Invalid event TTL")),
    "ttl-negative": ({"ttl": -1}, rej("Invalid event TTL")),
    "ttl-fraction": ({"ttl": 1.5}, rej("Invalid event TTL")),
    "ttl-true": ({"ttl": True}, rej("Invalid event TTL")),
    "ttl-list": ({"ttl": []}, rej("Invalid event TTL")),
    "ttl-2^53": ({"ttl": 2**53}, rej("Invalid event TTL")),
    "ttl-expired-1": ({"ttl": 1}, rej("Event TTL has expired (considering clock skew tolerance)", "EVENT_EXPIRED")),
    "ttl-expired": ({"ttl": "NOW-600000"},
                    rej("Event TTL has expired (considering clock skew tolerance)", "EVENT_EXPIRED")),
    "ttl-within-skew": ({"ttl": "NOW-60000"}, STORED),
    "ttl-future": ({"ttl": "NOW+3600000"}, STORED),
    "ttl-zero": ({"ttl": 0}, STORED),
    "ttl-null": ({"ttl": None}, STORED),
    "ttl-max": ({"ttl": 2**53 - 1}, STORED),
    # checks 11-12: U/K and D
    "user_id-other-key": ({"user_id": OTHER_KEY}, rej("Event user_id mismatch", "USER_MISMATCH")),
    "user_id-zeros": ({"user_id": "0" * 64}, rej("Event user_id mismatch", "USER_MISMATCH")),
    "device_id-other": ({"device_id": str(uuid.uuid4())}, rej("Event device_id mismatch", "DEVICE_MISMATCH")),
    # first failing check decides
    "order-event_id-before-stream": ({"event_id": "bad", "stream_id": "a b"},
                                     rej("Invalid event ID format (must be UUIDv7)", with_id=False)),
    "order-user-before-device": ({"user_id": "bad", "device_id": "bad"},
                                 rej("Invalid user ID format (must be Ed25519 public key hex)")),
    "order-device-before-stream": ({"device_id": "bad", "stream_id": DROP},
                                   rej("Invalid device ID format (must be UUIDv4)")),
    "order-stream-before-type": ({"stream_id": "a b", "type": DROP}, rej("Invalid stream ID format")),
    "order-type-before-payload": ({"type": "a b", "encrypted_payload": "!"}, rej("Invalid event type format")),
    "order-payload-before-ttl": ({"encrypted_payload": "!", "ttl": "x"},
                                 rej("Invalid encrypted payload (must be base64)")),
    "order-ttl-before-user-mismatch": ({"ttl": "x", "user_id": OTHER_KEY}, rej("Invalid event TTL")),
    "order-expired-before-user-mismatch": (
        {"ttl": 1, "user_id": OTHER_KEY},
        rej("Event TTL has expired (considering clock skew tolerance)", "EVENT_EXPIRED")),
    "order-user-before-device-mismatch": ({"user_id": OTHER_KEY, "device_id": str(uuid.uuid4())},
                                          rej("Event user_id mismatch", "USER_MISMATCH")),
    "order-mismatch-after-formats": ({"device_id": str(uuid.uuid4()), "encrypted_payload": "!"},
                                     rej("Invalid encrypted payload (must be base64)")),
    # ignored keys
    "extra-keys": ({"stream_seq": 99, "created_at": 1, "server_seq": 5, "extra": {"a": [1]}}, STORED),
}


def build_event(hs: RawHandshake, overrides: dict[str, Any], seq: int) -> Any:
    """The event payload of a case; placeholders K-UPPER, D-UPPER, NOW±n are resolved here."""
    if "__payload__" in overrides:
        return overrides["__payload__"]
    resolved: dict[str, Any] = {}
    for name, value in overrides.items():
        if value == "K-UPPER":
            value = hs.key.public_hex.upper()
        elif value == "D-UPPER":
            value = hs.device_id.upper()
        elif isinstance(value, str) and value.startswith("NOW"):
            value = _now_ms() + int(value[3:])
        resolved[name] = value
    return event_body(hs.key.public_hex, hs.device_id, seq, **resolved)


def event_frame(payload: Any) -> dict[str, Any]:
    return {"type": "event"} if payload is DROP else {"type": "event", "payload": payload}


def _group(name: str) -> str:
    return name.split("-", 1)[0]


@pytest.mark.parametrize("group", sorted({_group(name) for name in EVENT_CASES}))
async def test_event_validation(session: tuple[WebSocketConnection, RawHandshake], group: str) -> None:
    """Every case of the group on one connection; each is followed by a valid event and a ping."""
    ws, hs = session
    case_seqs = iter(range(1000, 2000))  # distinct seqs: stored cases must not conflict with each other
    follow_up_seqs = iter(range(2**53 - 2, 0, -1))

    async def check(_: str, case: tuple[dict[str, Any], tuple[Any, ...]]) -> None:
        await one_event_case(ws, hs, *case, next(case_seqs), next(follow_up_seqs))

    await each_case({k: v for k, v in EVENT_CASES.items() if _group(k) == group}, check)


async def one_event_case(ws: WebSocketConnection, hs: RawHandshake, overrides: dict[str, Any],
                         expected: tuple[Any, ...], seq: int, follow_up_seq: int) -> None:
    payload = build_event(hs, overrides, seq)
    await send(ws, event_frame(payload))
    reply = await recv_json(ws)
    if expected[0] == "error":
        assert reply == {"type": "error", "payload": {"code": "INVALID_EVENT", "error": expected[1]}}
    else:
        seq = payload["device_seq"]
        assert isinstance(reply["payload"]["device_seq"], int)
        assert reply["type"] == "ack"
        if expected[0] == "stored":
            assert reply["payload"] == {"device_seq": seq, "event_id": payload["event_id"].lower(),
                                        "status": "stored"}
        else:
            _, code, text, with_id = expected
            want: dict[str, Any] = {"device_seq": seq}
            if with_id:
                want["event_id"] = payload["event_id"].lower()
            want.update(status="rejected", code=code, error=text)
            assert reply["payload"] == want
    # the connection stays usable: a valid event right after is stored, and nothing else was sent
    await send_valid_event(ws, hs, follow_up_seq)
    await assert_pong(ws)


async def test_rejected_event_is_not_stored(server: Running) -> None:
    """A rejected event is neither relayed nor replayed; a stored one after it is."""
    key = DeviceKey.generate()
    with trio.fail_after(TIMEOUT * 2):
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as receiver:
            async with established(server.ws_url, key) as (ws, hs):
                bad = event_body(hs.key.public_hex, hs.device_id, 1, stream_id="a b")
                await send(ws, {"type": "event", "payload": bad})
                assert (await recv_json(ws))["payload"]["status"] == "rejected"
                await send_valid_event(ws, hs, 2)
            event = await receiver.receive_event()
            assert event.device_seq == 2
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as late:
            replay = await late.replay()  # (still inside the fail_after above)
            assert [(e.device_seq, e.stream_id) for e in replay.events] == [(2, "clipboard:main")]


async def test_user_id_may_be_the_bound_key(session: tuple[WebSocketConnection, RawHandshake]) -> None:
    ws, hs = session
    for seq, user_id in ((1, hs.key.public_hex), (2, hs.key.public_hex.upper()), (3, None)):
        await send(ws, {"type": "event", "payload": event_body(user_id, hs.device_id, seq)})
        assert (await recv_json(ws))["payload"]["status"] == "stored"


async def test_duplicate_and_conflict(session: tuple[WebSocketConnection, RawHandshake]) -> None:
    """§5.4: same (device, seq, id) → duplicate; same event_id, other seq → duplicate; seq reuse → close."""
    ws, hs = session
    body = event_body(hs.key.public_hex, hs.device_id, 1)
    for status in ("stored", "duplicate"):
        await send(ws, {"type": "event", "payload": body})
        assert await recv_json(ws) == {
            "type": "ack", "payload": {"device_seq": 1, "event_id": body["event_id"], "status": status}}
    await send(ws, {"type": "event", "payload": {**body, "device_seq": 2}})
    assert (await recv_json(ws))["payload"] == {"device_seq": 2, "event_id": body["event_id"], "status": "duplicate"}
    await send(ws, {"type": "event", "payload": {**body, "event_id": new_event_id()}})
    await assert_close(ws, 1008, "Device sequence conflict")


# --- §1.5 unknown types and ignored messages after the handshake ------------------------------------------------------
NO_REPLY: dict[str, Any] = {
    "bogus": {"type": "bogus"},
    "bogus-payload": {"type": "bogus", "payload": [1, 2, 3]},
    "empty-type": {"type": ""},
    "upper-case-event": {"type": "EVENT", "payload": {}},
    "client_hello-again": {"type": "client_hello", "payload": {"type": "client_hello", "nonce_c": "aa" * 32}},
    "client_auth-again": {"type": "client_auth", "payload": {"type": "client_auth"}},
    "server_hello": {"type": "server_hello"},
    "session_established": {"type": "session_established", "payload": {}},
    "pong": {"type": "pong", "payload": {"timestamp": 1}},
    "error": {"type": "error", "payload": {"error": "x"}},
    "ack-no-payload": {"type": "ack"},
    "ack-string": {"type": "ack", "payload": "7"},
    "ack-seq-string": {"type": "ack", "payload": {"device_seq": "7"}},
    "ack-seq-bool": {"type": "ack", "payload": {"device_seq": True}},
    "ack-seq-fraction": {"type": "ack", "payload": {"device_seq": 1.5}},
    "ack-seq-huge": {"type": "ack", "payload": {"device_seq": 10**30}},
    "ack-seq-1e300": {"type": "ack", "payload": {"device_seq": 1e300}},
    "ack-unknown-event": {"type": "ack", "payload": {"device_seq": 1, "event_id": new_event_id()}},
    "ack-event-id-number": {"type": "ack", "payload": {"device_seq": 1, "event_id": 5}},
    "scratchpad-string": {"type": "scratchpad_sync", "payload": "x"},
    "scratchpad-missing": {"type": "scratchpad_sync"},
}


async def test_ignored_messages_get_no_reply(server: Running) -> None:
    """Each on a fresh connection (a failure must not hide the next case)."""
    async def check(_: str, message: Any) -> None:
        async with established(server.ws_url) as (ws, hs):
            await send(ws, message)
            await assert_pong(ws)  # the pong is the very next message
            await send_valid_event(ws, hs, 1)

    await each_case(NO_REPLY, check)


async def test_client_ack_with_infinite_device_seq_is_ignored(server: Running) -> None:
    """§5.6 "malformed acks are ignored": 1e400 is valid JSON number syntax (it decodes to an infinite float)."""
    async def check(_: str, message: str) -> None:
        async with established(server.ws_url) as (ws, hs):
            await send(ws, message)
            await assert_pong(ws)
            await send_valid_event(ws, hs, 1)

    await each_case({"1e400": '{"type":"ack","payload":{"device_seq":1e400}}',
                     "-1e400": '{"type":"ack","payload":{"device_seq":-1e400}}',
                     "with-event-id": '{"type":"ack","payload":{"device_seq":1e400,"event_id":"x"}}'}, check)


REPLAY_PARAMS: dict[str, Any] = {
    "payload-string": {"type": "replay_request", "payload": "x"},
    "no-payload": {"type": "replay_request"},
    "limit-string": {"type": "replay_request", "payload": {"limit": "10"}},
    "limit-negative": {"type": "replay_request", "payload": {"limit": -5}},
    "limit-huge": {"type": "replay_request", "payload": {"limit": 10**40}},
    "limit-1e400": '{"type":"replay_request","payload":{"limit":1e400}}',
    "limit-fraction": {"type": "replay_request", "limit": 2.5},
    "token-number": {"type": "replay_request", "payload": {"continuation_token": 5}},
    "token-garbage": {"type": "replay_request", "payload": {"continuation_token": "not-a-token"}},
    "token-dots": {"type": "replay_request", "payload": {"continuation_token": "a.b"}},
    "token-bad-b64": {"type": "replay_request", "payload": {"continuation_token": "!!.!!"}},
    "token-too-long": {"type": "replay_request", "continuation_token": "a" * 1025},
    "last-ack-string": {"type": "replay_request", "payload": {"last_ack_device_seq": "x"}},
    "last-ack-1e400": '{"type":"replay_request","payload":{"last_ack_device_seq":1e400}}',
}


async def test_bad_replay_parameters_are_served_as_fresh(server: Running) -> None:
    async def check(_: str, message: Any) -> None:
        async with established(server.ws_url) as (ws, hs):
            await send(ws, message)
            assert await recv_json(ws) == {
                "type": "replay_response",
                "payload": {"type": "replay_response", "events": [], "has_more": False, "page_size": 0,
                            "total_events": 0},
            }
            await send_valid_event(ws, hs, 1)

    await each_case(REPLAY_PARAMS, check)


# --- §5.2 check 1: per-user event rate --------------------------------------------------------------------------------
@pytest.fixture
async def rate_limited(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    limits = {"events_per_user_per_minute": 5, "event_burst_per_user": 5}
    async with run_daemon(e2e_config(config_factory, limits=limits)) as (_, running):
        yield running
        await assert_relay_works(running.ws_url)


async def test_event_rate_limit_closes_without_ack(rate_limited: Running) -> None:
    async with established(rate_limited.ws_url) as (ws, hs):
        for seq in range(1, 6):
            await send_valid_event(ws, hs, seq)
        await send(ws, {"type": "event", "payload": event_body(hs.key.public_hex, hs.device_id, 6)})
        await assert_close(ws, *TOO_MANY_EVENTS)  # and no ack before the close


async def test_event_rate_limit_counts_invalid_events(rate_limited: Running) -> None:
    async with established(rate_limited.ws_url) as (ws, hs):
        for _ in range(5):
            await send(ws, {"type": "event", "payload": "garbage"})
            assert (await recv_json(ws))["type"] == "error"
        await send(ws, {"type": "event", "payload": event_body(hs.key.public_hex, hs.device_id, 1)})
        await assert_close(ws, *TOO_MANY_EVENTS)


async def test_event_rate_limit_is_per_user(rate_limited: Running) -> None:
    key = DeviceKey.generate()
    async with established(rate_limited.ws_url, key) as (ws1, hs1):
        async with established(rate_limited.ws_url, key) as (ws2, hs2):
            presence = await recv_json(ws1)
            assert (presence["type"], presence["payload"]["device_id"]) == ("device_status_changed", hs2.device_id)
            for seq in range(1, 4):
                await send_valid_event(ws1, hs1, seq)
            for seq in range(1, 4):  # relayed to the other device
                relayed = await recv_json(ws2)
                assert (relayed["type"], relayed["payload"]["device_seq"]) == ("event", seq)
            for seq in range(1, 3):  # the same user's bucket: two tokens left
                await send_valid_event(ws2, hs2, seq)
            await send(ws2, {"type": "event", "payload": event_body(key.public_hex, hs2.device_id, 3)})
            await assert_close(ws2, *TOO_MANY_EVENTS)
        # another user is not affected
        async with established(rate_limited.ws_url) as (ws3, hs3):
            await send_valid_event(ws3, hs3, 1)
            await assert_pong(ws3)


async def test_pings_are_not_rate_limited_as_events(rate_limited: Running) -> None:
    async with established(rate_limited.ws_url) as (ws, hs):
        for _ in range(20):
            await assert_pong(ws)
        await send_valid_event(ws, hs, 1)
