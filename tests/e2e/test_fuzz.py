"""Property-based bad input over real sockets (protocol.md §1, §3, §5.2, §9).

One daemon per test runs in a background thread (its own ``trio.run``); the tests are plain
synchronous Hypothesis tests whose examples each ``trio.run`` a client against it. So an example
costs a few connections, not a daemon start, and the daemon sees every example of the test.
Examples are derandomised: the run is deterministic, and a failure is shrunk and printed as usual.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeGuard

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from pocketbridge.client import DeviceKey, new_event_id
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import (
    DROP,
    RawHandshake,
    assert_no_tracebacks,
    assert_relay_works,
    dumps,
    e2e_config,
    established,
    expect_close,
    new_ephemeral_pub,
    open_ws,
    recv_json,
    send,
)

MAX_MESSAGE = 4096
MAX_PAYLOAD = 2048
EXAMPLE_TIMEOUT = 20.0  # one example, all its connections (each wait inside is bounded by TIMEOUT too)

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call") + caplog.get_records("teardown"))


@pytest.fixture
def daemon_url(config_factory: Callable[..., Config]) -> Iterator[str]:
    """A daemon in a background thread for the whole test; afterwards it must still handshake and relay."""
    config = e2e_config(config_factory, ws={"max_message_bytes": MAX_MESSAGE},
                        events={"max_payload_bytes": MAX_PAYLOAD})
    urls: queue.Queue[str] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    async def serve() -> None:
        async with run_daemon(config) as (_, running):
            urls.put(running.ws_url)
            await trio.to_thread.run_sync(stop.wait)
            await assert_relay_works(running.ws_url)

    def thread_main() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            urls.put("")

    thread = threading.Thread(target=thread_main, name="fuzz-daemon", daemon=True)
    thread.start()
    url = urls.get(timeout=30)
    try:
        if url:
            yield url
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive(), "the daemon did not stop"
    if errors:
        raise errors[0]


def run_example(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
    """One Hypothesis example: its own trio run, bounded in time."""
    async def bounded() -> None:
        with trio.fail_after(EXAMPLE_TIMEOUT):
            await fn(*args)

    trio.run(bounded)


# --- strategies -------------------------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
hexish = st.text(alphabet="0123456789abcdefABCDEFxg", max_size=140)
VALID_PUBS = [new_ephemeral_pub() for _ in range(3)]
message_types = (
    st.just("client_hello")
    | st.just("client_auth")
    | st.sampled_from(["ping", "event", "ack", "replay_request", "scratchpad_sync", "bogus", "", "CLIENT_HELLO"])
    | st.text(max_size=12)
)
handshake_fields = {
    "client_ephemeral_pub": st.sampled_from(VALID_PUBS) | st.sampled_from(VALID_PUBS).map(str.upper) | hexish
    | json_values,
    "nonce_c": st.just("ab" * 32) | hexish | json_values,
    "user_id": st.just(DeviceKey.generate().public_hex) | hexish | json_values,
    "device_id": st.uuids().map(str) | st.uuids(version=4).map(str) | st.uuids(version=4).map(lambda u: str(u).upper())
    | json_values,
    "client_signature": st.just("ab" * 64) | hexish | json_values,
    "nonce_c2": st.just("cd" * 32) | hexish | json_values,
}


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Message-shaped JSON objects: a type, maybe a payload, maybe (wrapped or flat) handshake fields."""
    msg: dict[str, Any] = {"type": draw(message_types)}
    fields = draw(st.fixed_dictionaries({}, optional=handshake_fields))
    where = draw(st.sampled_from(["flat", "wrapped", "payload-only", "none"]))
    if where == "flat":
        msg.update(fields)
    elif where == "wrapped":
        msg["payload"] = {"type": draw(st.sampled_from([msg["type"], "client_hello"]) | st.text(max_size=5)),
                          **fields}
    elif where == "payload-only":
        msg["payload"] = draw(json_values)
    return msg


