"""Who is calling: PB1 signed requests, bearer tokens (§10.2) and the admin key (§10.4).

Every failure is an ApiError with the spec's code; the caller's peer address is charged for it.
"""

from __future__ import annotations

import attrs

from ..errors import ApiError, StoreUnavailable
from ..gateway.context import Gateway
from ..protocol.auth import (
    JwtClaims,
    bearer_token,
    parse_pb1_headers,
    timestamp_ok,
    verify_jwt,
    verify_pb1,
)
from ..protocol.keys import key_is_acceptable
from ..store import Device

PB1_HEADERS = ("x-pb-device-id", "x-pb-timestamp", "x-pb-signature")


@attrs.frozen
class Caller:
    device: Device
    via: str  # "pb1" or "bearer"

    @property
    def user_id(self) -> str:
        return self.device.user_id

    @property
    def device_id(self) -> str:
        return self.device.device_id


async def authenticate(
    gw: Gateway, headers: dict[str, str], method: str, target: str, body: bytes
) -> Caller:
    """PB1 if any X-PB-* header is present, else a bearer token, else 401 AUTH_REQUIRED."""
    if any(h in headers for h in PB1_HEADERS):
        return await _pb1(gw, headers, method, target, body)
    token = bearer_token(headers.get("authorization"))
    if token is not None:
        claims = verify_bearer(gw, token)
        if claims is None:
            raise ApiError("INVALID_TOKEN")
        device = await _device(gw, claims.device_id)
        if (device is None or device.revoked_at is not None or device.user_id != claims.user_id
                or not key_is_acceptable(bytes.fromhex(device.bound_key))):  # a token issued before §2's key check
            raise ApiError("INVALID_TOKEN")
        return Caller(device, "bearer")
    raise ApiError("AUTH_REQUIRED")


def verify_bearer(gw: Gateway, token: str) -> JwtClaims | None:
    return verify_jwt(
        gw.identity.public_hex, token, now_s=gw.clock.now_ms() // 1000, skew_s=int(gw.config.limits.clock_skew)
    )


async def _device(gw: Gateway, device_id: str) -> Device | None:
    try:
        return await gw.store.get_device(device_id.lower())
    except StoreUnavailable:
        raise ApiError("SERVICE_UNAVAILABLE") from None


async def _pb1(gw: Gateway, headers: dict[str, str], method: str, target: str, body: bytes) -> Caller:
    parsed = parse_pb1_headers(
        headers.get("x-pb-device-id"), headers.get("x-pb-timestamp"), headers.get("x-pb-signature")
    )
    if parsed is None:
        raise ApiError("INVALID_AUTH_HEADERS")
    skew_ms = int(gw.config.limits.clock_skew * 1000)
    if not timestamp_ok(parsed.timestamp, gw.clock.now_ms(), skew_ms):
        raise ApiError("TIMESTAMP_OUT_OF_RANGE")
    device = await _device(gw, parsed.device_id)
    if device is None or not verify_pb1(device.bound_key, parsed, method, target, body):
        raise ApiError("INVALID_SIGNATURE")
    try:
        fresh = await gw.store.remember_signature(parsed.signature.lower(), int(parsed.timestamp) + skew_ms)
    except StoreUnavailable:
        raise ApiError("SERVICE_UNAVAILABLE") from None
    if not fresh:
        raise ApiError("REPLAYED_REQUEST")
    if device.revoked_at is not None:
        raise ApiError("DEVICE_REVOKED")
    return Caller(device, "pb1")
