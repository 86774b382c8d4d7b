"""Handshake messages, server identity and key schedule (protocol.md §2, §3). Pure: no I/O."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pocketbridge.errors import INVALID_SIGNATURE, ProtocolClose, missing_or_invalid
from pocketbridge.protocol.envelope import Message, is_hex, is_uuid4
from pocketbridge.protocol.keys import load_public_key
from pocketbridge.protocol.names import MAX_DEVICE_NAME

DEVICE_TYPES = frozenset({"mobile", "desktop", "web"})
TOKEN_KEY_INFO = b"pocketbridge continuation-token v1"
_SESSION_INFOS = (b"pocketbridge_client_to_server_v1", b"pocketbridge_server_to_client_v1", b"pocketbridge_session_v1")
# Unicode Cc and Cs, the bidirectional controls (they reorder what a UI shows: "gpj.exe" displayed as "exe.jpg"),
# and markup. Other format characters stay: ZWJ (U+200D) joins emoji sequences.
_NAME_DROP_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069<>]")
_AUTH_CHECKS: tuple[tuple[str, Callable[[object], bool]], ...] = (
    ("user_id", lambda v: is_hex(v, 64)),
    ("device_id", is_uuid4),
    ("client_signature", lambda v: is_hex(v, 128)),
    ("nonce_c2", lambda v: is_hex(v, 64)),
)


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 with L = 32."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _load_p256(point_hex: str) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of an uncompressed SEC1 point in hex; ValueError if it is not one."""
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(point_hex))


