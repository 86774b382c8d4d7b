"""Logging (§11): the one redaction point and the two output formats.

Logs never carry keys, signatures, nonces, pairing codes, tokens or payloads; ids are shortened to 8 characters.
``redact()`` is applied by ``RedactingFilter`` to every record (message, arguments and exception text) whatever
logger it comes from, so these tests drive both the function and a real handler set up by ``setup_logging``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from pocketbridge.logs import redact, request_id_var, setup_logging

# Values of the shapes the protocol uses (§2, §3.9, §10.2).
KEY = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"  # 64 hex: user id / Ed25519 key
NONCE = "a3" * 32  # 64 hex
SIGNATURE = (  # 128 hex: Ed25519 signature (§3.9 client_signature)
    "7ee8807964413a84eb37ec544635a9b60cd9890684bd6594c8f9fd0d12311239"
    "a1377161ea79396d9f23a6b5c5bc23f6950693643ee92a5085104bd35740660f"
)
EPHEMERAL = (  # 130 hex: uncompressed P-256 point (§3.9 server_ephemeral_pub)
    "04d65a93977caa3d1b081852ff57a79e465f1660577304baead505dd3a48589cf3"
    "50185e895372df6221ea3a137557e473fddb6755f05bd507c3c533fce9c91285"
)
# §3.9 client_ephemeral_pub: its 8-character short form starts with six decimal digits ("040217e6")
EPHEMERAL_DIGITS = (
    "040217e617f0b6443928278f96999e69a23a4f2c152bdf6d6cdf66e5b80282d4ed"
    "194a7debcb97712d2dda3ca85aa8765a56f45fc758599652f2897c65306e5794"
)
DEVICE_ID = "550e8400-e29b-41d4-a716-446655440000"
EVENT_ID = "01890a5d-ac96-774b-bcce-b302099a8057"
JWT = (  # §10.2 vector: header.claims.signature
    "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9."
    + base64.urlsafe_b64encode(
        b'{"iss":"pocketbridge","sub":"550e8400-e29b-41d4-a716-446655440000","user_id":"29acbae141bccaf0b22e1a94d34d0bc'
        b'7361e526d0bfe12c89794bc9322966dd7","iat":1760000000,"exp":1760003600,"jti":"00112233445566778899aabbccddeeff"}'
    ).decode().rstrip("=")
    + ".JInOxEMPh8VQb-VhhZ14NWpeJLtoA1nf6fCr4OhonndUPiRAk3iDR3LjY5o71dHYixz3Nypt4M0m89idT9KrAg"
)
PAYLOAD = base64.b64encode(b"\x8f\x02ciphertext of a clipboard item, nonce and tag included\x11\xfe").decode()
PAYLOAD_URLSAFE = base64.urlsafe_b64encode(bytes(range(200, 256)) + b"\x00\x01\x02").decode()
CODE = "048213"

HEX_VALUES = {"key": KEY, "nonce": NONCE, "signature": SIGNATURE, "ephemeral_key": EPHEMERAL}


def _assert_shortened(out: str, value: str) -> None:
    """``value`` is gone; only its first 8 characters remain (followed by the ellipsis)."""
    assert value not in out, out
    assert value[:9] not in out, f"more than 8 characters of {value[:12]}… survived: {out!r}"
    assert value[:8] + "…" in out, out


# --- redact(): each kind of secret, in the places it would appear --------------------------------------
@pytest.mark.parametrize("kind", sorted(HEX_VALUES))
@pytest.mark.parametrize(
    "template",
    [
        "{}",
        "value {} end",
        "key={}",
        '{{"field":"{}"}}',
        "({})",
        "/api/x?sig={}&t=1",
        "'{}',",
    ],
    ids=["alone", "words", "key=value", "json", "parens", "query", "repr"],
)
def test_long_hex_is_shortened_to_8_chars(kind: str, template: str) -> None:
    value = HEX_VALUES[kind]
    _assert_shortened(redact(template.format(value)), value)


@pytest.mark.parametrize("kind", sorted(HEX_VALUES))
def test_upper_case_hex_is_shortened_too(kind: str) -> None:
    # inputs are accepted in any case (§0), so a logged input may be upper case
    value = HEX_VALUES[kind].upper()
    _assert_shortened(redact(f"from client: {value}"), value)


@pytest.mark.parametrize("value", [DEVICE_ID, EVENT_ID, DEVICE_ID.upper()], ids=["device_id", "event_id", "upper"])
def test_uuids_are_shortened_to_8_chars(value: str) -> None:
    out = redact(f"device {value} connected")
    _assert_shortened(out, value)
    assert value[9:13] not in out  # not even its second group
    assert out == f"device {value[:8]}… connected"


@pytest.mark.parametrize(
    "value",
    [EPHEMERAL_DIGITS, "123456ab-0000-4000-8000-000000000000", "987654" + "cd" * 29, "ab123456" + "ef" * 28],
    ids=["ephemeral_key", "uuid", "key", "digits-at-the-end-of-the-short-id"],
)
def test_a_short_id_with_six_digits_keeps_its_8_chars(value: str) -> None:
    # a 6-digit run is a pairing code only on its own, not part of a (shortened) hex id: about 6 % of random hex
    # ids start with six decimal digits, and their short form must still identify them
    out = redact(f"id {value} seen")
    _assert_shortened(out, value)
    assert out == f"id {value[:8]}… seen"


@pytest.mark.parametrize("instance", ["9a123456", "123456fe", "a1234567"])
def test_an_instance_id_is_not_a_pairing_code(instance: str) -> None:
    # the start line names the instance ([server] instance_id or 4 random bytes in hex)
    text = f"pocketbridge 1.0.0 serving ws://127.0.0.1:3001/ws and http://127.0.0.1:3002 (instance {instance})"
    assert redact(text) == text


def test_jwt_is_replaced_entirely() -> None:
    out = redact(f"Authorization: Bearer {JWT} (refresh)")
    header, claims, signature = JWT.split(".")
    for part in (JWT, header, claims, signature, signature[:12]):
        assert part not in out, out
    assert "[redacted]" in out
    assert out.startswith("Authorization: Bearer ") and out.endswith(" (refresh)")


@pytest.mark.parametrize("payload", [PAYLOAD, PAYLOAD_URLSAFE, PAYLOAD.rstrip("=")], ids=["std", "urlsafe", "unpadded"])
def test_base64_payload_is_replaced(payload: str) -> None:
    for text in (f"payload {payload}", f'{{"encrypted_payload":"{payload}"}}', f"payload={payload};"):
        out = redact(text)
        assert payload not in out, out
        assert payload[:16] not in out, out
        assert "[redacted]" in out, out


@pytest.mark.parametrize(
    "text",
    [f"pairing code {CODE} issued", f'{{"pairing_code":"{CODE}"}}', f"code={CODE}", f"({CODE})", CODE],
)
def test_six_digit_pairing_code_is_replaced(text: str) -> None:
    out = redact(text)
    assert CODE not in out, out
    assert "[redacted]" in out


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"issued pairing code {CODE}.", CODE),  # end of a sentence
        (f"codes: {CODE}, {CODE[::-1]}.", CODE[::-1]),
        (f"point 0x{KEY}", KEY),  # hex glued to a prefix
        (f"redis key pb_user_{KEY}", KEY),
        (f"identity_{KEY}.key", KEY),
        (f"{SIGNATURE}Z", SIGNATURE),
    ],
    ids=["code-period", "code-list-period", "0x-prefix", "underscore", "filename", "suffix-letter"],
)
def test_secrets_glued_to_punctuation_or_words_do_not_survive(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out, out
    if len(secret) > 8:
        assert secret[:9] not in out, out


def test_the_spec_example_payload_does_not_survive() -> None:
    # §5.1's example encrypted_payload (20 base64 characters): payloads never reach the logs, however short
    payload = "q83vASNFZ4mrze8BI0Vn"
    out = redact(f'{{"type":"event","payload":{{"encrypted_payload":"{payload}"}}}}')
    assert payload not in out, out


def test_every_secret_in_one_message() -> None:
    text = (
        f"user {KEY} device {DEVICE_ID} sig {SIGNATURE} eph {EPHEMERAL} nonce {NONCE} "
        f"token {JWT} payload {PAYLOAD} code {CODE}"
    )
    out = redact(text)
    for secret in (KEY, DEVICE_ID, SIGNATURE, EPHEMERAL, NONCE, JWT, PAYLOAD, CODE):
        assert secret not in out, (secret, out)
    assert re.search(r"[0-9a-f]{9}", out) is None, out  # no run of hex longer than an 8-char short id
    assert f"user {KEY[:8]}… device {DEVICE_ID[:8]}…" in out


@pytest.mark.parametrize(
    "text",
    [
        "pocketbridge 1.0.0 serving ws://127.0.0.1:3001/ws and http://127.0.0.1:3002 (instance 1a2b3c4d)",
        "draining 3 connections over 1.0 s",
        "store batch of 256 operations failed: database is locked",
        "connection 0f1e2d3c: session established for device 550e8400…",
        "/var/lib/pocketbridge/pocketbridge.db",
        "changes to [listen], [storage] need a restart to take effect",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


# --- the handler: JSON and text output ----------------------------------------------------------------
@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Root logging set up by ``setup_logging`` into a buffer; the previous root handlers come back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_are_valid_json_with_the_fields(captured: io.StringIO) -> None:
    setup_logging("debug", "json", stream=captured)
    log = logging.getLogger("pocketbridge.test")
    log.debug("plain message")
    log.info("user %s connected with nonce %s", KEY, NONCE)
    token = request_id_var.set("ws:0f1e2d3c")
    try:
        logging.getLogger("hypercorn.error").warning('quote " backslash \\ newline \n tab \t unicode é')
    finally:
        request_id_var.reset(token)
    entries = _lines(captured)
    assert len(entries) == 3, captured.getvalue()
    for entry in entries:
        assert set(entry) == {"ts", "level", "logger", "id", "msg"}, entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(entry["ts"])), entry
    assert [e["level"] for e in entries] == ["debug", "info", "warning"]
    assert [e["logger"] for e in entries] == ["pocketbridge.test", "pocketbridge.test", "hypercorn.error"]
    assert [e["id"] for e in entries] == ["-", "-", "ws:0f1e2d3c"]
    assert entries[1]["msg"] == f"user {KEY[:8]}… connected with nonce {NONCE[:8]}…"
    assert entries[2]["msg"] == 'quote " backslash \\ newline \n tab \t unicode é'
    assert KEY not in captured.getvalue() and NONCE not in captured.getvalue()


def test_level_filters(captured: io.StringIO) -> None:
    setup_logging("warning", "json", stream=captured)
    log = logging.getLogger("pocketbridge.test")
    log.info("hidden")
    log.warning("shown")
    assert [e["msg"] for e in _lines(captured)] == ["shown"]


def test_secrets_in_arguments_of_any_logger_are_redacted(captured: io.StringIO) -> None:
    setup_logging("debug", "json", stream=captured)
    body = {"user_id": KEY, "client_signature": SIGNATURE, "client_ephemeral_pub": EPHEMERAL,
            "encrypted_payload": PAYLOAD, "pairing_code": CODE, "token": JWT, "device_id": DEVICE_ID}
    logging.getLogger("some.library").debug("frame %r", body)
    logging.getLogger("pocketbridge.http").info("headers: %s", {"X-PB-Signature": SIGNATURE, "Authorization": f"Bearer {JWT}"})
    out = captured.getvalue()
    for secret in (KEY, SIGNATURE, EPHEMERAL, PAYLOAD, CODE, JWT, DEVICE_ID, JWT.split(".")[2]):
        assert secret not in out, (secret, out)
    assert len(_lines(captured)) == 2


def test_exception_text_is_redacted(captured: io.StringIO) -> None:
    setup_logging("debug", "json", stream=captured)
    log = logging.getLogger("pocketbridge.test")
    try:
        try:
            raise KeyError(f"no device {DEVICE_ID} for key {KEY}")
        except KeyError as inner:
            raise ValueError(f"bad signature {SIGNATURE} on payload {PAYLOAD} (code {CODE}, token {JWT})") from inner
    except ValueError:
        log.exception("request failed for %s", KEY)
    (entry,) = _lines(captured)
    assert set(entry) == {"ts", "level", "logger", "id", "msg", "exc"}, entry
    assert entry["level"] == "error"
    assert entry["msg"] == f"request failed for {KEY[:8]}…"
    exc = str(entry["exc"])
    assert "Traceback" in exc and "ValueError: bad signature" in exc and "KeyError" in exc, exc
    for secret in (KEY, SIGNATURE, PAYLOAD, CODE, JWT, DEVICE_ID):
        assert secret not in exc, (secret, exc)
    assert f"{SIGNATURE[:8]}…" in exc and f"{DEVICE_ID[:8]}…" in exc


def test_text_format_carries_the_id_and_redacts_exceptions(captured: io.StringIO) -> None:
    setup_logging("info", "text", stream=captured)
    log = logging.getLogger("pocketbridge.gateway")
    token = request_id_var.set("req-42")
    try:
        log.info("device %s registered by %s", DEVICE_ID, KEY)
        try:
            raise RuntimeError(f"nonce {NONCE} reused")
        except RuntimeError:
            log.exception("handshake failed")
    finally:
        request_id_var.reset(token)
    out = captured.getvalue()
    first = out.splitlines()[0]
    assert re.match(r"\S+ \S+ INFO pocketbridge\.gateway \[req-42\] device 550e8400… registered by 29acbae1…$", first), first
    assert "RuntimeError: nonce" in out and "[req-42] handshake failed" in out
    for secret in (DEVICE_ID, KEY, NONCE):
        assert secret not in out, (secret, out)