raw_frames = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200),
    json_values.map(dumps),
    st.integers(MAX_MESSAGE - 3, MAX_MESSAGE + 3).map(lambda n: "x" * n),
    st.integers(MAX_MESSAGE - 3, MAX_MESSAGE + 3).map(lambda n: b"\xff" * n),
)
envelope_frames = envelopes().map(dumps) | envelopes().map(lambda m: dumps(m).encode("utf-8"))
first_frames = raw_frames | envelope_frames  # half of the frames are message-shaped

_VALID_AUTH = {
    "user_id": st.just(DeviceKey.generate().public_hex),
    "device_id": st.uuids(version=4).map(str),
    "client_signature": st.just("ab" * 64),
    "nonce_c2": st.just("cd" * 32),
}


@st.composite
def auth_frames(draw: st.DrawFn) -> str:
    """client_auth messages whose fields are each valid-looking with probability 3/4 (wrapped or flat)."""
    body = {name: draw(valid | valid | valid | handshake_fields[name] | st.just(DROP))
            for name, valid in _VALID_AUTH.items()}
    body = {k: v for k, v in body.items() if v is not DROP}
    if draw(st.booleans()):
        return dumps({"type": "client_auth", "payload": {"type": "client_auth", **body}})
    return dumps({"type": "client_auth", **body})


# --- an independent reading of §1.2-1.3 and §3.3 --------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _is_hex(value: Any, length: int) -> TypeGuard[str]:
    return isinstance(value, str) and len(value) == length and all(c in "0123456789abcdefABCDEF" for c in value)


def _on_curve(pub: str) -> bool:
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(pub))
    except ValueError:
        return False
    return True


def expected_for_first(frame: str | bytes) -> tuple[int, str] | str:
    """The close a first frame must get, or ``"server_hello"`` for a valid client_hello."""
    size = len(frame) if isinstance(frame, bytes) else len(frame.encode("utf-8"))
    if size > MAX_MESSAGE:
        return 1009, "Message too big"
    try:
        text = frame.decode("utf-8") if isinstance(frame, bytes) else frame
        msg = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return 1008, "Invalid message format"
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        return 1008, "Invalid message format"
    if msg["type"] != "client_hello":
        return 1008, "Invalid handshake step: expected client_hello"
    payload = msg.get("payload")
    body = payload if isinstance(payload, dict) and payload.get("type") == "client_hello" else msg
    pub = body.get("client_ephemeral_pub")
    if not (_is_hex(pub, 130) and pub.startswith("04") and _on_curve(pub)):
        return 1008, "Missing or invalid client_ephemeral_pub"
    if not _is_hex(body.get("nonce_c"), 64):
        return 1008, "Missing or invalid nonce_c"
    return "server_hello"


@FUZZ
@given(frames=st.lists(first_frames, min_size=1, max_size=6))
def test_arbitrary_first_frames(daemon_url: str, frames: list[str | bytes]) -> None:
    """Whatever the first frame, the daemon answers exactly as §1/§3 say: never 1011, never a hang."""
    for frame in frames:
        event(str(expected_for_first(frame)))
    run_example(first_frames_example, daemon_url, frames)


async def first_frames_example(url: str, frames: list[str | bytes]) -> None:
    for frame in frames:
        expected = expected_for_first(frame)
        async with open_ws(url) as ws:
            await send(ws, frame)
            if expected == "server_hello":
                assert (await recv_json(ws))["type"] == "server_hello"
            else:
                assert await expect_close(ws) == expected, frame


@FUZZ
@given(frames=st.lists(first_frames | auth_frames(), min_size=1, max_size=4))
def test_arbitrary_frames_after_hello(daemon_url: str, frames: list[str | bytes]) -> None:
    """In AWAIT_AUTH anything but a client_auth closes with 1008 (1009 when too big); never 1011."""
    for frame in frames:
        event(str(expected_after_hello(frame)))
    run_example(after_hello_example, daemon_url, frames)


