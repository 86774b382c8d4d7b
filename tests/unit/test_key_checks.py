"""Which Ed25519 public keys are accepted as user ids (protocol.md §2).

A key of small order (the identity, the order-2 point, the order-4 and order-8 points) lets anyone sign for it:
with R = identity and S = 0 the verification equation [S]B = R + [k]A holds whenever [k]A is the identity, and
the library's verify() accepts that. Such keys, and any non-canonical encoding (y ≥ p), are refused wherever a
key is accepted. The torsion points are derived here independently (group arithmetic), not from the blocklist.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pocketbridge.errors import INVALID_SIGNATURE, ProtocolClose
from pocketbridge.protocol.auth import PB1Headers, pb1_string, sign_pb1, verify_jwt, verify_pb1
from pocketbridge.protocol.handshake import ClientAuth, ClientHello, ServerHandshake, ServerIdentity, digest_c
from pocketbridge.protocol.keys import key_is_acceptable, load_public_key

# --- a little Edwards arithmetic (affine), only for deriving the test points -------------------------------
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493  # order of the prime subgroup
D = -121665 * pow(121666, -1, P) % P
IDENTITY = (0, 1)


def add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def mul(k: int, point: tuple[int, int]) -> tuple[int, int]:
    out = IDENTITY
    while k:
        if k & 1:
            out = add(out, point)
        point = add(point, point)
        k >>= 1
    return out


def x_of(y: int) -> int | None:
    """An x with (x, y) on the curve (either sign), or None."""
    xx = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    return x if (x * x - xx) % P == 0 else None


def encode(point: tuple[int, int], *, y_offset: int = 0, flip_sign: bool = False) -> bytes:
    x, y = point
    return ((y + y_offset) | (((x & 1) ^ flip_sign) << 255)).to_bytes(32, "little")


def torsion_points() -> list[tuple[int, int]]:
    """The 8 points of small order: the multiples of an order-8 point found as [L]Q for some curve point Q."""
    y = 2
    while True:
        x = x_of(y)
        if x is not None:
            t = mul(L, (x, y))
            if mul(4, t) != IDENTITY:  # order exactly 8
                points = [mul(k, t) for k in range(8)]
                assert len(set(points)) == 8 and all(mul(8, q) == IDENTITY for q in points)
                return points
        y += 1


TORSION = torsion_points()


def small_order_encodings() -> dict[str, bytes]:
    """Every encoding of a small-order point: canonical, "-0" (x = 0 with the sign bit set) and y + p (< 2^255);
    the two order-4 points share y, so their y + p encodings coincide (listed once)."""
    out: dict[str, bytes] = {}
    for k, point in enumerate(TORSION):
        order = next(n for n in (1, 2, 4, 8) if mul(n, point) == IDENTITY)
        out[f"{k}T order {order}"] = encode(point)
        if point[0] == 0:
            out[f"{k}T order {order}, sign bit set"] = encode(point, flip_sign=True)
        if point[1] + P < 2**255:
            out[f"{k}T order {order}, y + p"] = encode(point, y_offset=P)
            out[f"{k}T order {order}, y + p, sign bit flipped"] = encode(point, y_offset=P, flip_sign=True)
    unique: dict[bytes, str] = {}
    for name, raw in out.items():
        unique.setdefault(raw, name)
    return {name: raw for raw, name in unique.items()}


SMALL_ORDER = small_order_encodings()
FORGED_SIGNATURE = (bytes([1]) + bytes(31) + bytes(32)).hex()  # R = identity, S = 0

# RFC 8032 §7.1 test vectors 1-3 (public keys)
RFC8032_KEYS = [
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
]


def test_the_derived_torsion_points_are_the_well_known_ones() -> None:
    assert len(SMALL_ORDER) == 14  # 8 canonical, 2 "-0", 4 with y + p
    assert SMALL_ORDER["0T order 1"].hex() == "01" + "00" * 31
    assert SMALL_ORDER["4T order 2"].hex() == "ec" + "ff" * 30 + "7f"
    assert {enc.hex() for enc in SMALL_ORDER.values()} >= {
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000080",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    }


def test_the_library_alone_accepts_a_forged_signature_for_the_identity_key() -> None:
    """Why the check exists: anyone can "sign" any message for this key."""
    key = Ed25519PublicKey.from_public_bytes(SMALL_ORDER["0T order 1"])
    key.verify(bytes.fromhex(FORGED_SIGNATURE), b"any message at all")  # does not raise


@pytest.mark.parametrize("name", list(SMALL_ORDER))
def test_small_order_keys_are_refused(name: str) -> None:
    raw = SMALL_ORDER[name]
    assert not key_is_acceptable(raw)
    with pytest.raises(ValueError):
        load_public_key(raw.hex())
    with pytest.raises(ValueError):
        load_public_key(raw.hex().upper())


@pytest.mark.parametrize("y", [P + i for i in range(19)])
@pytest.mark.parametrize("sign", [0, 1])
def test_non_canonical_encodings_are_refused(y: int, sign: int) -> None:
    raw = (y | sign << 255).to_bytes(32, "little")
    assert not key_is_acceptable(raw)
    with pytest.raises(ValueError):
        load_public_key(raw.hex())


def test_a_y_that_is_on_no_point_is_refused() -> None:
    y = next(y for y in range(2, 100) if x_of(y) is None)
    assert not key_is_acceptable(y.to_bytes(32, "little"))


@pytest.mark.parametrize("text", ["", "00", "zz" * 32, "01" * 31, "01" * 33, "d75a98 " * 9])
def test_not_32_bytes_of_hex_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        load_public_key(text)
    if len(text) % 2 == 0 and all(c in "0123456789abcdef" for c in text):
        assert not key_is_acceptable(bytes.fromhex(text))


@pytest.mark.parametrize("key_hex", RFC8032_KEYS)
def test_the_rfc_8032_keys_are_accepted(key_hex: str) -> None:
    assert key_is_acceptable(bytes.fromhex(key_hex))
    assert load_public_key(key_hex).public_bytes_raw().hex() == key_hex
    assert load_public_key(key_hex.upper()).public_bytes_raw().hex() == key_hex


def test_ordinary_keys_are_accepted() -> None:
    for _ in range(200):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert key_is_acceptable(raw), raw.hex()


def test_a_mixed_order_key_is_not_refused() -> None:
    """An ordinary key plus a torsion point is a valid key of its own (only its owner can sign for it)."""
    x = x_of(9)
    assert x is not None and mul(L, (x, 9)) != IDENTITY
    assert key_is_acceptable(encode((x, 9)))


# --- every place that takes a key goes through the check ----------------------------------------------------
def _forged_handshake(user_id: str, device_id: str) -> tuple[ServerHandshake, str]:
    """A handshake and a signature without any private key that the library alone accepts for ``user_id``.

    With S = 0 the library checks R = −[k]A, k = H(R ‖ A ‖ digest): for the identity R = identity always works;
    for the order-2 point R must be the identity when k is even and A when k is odd, so nonce_s is varied until
    one of the two fits."""
    hello = ClientHello(client_ephemeral_pub="04" + "00" * 64, nonce_c="aa" * 32)
    identity = ServerIdentity.generate()
    public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(user_id))
    for attempt in range(256):
        handshake = ServerHandshake(identity, hello, nonce_s=f"{attempt:064x}")
        digest = digest_c(user_id, device_id, hello.nonce_c, handshake.nonce_s, handshake.server_ephemeral_pub)
        for r in (FORGED_SIGNATURE[:64], user_id):
            signature = r + "00" * 32
            try:
                public.verify(bytes.fromhex(signature), digest)
            except InvalidSignature:
                continue
            return handshake, signature
    raise AssertionError("no forged signature found")


@pytest.mark.parametrize("name", ["0T order 1", "4T order 2"])
def test_the_handshake_refuses_a_small_order_user_id_with_a_forged_signature(name: str) -> None:
    device_id = "550e8400-e29b-41d4-a716-446655440000"
    user_id = SMALL_ORDER[name].hex()
    handshake, signature = _forged_handshake(user_id, device_id)
    auth = ClientAuth(user_id, device_id, signature, "cc" * 32, None, None)
    with pytest.raises(ProtocolClose) as exc:
        handshake.verify(auth)
    assert exc.value.close == INVALID_SIGNATURE


def test_pb1_refuses_a_small_order_bound_key_with_the_forged_signature() -> None:
    headers = PB1Headers(device_id="550e8400-e29b-41d4-a716-446655440000", timestamp="1760000000000",
                         signature=FORGED_SIGNATURE)
    identity_key = SMALL_ORDER["0T order 1"]
    message = pb1_string("GET", "/api/devices", headers.timestamp, headers.device_id, b"")
    Ed25519PublicKey.from_public_bytes(identity_key).verify(bytes.fromhex(FORGED_SIGNATURE), message)
    assert not verify_pb1(identity_key.hex(), headers, "GET", "/api/devices", b"")


def test_pb1_still_accepts_an_ordinary_key() -> None:
    seed = hashlib.sha256(b"pb1 seed").digest()
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw().hex()
    sig = sign_pb1(seed, "GET", "/api/devices", "1760000000000", "550e8400-e29b-41d4-a716-446655440000", b"")
    headers = PB1Headers("550e8400-e29b-41d4-a716-446655440000", "1760000000000", sig)
    assert verify_pb1(public, headers, "GET", "/api/devices", b"")


def test_a_jwt_under_a_small_order_server_key_is_refused() -> None:
    def b64u(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"iss": "pocketbridge", "sub": "550e8400-e29b-41d4-a716-446655440000", "user_id": "ab" * 32,
              "iat": 1000, "exp": 2000, "jti": "cd" * 16}
    token = ".".join((b64u(b'{"alg":"EdDSA","typ":"JWT"}'), b64u(json.dumps(claims).encode()),
                      b64u(bytes.fromhex(FORGED_SIGNATURE))))
    assert verify_jwt(SMALL_ORDER["0T order 1"].hex(), token, now_s=1500, skew_s=0) is None
