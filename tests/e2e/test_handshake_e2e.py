"""The handshake over real sockets (protocol.md §1.1, §3, §4 presence, §9): every refusal gets exactly the
spec's close code and reason, every accepted variant is accepted, and the daemon keeps serving."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock
from trio_websocket import ConnectionRejected

from pocketbridge.app import Running
from pocketbridge.client import (
    Client,
    DeviceKey,
    HandshakeRefused,
    connect,
    new_device_id,
    new_event_id,
)
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import (
    DROP,
    TIMEOUT,
    RawHandshake,
    UpgradeRejected,
    WireSocket,
    assert_close,
    assert_no_tracebacks,
    assert_pong,
    assert_relay_works,
    e2e_config,
    each_case,
    event_body,
    new_ephemeral_pub,
    open_ws,
    recv_json,
    send,
    send_valid_event,
)

EXPECTED_HELLO = (1008, "Invalid handshake step: expected client_hello")
EXPECTED_AUTH = (1008, "Invalid handshake step: expected client_auth")
BAD_SIGNATURE = (1008, "Invalid client signature")
HANDSHAKE_TIMEOUT = (1008, "Handshake timeout")


def invalid(field: str) -> tuple[int, str]:
    return 1008, f"Missing or invalid {field}"


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


@pytest.fixture
async def server(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    async with run_daemon(e2e_config(config_factory)) as (_, running):
        yield running
        await assert_relay_works(running.ws_url)


async def refused_at_hello(url: str, message: Any, expected: tuple[int, str], *, binary: bool = False) -> None:
    async with open_ws(url) as ws:
        await send(ws, message, binary=binary)
        await assert_close(ws, *expected)


async def refused_at_auth(url: str, expected: tuple[int, str], *, key: DeviceKey | None = None,
                          device: str | None = None, nonce_c: str | None = None, **auth_kw: Any) -> None:
    """Hello by the book, then ``client_auth`` built with ``auth_kw`` (see RawHandshake.auth_message)."""
    async with open_ws(url) as ws:
        hs = RawHandshake(ws, key or DeviceKey.generate(), device, nonce_c=nonce_c)
        await hs.hello()
        await hs.read_server_hello()
        await hs.auth(**auth_kw)
        await assert_close(ws, *expected)


# --- §1.1 endpoint -----------------------------------------------------------------------------------------
OTHER_PATHS = ["/", "/other", "/ws/", "/wsx", "/WS", "/api/ws", "/ws/extra", "//ws", "/ws%20"]


async def test_upgrade_on_other_path_is_404(server: Running) -> None:
    base = server.ws_url.removesuffix("/ws")

    async def check(path: str, _: Any) -> None:
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ConnectionRejected) as exc:
                async with open_ws(base + path):
                    pass  # pragma: no cover
        assert exc.value.status_code == 404
        with pytest.raises(UpgradeRejected) as raw:
            async with WireSocket.open(server.ws_url, path=path):
                pass  # pragma: no cover
        assert raw.value.status_code == 404

    await each_case(dict.fromkeys(OTHER_PATHS), check)


async def test_query_string_is_ignored(server: Running) -> None:
    async with open_ws(server.ws_url + "?token=abc&v=1") as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.run()
        await send_valid_event(ws, hs, 1)


# --- §3.2 wrapped and flat forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("hello_flat", [False, True], ids=["hello-wrapped", "hello-flat"])
@pytest.mark.parametrize("auth_flat", [False, True], ids=["auth-wrapped", "auth-flat"])
async def test_wrapped_and_flat_forms_accepted(server: Running, hello_flat: bool, auth_flat: bool) -> None:
    key = DeviceKey.generate()
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, key)
        await hs.hello(flat=hello_flat)
        await hs.read_server_hello()
        before = int(time.time() * 1000)
        await hs.auth(flat=auth_flat)
        est = await hs.read_established()
        assert set(est) == {"type", "device_id", "user_id", "last_ack_device_seq", "expires_at"}
        assert est["device_id"] == hs.device_id
        assert est["user_id"] == key.public_hex
        assert est["last_ack_device_seq"] == 0
        assert before + 86_400_000 - 5_000 <= est["expires_at"] <= int(time.time() * 1000) + 86_400_000 + 5_000
        assert hs.server["server_identity_pub"] == server.identity.public_hex
        await send_valid_event(ws, hs, 1)
        await assert_pong(ws)


async def test_binary_frames_handshake(server: Running) -> None:
    """§1.2: binary frames carrying UTF-8 JSON are accepted for every step."""
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.run(binary=True)
        await assert_pong(ws, binary=True)


async def test_flat_hello_with_non_object_payload(server: Running) -> None:
    """B = m unless payload is an object repeating the type: a string payload is just ignored."""
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await send(ws, {**hs.hello_message(flat=True), "payload": "ignored"})
        await hs.read_server_hello()
        await send(ws, {**hs.auth_message(flat=True), "payload": {"type": "something_else"}})
        await hs.read_established()
        await send_valid_event(ws, hs, 1)


async def test_flat_fields_with_wrapped_payload_reads_payload_only(server: Running) -> None:
    """Fields are read from B only: a wrapping payload hides top-level fields."""
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        message = {**hs.hello_message(flat=True), "payload": {"type": "client_hello"}}
        await send(ws, message)
        await assert_close(ws, *invalid("client_ephemeral_pub"))


@pytest.mark.parametrize(
    "payload_type", [DROP, "client_auth", "CLIENT_HELLO", None, 5], ids=["no-type", "other", "case", "null", "int"]
)
async def test_hello_payload_not_repeating_type_is_flat(server: Running, payload_type: Any) -> None:
    """A payload whose ``type`` is not ``client_hello`` does not wrap: the (empty) top level is read."""
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        wrapped = hs.hello_message()
        if payload_type is DROP:
            del wrapped["payload"]["type"]
        else:
            wrapped["payload"]["type"] = payload_type
        await send(ws, wrapped)
        await assert_close(ws, *invalid("client_ephemeral_pub"))


async def test_auth_payload_not_repeating_type_is_flat(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        wrapped = hs.auth_message()
        wrapped["payload"]["type"] = "client_hello"
        await send(ws, wrapped)
        await assert_close(ws, *invalid("user_id"))


# --- §3.1 steps ----------------------------------------------------------------------------------------------
FIRST_MESSAGES = {
    "ping": {"type": "ping"},
    "ping-payload": {"type": "ping", "payload": {"timestamp": 1}},
    "event": {"type": "event", "payload": {"event_id": new_event_id(), "device_seq": 1}},
    "client_auth": {
        "type": "client_auth",
        "payload": {"type": "client_auth", "user_id": "ab" * 32, "device_id": str(uuid.uuid4()),
                    "client_signature": "cd" * 64, "nonce_c2": "ef" * 32},
    },
    "server_hello": {"type": "server_hello", "payload": {"type": "server_hello"}},
    "ack": {"type": "ack", "payload": {"device_seq": 1}},
    "replay_request": {"type": "replay_request", "payload": {}},
    "bogus": {"type": "bogus"},
    "empty-type": {"type": ""},
    "case": {"type": "Client_Hello", "client_ephemeral_pub": new_ephemeral_pub(), "nonce_c": "aa" * 32},
    "space": {"type": "client_hello ", "client_ephemeral_pub": new_ephemeral_pub(), "nonce_c": "aa" * 32},
}


async def test_first_message_must_be_client_hello(server: Running) -> None:
    async def check(_: str, message: Any) -> None:
        await refused_at_hello(server.ws_url, message, EXPECTED_HELLO)

    await each_case(FIRST_MESSAGES, check)


async def test_first_message_not_hello_in_binary_frame(server: Running) -> None:
    await refused_at_hello(server.ws_url, {"type": "ping"}, EXPECTED_HELLO, binary=True)


async def test_second_message_must_be_client_auth(server: Running) -> None:
    async def check(second: str, _: Any) -> None:
        async with open_ws(server.ws_url) as ws:
            hs = RawHandshake(ws, DeviceKey.generate())
            await hs.hello()
            await hs.read_server_hello()
            if second == "client_hello":
                message = hs.hello_message()
            else:
                message = {"type": second, "payload": {"type": second}}
            await send(ws, message)
            await assert_close(ws, *EXPECTED_AUTH)

    await each_case(dict.fromkeys(["client_hello", "ping", "event", "server_hello", "bogus", "Client_Auth", "ack"]),
                    check)


# --- §3.3 client_hello fields --------------------------------------------------------------------------------
def _off_curve_point() -> str:
    pub = new_ephemeral_pub()
    y = int(pub[66:], 16) ^ 1  # (x, y ^ 1) is on the curve only if y ^ 1 == p - y: never for real points
    return pub[:66] + f"{y:064x}"


_EPH = new_ephemeral_pub()
BAD_EPHEMERAL = {
    "missing": DROP,
    "null": None,
    "number": 4,
    "list": [_EPH],
    "object": {"x": _EPH},
    "empty": "",
    "short-128": _EPH[:-2],
    "long-132": _EPH + "00",
    "odd-129": _EPH[:-1],
    "prefix-05": "05" + _EPH[2:],
    "compressed-66": "02" + _EPH[2:66],
    "compressed-len-130": "02" + _EPH[2:],
    "zero-point": "04" + "00" * 64,
    "off-curve": _off_curve_point(),
    "x-too-big": "04" + "ff" * 64,
    "bad-hex": _EPH[:-1] + "g",
    "non-ascii-digit": _EPH[:-1] + "\u0663",
    "whitespace": " " + _EPH[1:],
    "0x-prefix": "0x" + _EPH[2:],
}


def both_forms(cases: dict[str, Any]) -> dict[str, tuple[bool, Any]]:
    return {f"{form}-{name}": (form == "flat", value) for form in ("wrapped", "flat") for name, value in cases.items()}


async def bad_hello(url: str, field: str, cases: dict[str, Any]) -> None:
    async def check(_: str, case: tuple[bool, Any]) -> None:
        flat, value = case
        async with open_ws(url) as ws:
            hs = RawHandshake(ws, DeviceKey.generate())
            await hs.hello(flat=flat, **{field: value})
            await assert_close(ws, *invalid(field))

    await each_case(both_forms(cases), check)


async def test_invalid_client_ephemeral_pub(server: Running) -> None:
    await bad_hello(server.ws_url, "client_ephemeral_pub", BAD_EPHEMERAL)


BAD_NONCE = {
    "missing": DROP,
    "null": None,
    "number": 12,
    "list": ["aa" * 32],
    "empty": "",
    "short-63": "a" * 63,
    "long-65": "a" * 65,
    "bytes-32-as-128": "aa" * 64,
    "bad-hex": "g" * 64,
    "non-ascii-digits": "\u0663" * 64,
    "fullwidth": "\uff41" * 64,
    "newline": "a" * 63 + "\n",
    "space": "a" * 63 + " ",
}


async def test_invalid_nonce_c(server: Running) -> None:
    await bad_hello(server.ws_url, "nonce_c", BAD_NONCE)


async def test_hello_checks_ephemeral_before_nonce(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello(client_ephemeral_pub="04", nonce_c=DROP)
        await assert_close(ws, *invalid("client_ephemeral_pub"))


async def test_hello_values_in_upper_case_are_accepted(server: Running) -> None:
    """Hex input is accepted in any case and hashed verbatim (§0, §3.4)."""
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate(), nonce_c=("ab" * 32).upper(),
                          client_ephemeral_pub=new_ephemeral_pub().upper())
        await hs.run()  # read_server_hello verifies digest_s over the upper-case nonce_c as sent
        await send_valid_event(ws, hs, 1)


# --- §3.5 client_auth fields ----------------------------------------------------------------------------------
_KEY_HEX = DeviceKey.generate().public_hex
BAD_AUTH: dict[str, dict[str, Any]] = {
    "user_id": {
        "missing": DROP,
        "null": None,
        "number": 1234,
        "empty": "",
        "63": _KEY_HEX[:-1],
        "65": _KEY_HEX + "a",
        "bad-hex": "z" * 64,
        "0x": "0x" + _KEY_HEX,
        "der": "302a300506032b6570032100" + _KEY_HEX,
        "non-ascii": _KEY_HEX[:-1] + "\u0663",
        "list": [_KEY_HEX],
    },
    "device_id": {
        "missing": DROP,
        "null": None,
        "number": 4,
        "empty": "",
        "text": "my-laptop",
        "v1": str(uuid.uuid1()),
        "v3": str(uuid.uuid3(uuid.NAMESPACE_DNS, "x")),
        "v5": str(uuid.uuid5(uuid.NAMESPACE_DNS, "x")),
        "v7": new_event_id(),
        "nil": "00000000-0000-0000-0000-000000000000",
        "bad-variant": "550e8400-e29b-41d4-c716-446655440000",
        "no-dashes": uuid.uuid4().hex,
        "braces": "{" + str(uuid.uuid4()) + "}",
        "urn": uuid.uuid4().urn,
        "newline": str(uuid.uuid4()) + "\n",
        "short": str(uuid.uuid4())[:-1],
        "non-ascii": str(uuid.uuid4())[:-1] + "\u0663",
    },
    "client_signature": {
        "missing": DROP,
        "null": None,
        "number": 7,
        "empty": "",
        "126": "ab" * 63,
        "130": "ab" * 65,
        "bad-hex": "zz" * 64,
    },
    "nonce_c2": {
        "missing": DROP,
        "null": None,
        "number": 3,
        "empty": "",
        "62": "ab" * 31,
        "66": "ab" * 33,
        "bad-hex": "x" * 64,
        "non-ascii": "\u0663" * 64,
    },
}


@pytest.mark.parametrize("field", BAD_AUTH)
async def test_invalid_client_auth_field(server: Running, field: str) -> None:
    async def check(_: str, case: tuple[bool, Any]) -> None:
        flat, value = case
        await refused_at_auth(server.ws_url, invalid(field), flat=flat, **{field: value})

    await each_case(both_forms(BAD_AUTH[field]), check)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"user_id": "x", "device_id": "y", "client_signature": "z", "nonce_c2": DROP}, "user_id"),
        ({"device_id": "y", "client_signature": "z", "nonce_c2": DROP}, "device_id"),
        ({"client_signature": "z", "nonce_c2": DROP}, "client_signature"),
        ({"nonce_c2": DROP, "client_signature": "00" * 64}, "nonce_c2"),  # format checks before the signature
    ],
    ids=["user_id", "device_id", "client_signature", "nonce_c2"],
)
async def test_auth_checks_run_in_order(server: Running, overrides: dict[str, Any], field: str) -> None:
    await refused_at_auth(server.ws_url, invalid(field), **overrides)


LENIENT = {
    "name-number": {"device_name": 5},
    "name-null": {"device_name": None},
    "name-list": {"device_name": ["x"]},
    "name-object": {"device_name": {"a": 1}},
    "name-empty": {"device_name": ""},
    "name-blank": {"device_name": "   "},
    "name-huge": {"device_name": "n" * 1000},
    "type-number": {"device_type": 5},
    "type-null": {"device_type": None},
    "type-toaster": {"device_type": "toaster"},
    "type-empty": {"device_type": ""},
    "type-list": {"device_type": ["web"]},
}


async def test_device_name_and_type_are_lenient(server: Running) -> None:
    async def check(_: str, fields: dict[str, Any]) -> None:
        async with open_ws(server.ws_url) as ws:
            hs = RawHandshake(ws, DeviceKey.generate())
            await hs.run(**fields)
            await send_valid_event(ws, hs, 1)

    await each_case(LENIENT, check)


# --- §3.5 check 6: the signature ---------------------------------------------------------------------------------
def _bad_signature_cases() -> dict[str, dict[str, Any]]:
    other = DeviceKey.generate()
    return {
        "other-signer": {"signer": other},
        "other-device": {"sign_device_id": new_device_id()},
        "other-user": {"user_id": other.public_hex},
        "zeros": {"client_signature": "00" * 64},
        "not-a-point": {"user_id": "ff" * 32},
        "lower-user-signed-upper-sent": {"user_id": "UPPER", "sign_user_id": "lower"},
        "lower-device-signed-upper-sent": {"device_id": "UPPER", "sign_device_id": "lower"},
        "upper-device-signed-lower-sent": {"sign_device_id": "UPPER"},
    }


BAD_SIGNATURES = _bad_signature_cases()


async def test_invalid_client_signature(server: Running) -> None:
    async def check(_: str, case: dict[str, Any]) -> None:
        key = DeviceKey.generate()
        device_id = new_device_id()
        kw = dict(case)
        for name, ids in (("user_id", key.public_hex), ("device_id", device_id)):
            for slot in (name, "sign_" + name):
                if kw.get(slot) == "UPPER":
                    kw[slot] = ids.upper()
                elif kw.get(slot) == "lower":
                    kw[slot] = ids.lower()
        await refused_at_auth(server.ws_url, BAD_SIGNATURE, key=key, device=device_id, **kw)

    await each_case(BAD_SIGNATURES, check)


async def test_flipped_signature_bit(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        message = hs.auth_message()
        sig = bytearray(bytes.fromhex(message["payload"]["client_signature"]))
        sig[10] ^= 0x01
        message["payload"]["client_signature"] = sig.hex()
        await send(ws, message)
        await assert_close(ws, *BAD_SIGNATURE)


async def test_nonce_c_signed_in_other_case_than_sent(server: Running) -> None:
    """§3.9: a client that signed nonce_c in lower case but sent it in upper case is refused."""
    nonce = "ab" * 32
    await refused_at_auth(server.ws_url, BAD_SIGNATURE, nonce_c=nonce.upper(), sign_nonce_c=nonce)
    await refused_at_auth(server.ws_url, BAD_SIGNATURE, nonce_c=nonce, sign_nonce_c=nonce.upper())


async def test_signature_in_upper_case_hex_is_accepted(server: Running) -> None:
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        message = hs.auth_message()
        message["payload"]["client_signature"] = message["payload"]["client_signature"].upper()
        await send(ws, message)
        await hs.read_established()
        await send_valid_event(ws, hs, 1)


async def test_upper_case_ids_sent_consistently(server: Running) -> None:
    """Upper-case user_id/device_id, signed as sent: accepted; device_id echoed as sent, user_id lowercase."""
    key = DeviceKey.generate()
    device_id = new_device_id().upper()
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, key, device_id)
        est = await hs.run(user_id=key.public_hex.upper())
        assert est["device_id"] == device_id
        assert est["user_id"] == key.public_hex
        # events may use either spelling; the ack carries the ids lower-case
        body = event_body(key.public_hex.upper(), device_id, 1, event_id=new_event_id().upper())
        await send(ws, {"type": "event", "payload": body})
        ack = await recv_json(ws)
        assert ack == {"type": "ack", "payload": {"device_seq": 1, "event_id": body["event_id"].lower(),
                                                  "status": "stored"}}
    # the same device in lower case is the same device (its last_ack_device_seq is known)
    async with open_ws(server.ws_url) as ws:
        hs = RawHandshake(ws, key, device_id.lower())
        est = await hs.run()
        assert est["device_id"] == device_id.lower()
        assert est["last_ack_device_seq"] == 1


# --- §3.6 admission -------------------------------------------------------------------------------------------------
async def test_device_key_mismatch(server: Running) -> None:
    device_id = new_device_id()
    owner = DeviceKey.generate()
    with trio.fail_after(TIMEOUT * 2):
        async with connect(server.ws_url, owner, device_id, handshake_timeout=TIMEOUT) as original:
            for spelling in (device_id, device_id.upper()):
                with pytest.raises(HandshakeRefused) as exc:
                    async with connect(server.ws_url, DeviceKey.generate(), spelling, handshake_timeout=TIMEOUT):
                        pass  # pragma: no cover
                assert (exc.value.code, exc.value.reason) == (1008, "Device key mismatch")
            # the original session was neither replaced nor disturbed
            await original.ping()
            ack = await original.send_event("clipboard:main", "clipboard:text", b"still mine")
            assert ack.status == "stored"
            assert original.close_code is None
        # and the device's own key still gets in
        async with connect(server.ws_url, owner, device_id, handshake_timeout=TIMEOUT) as again:
            assert again.last_ack_device_seq == 1


async def test_device_key_mismatch_raw(server: Running) -> None:
    device_id = new_device_id()
    async with open_ws(server.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate(), device_id).run()
    await refused_at_auth(server.ws_url, (1008, "Device key mismatch"), device=device_id)


async def test_device_limit(config_factory: Callable[..., Config]) -> None:
    async with run_daemon(e2e_config(config_factory)) as (_, running):
        key = DeviceKey.generate()
        devices = [new_device_id() for _ in range(5)]
        with trio.fail_after(TIMEOUT * 3):
            for device_id in devices:
                async with connect(running.ws_url, key, device_id, handshake_timeout=TIMEOUT):
                    pass
            for _ in range(2):  # refused devices are not registered; the limit holds on retry
                with pytest.raises(HandshakeRefused) as exc:
                    async with connect(running.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT):
                        pass  # pragma: no cover
                assert (exc.value.code, exc.value.reason) == (1008, "Device limit reached")
            async with connect(running.ws_url, key, devices[0], handshake_timeout=TIMEOUT) as known:
                assert (await known.send_event("s", "t", b"x")).status == "stored"
        await assert_relay_works(running.ws_url)


async def test_device_limit_is_configurable(config_factory: Callable[..., Config]) -> None:
    async with run_daemon(e2e_config(config_factory, limits={"max_devices_per_user": 1})) as (_, running):
        key = DeviceKey.generate()
        async with open_ws(running.ws_url) as ws:
            await RawHandshake(ws, key).run()
        await refused_at_auth(running.ws_url, (1008, "Device limit reached"), key=key)


# --- §3.1 handshake timeout --------------------------------------------------------------------------------------------
@pytest.fixture
async def quick_timeout(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    config = e2e_config(config_factory, ws={"handshake_timeout": 0.5})
    async with run_daemon(config) as (_, running):
        yield running
        await assert_relay_works(running.ws_url)


# The timeout counts from the TCP accept (upgrade and handshake together, docs/protocol.md §3.1): measured from
# before the connect, the close can come no sooner than the whole timeout, however slow the upgrade was.
async def test_handshake_timeout_silence_after_upgrade(quick_timeout: Running) -> None:
    start = trio.current_time()
    async with open_ws(quick_timeout.ws_url) as ws:
        await assert_close(ws, *HANDSHAKE_TIMEOUT, timeout=3)
        assert trio.current_time() - start >= 0.45


async def test_handshake_timeout_silence_after_server_hello(quick_timeout: Running) -> None:
    start = trio.current_time()
    async with open_ws(quick_timeout.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        await assert_close(ws, *HANDSHAKE_TIMEOUT, timeout=3)
        assert trio.current_time() - start >= 0.45


async def test_no_upgrade_request_is_dropped(quick_timeout: Running) -> None:
    """A TCP connection that never sends its upgrade request does not stay open."""
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", quick_timeout.ws_port)
    async with stream:
        with trio.fail_after(3):
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # never finished
            while True:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    break
                if not data:
                    break


async def test_established_session_outlives_handshake_timeout(quick_timeout: Running) -> None:
    async with open_ws(quick_timeout.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.run()
        await trio.sleep(0.8)
        await assert_pong(ws)
        await send_valid_event(ws, hs, 1)


async def test_handshake_timeout_counts_from_upgrade(config_factory: Callable[..., Config],
                                                     mock_clock: MockClock) -> None:
    """The timeout runs from the connection (its accept, §3.1), not per step: a hello at 0.6 s does not extend
    a 1 s limit."""
    mock_clock.autojump_threshold = 0.2  # only when everything is idle; bounds every wait in real time
    config = e2e_config(config_factory, ws={"handshake_timeout": 1.0})
    async with run_daemon(config) as (_, running), open_ws(running.ws_url) as ws:
        start = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()  # the server is past the upgrade, waiting for the hello
        mock_clock.jump(0.6)
        hs = RawHandshake(ws, DeviceKey.generate())
        await hs.hello()
        await hs.read_server_hello()
        await assert_close(ws, *HANDSHAKE_TIMEOUT)
        elapsed = trio.current_time() - start
        assert 1.0 <= elapsed < 1.6, elapsed


# --- §3.6 device names and types, seen through presence (§4) -------------------------------------------------------------
NAMES = {
    "too-long": ("a" * 60, "a" * 50),
    "control": ("Lap\x00to\x07p\x7f", "Laptop"),
    "c1-control": ("\x85Work\x9f", "Work"),
    "markup": ("<b>Phone</b>", "bPhone/b"),
    "script": ("<script>alert(1)</script>", "scriptalert(1)/script"),
    "trim": ("  Tab  ", "Tab"),
    "tab-newline": ("\t Tabbed \n", "Tabbed"),
    "surrogate": ("Pho\ud800ne", "Phone"),
    "truncate-then-trim": ("a" * 49 + " " + "b" * 5, "a" * 49),
    "code-points": (" " + "\u00e9" * 60, "\u00e9" * 50),
    "astral": ("\U0001f600" * 60, "\U0001f600" * 50),
    "format-char-kept": ("Zero\u200bWidth", "Zero\u200bWidth"),
    "only-controls": ("\x00\x01\x1f", "Unknown Device"),
    "only-brackets": ("<><>", "Unknown Device"),
    "not-a-string": (42, "Unknown Device"),
    "missing": (DROP, "Unknown Device"),
}


async def next_presence(client: Client, device_id: str) -> dict[str, Any]:
    with trio.fail_after(TIMEOUT):
        while True:
            msg = await client.next_notice("device_status_changed")
            if msg["payload"]["device_id"] == device_id.lower() and msg["payload"]["is_online"]:
                return msg["payload"]  # type: ignore[no-any-return]


async def join_and_observe(url: str, observer: Client, key: DeviceKey, device_id: str | None = None,
                           **auth_kw: Any) -> dict[str, Any]:
    """Handshake a new connection of ``key`` by hand; return the presence ``observer`` got for it."""
    async with open_ws(url) as ws:
        hs = RawHandshake(ws, key, device_id)
        await hs.run(**auth_kw)
        return await next_presence(observer, hs.device_id)


async def test_device_name_sanitised(server: Running) -> None:
    async def check(_: str, case: tuple[Any, str]) -> None:
        sent, shown = case
        key = DeviceKey.generate()
        with trio.fail_after(TIMEOUT * 2):
            async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
                device_id = new_device_id()
                presence = await join_and_observe(server.ws_url, observer, key, device_id, device_name=sent)
                assert presence == {
                    "type": "device_status_changed",
                    "user_id": key.public_hex,
                    "device_id": device_id,
                    "device_name": shown,
                    "device_type": "web",
                    "is_online": True,
                    "timestamp": presence["timestamp"],
                }
                assert isinstance(presence["timestamp"], int)

    await each_case(NAMES, check)


DEVICE_TYPES = {"toaster": ("toaster", "web"), "upper": ("DESKTOP", "web"), "empty": ("", "web"),
                "number": (7, "web"), "missing": (DROP, "web"), "mobile": ("mobile", "mobile"),
                "desktop": ("desktop", "desktop"), "web": ("web", "web")}


async def test_device_type(server: Running) -> None:
    async def check(_: str, case: tuple[Any, str]) -> None:
        sent, shown = case
        key = DeviceKey.generate()  # two devices per case: a fresh user keeps clear of the device limit
        with trio.fail_after(TIMEOUT * 2):
            async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
                presence = await join_and_observe(server.ws_url, observer, key, device_type=sent, device_name="Box")
                assert (presence["device_name"], presence["device_type"]) == ("Box", shown)

    await each_case(DEVICE_TYPES, check)


async def test_known_device_keeps_name_and_valid_type_updates(server: Running) -> None:
    key = DeviceKey.generate()
    device_id = new_device_id()
    with trio.fail_after(TIMEOUT * 3):
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
            steps = [("First", "mobile", "First", "mobile"), ("Second", "desktop", "First", "desktop"),
                     ("<Third>", "toaster", "First", "desktop")]
            for name, dtype, shown_name, shown_type in steps:
                presence = await join_and_observe(server.ws_url, observer, key, device_id,
                                                  device_name=name, device_type=dtype)
                assert (presence["device_name"], presence["device_type"]) == (shown_name, shown_type)


async def test_known_device_without_name_takes_first_valid_name(server: Running) -> None:
    key = DeviceKey.generate()
    device_id = new_device_id()
    with trio.fail_after(TIMEOUT * 3):
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
            for sent, shown in (("\x00", "Unknown Device"), ("Named", "Named"), ("Renamed", "Named")):
                presence = await join_and_observe(server.ws_url, observer, key, device_id, device_name=sent)
                assert presence["device_name"] == shown


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        (["Laptop", "Laptop", "Laptop (2)", "Laptop (7)"], ["Laptop", "Laptop (2)", "Laptop (3)", "Laptop (7)"]),
        (["x" * 50, "x" * 50, "Pad (1)", "Pad (1)"], ["x" * 50, "x" * 46 + " (2)", "Pad (1)", "Pad (1) (2)"]),
    ],
    ids=["numbered", "long-and-one"],
)
async def test_duplicate_device_names_are_numbered(server: Running, sent: list[str], shown: list[str]) -> None:
    key = DeviceKey.generate()  # the observer and four more devices: the default limit of five
    with trio.fail_after(TIMEOUT * 3):
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
            got = []
            for name in sent:
                presence = await join_and_observe(server.ws_url, observer, key, device_name=name)
                got.append(presence["device_name"])
    assert got == shown


async def test_observer_connection_keeps_working_after_refusals(server: Running) -> None:
    """Refused handshakes of the same user send no presence and disturb no session."""
    key = DeviceKey.generate()
    with trio.fail_after(TIMEOUT * 3):
        async with connect(server.ws_url, key, new_device_id(), handshake_timeout=TIMEOUT) as observer:
            await refused_at_auth(server.ws_url, BAD_SIGNATURE, key=key, signer=DeviceKey.generate())
            await refused_at_auth(server.ws_url, invalid("nonce_c2"), key=key, nonce_c2="x")
            assert await observer.ping() > 0
            assert observer.notices.statistics().current_buffer_used == 0