async def after_hello_example(url: str, frames: list[str | bytes]) -> None:
    for frame in frames:
        async with open_ws(url) as ws:
            hs = RawHandshake(ws, DeviceKey.generate())
            await hs.hello()
            await hs.read_server_hello()
            await send(ws, frame)
            assert await expect_close(ws) == expected_after_hello(frame), frame


_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.ASCII | re.IGNORECASE)
AUTH_CHECKS = (
    ("user_id", lambda v: _is_hex(v, 64)),
    ("device_id", lambda v: isinstance(v, str) and _UUID4.fullmatch(v) is not None),
    ("client_signature", lambda v: _is_hex(v, 128)),
    ("nonce_c2", lambda v: _is_hex(v, 64)),
)


def expected_after_hello(frame: str | bytes) -> tuple[int, str]:
    """The close of a frame sent in AWAIT_AUTH by a client that cannot know the server's nonce (§3.5)."""
    first = expected_for_first(frame)
    if first in ((1009, "Message too big"), (1008, "Invalid message format")):
        return first  # type: ignore[return-value]
    msg = json.loads(frame)
    if msg["type"] != "client_auth":
        return 1008, "Invalid handshake step: expected client_auth"
    payload = msg.get("payload")
    body = payload if isinstance(payload, dict) and payload.get("type") == "client_auth" else msg
    for field, valid in AUTH_CHECKS:
        if not valid(body.get(field)):
            return 1008, f"Missing or invalid {field}"
    return 1008, "Invalid client signature"  # signed over nothing this connection's nonce_s


# --- events after the handshake ----------------------------------------------------------------------------------
EVENT_FIELDS = ("event_id", "user_id", "device_id", "device_seq", "stream_id", "type", "encrypted_payload", "ttl")
_NAME_CHARS = "AZaz09:_-. /\u00fc"
field_values: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.sampled_from(["NEW", "NEW-UPPER", "", "evt", str(uuid.uuid4()), "REUSE"]) | json_values,
    "user_id": st.sampled_from(["K", "K-UPPER", "OTHER", "", "  ", None, "0" * 64]) | json_values,
    "device_id": st.sampled_from(["D", "D-UPPER", "OTHER-D", "", "x", new_event_id()]) | json_values,
    "device_seq": st.integers(-3, 2**53 + 3) | st.sampled_from([1, 2, 2**53 - 1, 2**53, 5.0, 5.5, "5", True, 1e300])
    | json_values,
    "stream_id": st.text(alphabet=_NAME_CHARS, max_size=260) | json_values,
    "type": st.text(alphabet=_NAME_CHARS, max_size=70) | json_values,
    "encrypted_payload": st.binary(max_size=MAX_PAYLOAD + 8).map(lambda b: base64.b64encode(b).decode())
    | st.binary(min_size=1, max_size=40).map(lambda b: base64.b64encode(b).decode().rstrip("="))
    | st.text(alphabet="AZaz09+/=-_ \n!", max_size=20)
    | json_values,
    "ttl": st.sampled_from([0, None, "PAST", "FUTURE", "SKEW", 2**53 - 1, 2**53, -1, 1.5, "x"]) | json_values,
}


@st.composite
def event_specs(draw: st.DrawFn) -> tuple[str, Any]:
    """("raw", payload) for an arbitrary payload, else ("event", {field: value-or-marker-or-DROP}, extras)."""
    if draw(st.integers(0, 9)) == 0:
        return ("raw", draw(json_values))
    mutated = draw(st.sets(st.sampled_from(EVENT_FIELDS), max_size=3))
    spec = {name: draw(st.just(DROP) | field_values[name]) for name in sorted(mutated)}
    extras = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in EVENT_FIELDS), json_values,
                                  max_size=2))
    return ("event", {**extras, **spec})


