"""Ed25519 public keys taken from clients (protocol.md §2). Pure.

Every public key the server verifies a signature with is loaded by :func:`load_public_key`. The library
accepts any 32 bytes and verifies cofactorless, so for a key of small order the signature R = identity, S = 0
(and similar) verifies for every message: anyone could act as that user. Refused here:

* non-canonical encodings: y ≥ p = 2^255 − 19 (and "−0", x = 0 with the sign bit set, which only the small-order
  points y = 1 and y = p − 1 have);
* the 8 points of small order (orders 1, 2, 4, 8) in every encoding: y ∈ {1, p − 1, 0, ±Y8}, either sign bit —
  the blocklist of libsodium and "Taming the many EdDSAs";
* 32 bytes that are no point of the curve at all.

Keys of mixed order (an ordinary key plus a torsion point) are not refused: only the owner of the private key
can sign for them.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

P = 2**255 - 19
_D = -121665 * pow(121666, -1, P) % P
_Y8 = 0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826  # y of two order-8 points; p − Y8 the others
SMALL_ORDER_Y = frozenset({1, P - 1, 0, _Y8, P - _Y8})  # orders 1, 2, 4, 8, 8
_SIGN_BIT = 1 << 255


def key_is_acceptable(raw: bytes) -> bool:
    """Whether 32 bytes are a canonical encoding of a curve point that is not of small order."""
    if len(raw) != 32:
        return False
    y = int.from_bytes(raw, "little") & ~_SIGN_BIT
    if y >= P or y in SMALL_ORDER_Y:
        return False
    # a point exists iff x² = (y² − 1) / (d·y² + 1) is a square mod p (Euler's criterion; the denominator is never 0)
    xx = (y * y - 1) * pow(_D * y * y + 1, -1, P) % P
    return xx == 0 or pow(xx, (P - 1) // 2, P) == 1


def load_public_key(key_hex: str) -> Ed25519PublicKey:
    """The key of 64 hex digits (any case); ValueError if it is not hex, not 32 bytes or not acceptable."""
    raw = bytes.fromhex(key_hex) if isinstance(key_hex, str) and key_hex.isascii() else b""
    if not key_is_acceptable(raw):
        raise ValueError("not an acceptable Ed25519 public key")
    return Ed25519PublicKey.from_public_bytes(raw)
