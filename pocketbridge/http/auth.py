"""Who is calling: PB1 signed requests and bearer tokens (§10.2).

Every failure is an ApiError with the spec's code; the guards charge the caller's peer address for it.
"""

from __future__ import annotations

import attrs

from ..clock import Clock
from ..errors import ApiError, StoreUnavailable
from ..protocol.auth import (
    JwtClaims,
    bearer_token,
    parse_pb1_headers,
    timestamp_ok,
    verify_jwt,
    verify_pb1,
)
from ..protocol.keys import key_is_acceptable
from ..store import Device, Store

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


@attrs.frozen
class Authenticator:
    store: Store
    clock: Clock
    server_key: str  # the public key (hex) of the server identity that signs bearer tokens
    clock_skew: float  # seconds ([limits] clock_skew)

    async def authenticate(self, headers: dict[str, str], method: str, target: str, body: bytes) -> Caller:
        """PB1 if any X-PB-* header is present, else a bearer token, else 401 AUTH_REQUIRED.

        ``headers`` has lower-case names; ``target`` is the request-target as sent."""
        if any(h in headers for h in PB1_HEADERS):
            return await self._pb1(headers, method, target, body)
        token = bearer_token(headers.get("authorization"))
        if token is not None:
            claims = self.verify_bearer(token)
            if claims is None:
                raise ApiError("INVALID_TOKEN")
            device = await self._device(claims.device_id)
            if (device is None or device.revoked_at is not None or device.user_id != claims.user_id
                    or not key_is_acceptable(bytes.fromhex(device.bound_key))):  # a token issued before §2's check
                raise ApiError("INVALID_TOKEN")
            return Caller(device, "bearer")
        raise ApiError("AUTH_REQUIRED")

    def verify_bearer(self, token: str) -> JwtClaims | None:
        return verify_jwt(self.server_key, token, now_s=self.clock.now_ms() // 1000, skew_s=int(self.clock_skew))

    async def _device(self, device_id: str) -> Device | None:
        try:
            return await self.store.get_device(device_id.lower())
        except StoreUnavailable:
            raise ApiError("SERVICE_UNAVAILABLE") from None

    async def _pb1(self, headers: dict[str, str], method: str, target: str, body: bytes) -> Caller:
        parsed = parse_pb1_headers(
            headers.get("x-pb-device-id"), headers.get("x-pb-timestamp"), headers.get("x-pb-signature")
        )
        if parsed is None:
            raise ApiError("INVALID_AUTH_HEADERS")
        skew_ms = int(self.clock_skew * 1000)
        if not timestamp_ok(parsed.timestamp, self.clock.now_ms(), skew_ms):
            raise ApiError("TIMESTAMP_OUT_OF_RANGE")
        device = await self._device(parsed.device_id)
        if device is None or not verify_pb1(device.bound_key, parsed, method, target, body):
            raise ApiError("INVALID_SIGNATURE")
        try:
            fresh = await self.store.remember_signature(parsed.signature.lower(), int(parsed.timestamp) + skew_ms)
        except StoreUnavailable:
            raise ApiError("SERVICE_UNAVAILABLE") from None
        if not fresh:
            raise ApiError("REPLAYED_REQUEST")
        if device.revoked_at is not None:
            raise ApiError("DEVICE_REVOKED")
        return Caller(device, "pb1")