SPEC_REJECTIONS = {
    ("INVALID_EVENT", "Event ID is required"),
    ("INVALID_EVENT", "Invalid event ID format (must be UUIDv7)"),
    ("INVALID_EVENT", "Invalid user ID format (must be Ed25519 public key hex)"),
    ("INVALID_EVENT", "Device ID is required"),
    ("INVALID_EVENT", "Invalid device ID format (must be UUIDv4)"),
    ("INVALID_EVENT", "Stream ID is required"),
    ("INVALID_EVENT", "Stream ID is too long"),
    ("INVALID_EVENT", "Invalid stream ID format"),
    ("INVALID_EVENT", "Event type is required"),
    ("INVALID_EVENT", "Event type is too long"),
    ("INVALID_EVENT", "Invalid event type format"),
    ("INVALID_EVENT", "Encrypted payload is required"),
    ("INVALID_EVENT", "Invalid encrypted payload (must be base64)"),
    ("INVALID_EVENT", "Payload cannot be empty"),
    ("PAYLOAD_TOO_LARGE", f"Payload too large (max {MAX_PAYLOAD} bytes)"),
    ("INVALID_EVENT", "Invalid event TTL"),
    ("EVENT_EXPIRED", "Event TTL has expired (considering clock skew tolerance)"),
    ("USER_MISMATCH", "Event user_id mismatch"),
    ("DEVICE_MISMATCH", "Event device_id mismatch"),
}