def _p256_hex(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex()


# --- client messages -------------------------------------------------------------------------------
@attrs.frozen
class ClientHello:
    """A validated ``client_hello``; values verbatim as sent."""

    client_ephemeral_pub: str
    nonce_c: str


@attrs.frozen
class ClientAuth:
    """A validated ``client_auth``; ids verbatim as sent, name sanitised, type None unless known."""

    user_id: str
    device_id: str
    client_signature: str
    nonce_c2: str
    device_name: str | None
    device_type: str | None


def handshake_body(msg: Message) -> Mapping[str, Any]:
    """The body of a handshake message: the wrapped ``payload`` if it repeats ``type``, else the message (§3.2)."""
    payload = msg.payload
    if isinstance(payload, dict) and payload.get("type") == msg.type:
        return payload
    return msg.raw


def parse_client_hello(msg: Message) -> ClientHello:
    """Validate a ``client_hello`` (§3.3)."""
    body = handshake_body(msg)
    pub = body.get("client_ephemeral_pub")
    if not (is_hex(pub, 130) and pub.startswith("04")):
        raise ProtocolClose(missing_or_invalid("client_ephemeral_pub"))
    try:
        _load_p256(pub)
    except ValueError:
        raise ProtocolClose(missing_or_invalid("client_ephemeral_pub")) from None
    nonce_c = body.get("nonce_c")
    if not is_hex(nonce_c, 64):
        raise ProtocolClose(missing_or_invalid("nonce_c"))
    return ClientHello(client_ephemeral_pub=pub, nonce_c=nonce_c)


def parse_client_auth(msg: Message) -> ClientAuth:
    """Validate a ``client_auth``: checks 1-5 of §3.5, in order (the signature is ServerHandshake.verify)."""
    body = handshake_body(msg)
    for field, valid in _AUTH_CHECKS:
        if not valid(body.get(field)):
            raise ProtocolClose(missing_or_invalid(field))
    device_type = body.get("device_type")
    return ClientAuth(
        user_id=body["user_id"],
        device_id=body["device_id"],
        client_signature=body["client_signature"],
        nonce_c2=body["nonce_c2"],
        device_name=sanitize_device_name(body.get("device_name")),
        device_type=device_type if isinstance(device_type, str) and device_type in DEVICE_TYPES else None,
    )


# --- device names (§3.6) ---------------------------------------------------------------------------
def sanitize_device_name(name: object) -> str | None:
    """The lenient handshake rule: drop Cc/Cs, bidi controls and ``<>``, trim, cut to 50 code points, trim;
    empty → None."""
    if not isinstance(name, str):
        return None
    return _NAME_DROP_RE.sub("", name).strip()[:MAX_DEVICE_NAME].strip() or None


def device_name_has_invalid_chars(name: str) -> bool:
    """The strict rule of the REST rename (§10.3): whether ``name`` has a character the handshake would drop."""
    return _NAME_DROP_RE.search(name) is not None


# --- server identity and digests -------------------------------------------------------------------
class ServerIdentity:
    """The server's Ed25519 identity key (§2). Never printed: the repr shows only the public key."""

    __slots__ = ("_key", "_public_raw")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self._public_raw = key.public_key().public_bytes_raw()

    @classmethod
    def from_seed(cls, seed: bytes) -> ServerIdentity:
        """The identity of a 32-byte Ed25519 seed."""
        if len(seed) != 32:
            raise ValueError("identity seed must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def generate(cls) -> ServerIdentity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (secret)."""
        return self._key.private_bytes_raw()

    @property
    def public_hex(self) -> str:
        """``server_identity_pub``: the raw public key, lowercase hex."""
        return self._public_raw.hex()

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def fingerprint(self) -> str:
        """First 16 bytes of SHA-256(raw public key), lowercase hex in ':'-separated groups of 4 digits."""
        digest = hashlib.sha256(self._public_raw).hexdigest()[:32]
        return ":".join(digest[i : i + 4] for i in range(0, 32, 4))

    def token_key(self) -> bytes:
        """K_token = HKDF-SHA256(seed, salt = 32 zero bytes, info = "pocketbridge continuation-token v1")."""
        return _hkdf(self.seed, bytes(32), TOKEN_KEY_INFO)

    def __repr__(self) -> str:
        return f"ServerIdentity(public_hex={self.public_hex!r})"


def _sha256_ascii(*parts: str) -> bytes:
    return hashlib.sha256("".join(parts).encode("ascii")).digest()


def digest_s(server_identity_pub: str, server_ephemeral_pub: str, nonce_c: str, nonce_s: str) -> bytes:
    """The 32 bytes the server signs (§3.4); inputs hashed verbatim."""
    return _sha256_ascii(server_identity_pub, server_ephemeral_pub, nonce_c, nonce_s)


def digest_c(user_id: str, device_id: str, nonce_c: str, nonce_s: str, server_ephemeral_pub: str) -> bytes:
    """The 32 bytes the client signs (§3.5); inputs hashed verbatim."""
    return _sha256_ascii(user_id, device_id, nonce_c, nonce_s, server_ephemeral_pub)


# --- server side of one handshake ------------------------------------------------------------------
@attrs.frozen
class SessionKeys:
    """The (unused) session keys of §3.8."""

    client_to_server: bytes = attrs.field(repr=False)
    server_to_client: bytes = attrs.field(repr=False)
    web_session: bytes = attrs.field(repr=False)


class ServerHandshake:
    """Server state between ``client_hello`` and ``client_auth``: ephemeral key, nonce_s, verification."""

    def __init__(
        self,
        identity: ServerIdentity,
        hello: ClientHello,
        *,
        ephemeral_private: bytes | None = None,
        nonce_s: str | None = None,
    ) -> None:
        self._identity = identity
        self._hello = hello
        if ephemeral_private is None:
            self._ephemeral = ec.generate_private_key(ec.SECP256R1())
        else:
            self._ephemeral = ec.derive_private_key(int.from_bytes(ephemeral_private, "big"), ec.SECP256R1())
        self.nonce_s = nonce_s if nonce_s is not None else secrets.token_hex(32)
        self.server_ephemeral_pub = _p256_hex(self._ephemeral.public_key())

    def server_hello(self) -> dict[str, Any]:
        """The full ``server_hello`` message (§3.4), wrapped form."""
        digest = digest_s(self._identity.public_hex, self.server_ephemeral_pub, self._hello.nonce_c, self.nonce_s)
        return {
            "type": "server_hello",
            "payload": {
                "type": "server_hello",
                "server_ephemeral_pub": self.server_ephemeral_pub,
                "server_identity_pub": self._identity.public_hex,
                "server_signature": self._identity.sign(digest).hex(),
                "nonce_s": self.nonce_s,
            },
        }

    def verify(self, auth: ClientAuth) -> None:
        """Check ``client_signature`` over digest_c with ``user_id`` as the key (§3.5 check 6)."""
        digest = digest_c(auth.user_id, auth.device_id, self._hello.nonce_c, self.nonce_s, self.server_ephemeral_pub)
        try:
            key = load_public_key(auth.user_id)  # a small-order or non-canonical key fails too (§2)
            key.verify(bytes.fromhex(auth.client_signature), digest)
        except (ValueError, InvalidSignature):
            raise ProtocolClose(INVALID_SIGNATURE) from None

    def session_keys(self) -> SessionKeys:
        """Derive the session keys of §3.8 (no wire effect)."""
        client_pub = self._hello.client_ephemeral_pub
        shared = self._ephemeral.exchange(ec.ECDH(), _load_p256(client_pub))
        salt = hashlib.sha256(bytes.fromhex(client_pub) + bytes.fromhex(self.server_ephemeral_pub)).digest()
        c2s, s2c, web = (_hkdf(shared, salt, info) for info in _SESSION_INFOS)
        return SessionKeys(client_to_server=c2s, server_to_client=s2c, web_session=web)
