"""The server identity key file: an Ed25519 private key in PKCS#8 PEM, mode 0600.

Created once (``pocketbridge keygen`` or the first ``serve``) and never regenerated: clients pin the
public key. Every instance of a deployment must share the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import IdentityError
from .protocol.handshake import ServerIdentity


def write_new_identity(path: Path) -> ServerIdentity:
    """Generate a key and write it to ``path`` (0600); refuses to overwrite an existing file."""
    identity = ServerIdentity.generate()
    pem = Ed25519PrivateKey.from_private_bytes(identity.seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise IdentityError(f"{path} already exists; refusing to overwrite the server identity key") from None
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return identity


def load_identity(path: Path) -> ServerIdentity:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read the server identity key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{path} is not a PEM Ed25519 private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a key that is not Ed25519")
    return ServerIdentity.from_seed(key.private_bytes_raw())


def load_or_create_identity(path: Path) -> tuple[ServerIdentity, bool]:
    """The identity at ``path``, creating it on first start; returns (identity, created)."""
    if path.exists():
        return load_identity(path), False
    return write_new_identity(path), True