def _integral(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _is_uuid7(value: Any) -> TypeGuard[str]:
    if not isinstance(value, str) or len(value) != 36:
        return False
    parts = value.split("-")
    return ([len(p) for p in parts] == [8, 4, 4, 4, 12] and parts[2][0] == "7"
            and all(_is_hex(p, len(p)) for p in parts))


class EventRun:
    """Builds the payloads of one example and checks each reply against §5.2-5.4."""

    def __init__(self, hs: RawHandshake) -> None:
        self.hs = hs
        self.next_seq = 1
        self.last_event_id: str | None = None
        self.stored: dict[int, str] = {}  # device_seq -> event_id (lowercase)

    def resolve(self, name: str, value: Any) -> Any:
        hs, now = self.hs, int(time.time() * 1000)
        markers = {
            ("event_id", "NEW"): new_event_id(),
            ("event_id", "NEW-UPPER"): new_event_id().upper(),
            ("event_id", "REUSE"): self.last_event_id or new_event_id(),
            ("user_id", "K"): hs.key.public_hex,
            ("user_id", "K-UPPER"): hs.key.public_hex.upper(),
            ("user_id", "OTHER"): DeviceKey.generate().public_hex,
            ("device_id", "D"): hs.device_id,
            ("device_id", "D-UPPER"): hs.device_id.upper(),
            ("device_id", "OTHER-D"): str(uuid.uuid4()),
            ("ttl", "PAST"): now - 3_600_000,
            ("ttl", "FUTURE"): now + 3_600_000,
            ("ttl", "SKEW"): now - 60_000,
        }
        if isinstance(value, str):
            return markers.get((name, value), value)
        return value

    def payload(self, spec: tuple[str, Any]) -> Any:
        if spec[0] == "raw":
            return spec[1]
        body: dict[str, Any] = {
            "event_id": new_event_id(),
            "user_id": self.hs.key.public_hex,
            "device_id": self.hs.device_id,
            "device_seq": self.next_seq,
            "stream_id": "fuzz:stream",
            "type": "fuzz:event",
            "encrypted_payload": base64.b64encode(b"fuzz").decode(),
        }
        self.next_seq += 1
        for name, value in spec[1].items():
            if value is DROP:
                body.pop(name, None)
            else:
                body[name] = self.resolve(name, value)
        if isinstance(body.get("event_id"), str):
            self.last_event_id = body["event_id"]
        return body

    def check_reply(self, payload: Any, reply: dict[str, Any] | None, close: tuple[int | None, str | None] | None,
                    all_valid: bool) -> None:
        """``reply`` is the one message before the pong (None if none); ``close`` if the server closed."""
        seq = _integral(payload.get("device_seq")) if isinstance(payload, dict) else None
        if not isinstance(payload, dict):
            assert close is None and reply == {
                "type": "error", "payload": {"code": "INVALID_EVENT", "error": "Invalid event structure"}}
            return
        if seq is None or seq < 1 or seq > 2**53 - 1:
            text = ("Device sequence must be an integer" if seq is None else
                    "Device sequence must be >= 1" if seq < 1 else "Device sequence too large")
            assert close is None and reply == {"type": "error", "payload": {"code": "INVALID_EVENT", "error": text}}
            return
        raw_id = payload.get("event_id")
        event_id = raw_id.lower() if _is_uuid7(raw_id) else None
        if close is not None:  # the only close an in-range event may cause here (§5.4)
            assert close == (1008, "Device sequence conflict"), close
            assert seq in self.stored and self.stored[seq] != event_id, (seq, event_id, self.stored)
            return
        assert reply is not None and reply["type"] == "ack", reply
        ack = reply["payload"]
        assert isinstance(ack["device_seq"], int) and ack["device_seq"] == seq, (ack, seq)
        if ack["status"] == "rejected":
            assert not all_valid, (payload, ack)
            assert set(ack) == ({"device_seq", "status", "code", "error"} | ({"event_id"} if event_id else set()))
            assert ack.get("event_id") == event_id
            assert (ack["code"], ack["error"]) in SPEC_REJECTIONS, ack
            return
        assert ack == {"device_seq": seq, "event_id": event_id, "status": ack["status"]}, ack
        assert ack["status"] == "stored" or not all_valid, (payload, ack)
        assert event_id is not None  # only a valid event can be stored or a duplicate
        if ack["status"] == "stored":
            assert seq not in self.stored and event_id not in self.stored.values(), (seq, event_id, self.stored)
            self.stored[seq] = event_id
        else:
            assert ack["status"] == "duplicate", ack
            assert self.stored.get(seq) == event_id or event_id in self.stored.values(), (seq, event_id)


async def exchange(ws: Any, payload: Any) -> tuple[dict[str, Any] | None, tuple[int | None, str | None] | None]:
    """Send the event and a ping; return (the one reply before the pong, or None), or the close."""
    try:
        await send(ws, {"type": "event", "payload": payload})
        await send(ws, {"type": "ping"})
    except ConnectionClosed:
        pass
    replies: list[dict[str, Any]] = []
    while True:
        try:
            msg = await recv_json(ws)
        except AssertionError as exc:
            if "connection closed" not in str(exc):
                raise
            assert not replies, replies  # a close comes instead of the reply, never after one
            return None, await expect_close(ws)
        if msg["type"] == "pong":
            assert len(replies) <= 1, replies
            return (replies[0] if replies else None), None
        replies.append(msg)


@FUZZ
@given(specs=st.lists(event_specs(), min_size=1, max_size=6))
def test_arbitrary_event_payloads(daemon_url: str, specs: list[tuple[str, Any]]) -> None:
    """Every event gets exactly one of: error frame, rejection ack, stored/duplicate ack, or a spec close."""
    outcomes: list[str] = []
    run_example(event_payloads_example, daemon_url, specs, outcomes)
    for outcome in outcomes:
        event(outcome)


async def event_payloads_example(url: str, specs: list[tuple[str, Any]], outcomes: list[str]) -> None:
    async with established(url) as (ws, hs):  # a fresh user and device for every example
        run = EventRun(hs)
        for spec in specs:
            payload = run.payload(spec)
            reply, close = await exchange(ws, payload)
            all_valid = spec[0] == "event" and not any(k in EVENT_FIELDS for k in spec[1])
            run.check_reply(payload, reply, close, all_valid)
            outcomes.append("close" if close else f"{reply['type']} {reply['payload'].get('status', '')}".strip()
                            if reply else "no reply")
            if close is not None:
                break
