"""/api/auth/token, /refresh and /verify: bearer tokens (§10.2)."""

from __future__ import annotations

import secrets

from quart import Blueprint, Response, request

from ...errors import ApiError
from ...protocol.auth import bearer_token, issue_jwt
from ..auth import Caller
from ..bodies import json_response
from ..guards import charge, public, signed_in
from ..services import services

bp = Blueprint("auth_tokens", __name__)


@bp.post("/auth/token")
@signed_in
async def token(caller: Caller) -> Response:
    if caller.via != "pb1":
        raise ApiError("AUTH_REQUIRED")
    return _issue(caller)


@bp.post("/auth/refresh")
@signed_in
async def refresh(caller: Caller) -> Response:
    return _issue(caller)


def _issue(caller: Caller) -> Response:
    svc = services()
    charge(svc.limits.http.tokens, caller.device_id, "http_token_requests")
    now_s = svc.clock.now_ms() // 1000
    ttl = int(svc.config.http.bearer_token_ttl)
    token = issue_jwt(svc.identity, device_id=caller.device_id, user_id=caller.user_id, iat=now_s,
                      exp=now_s + ttl, jti=secrets.token_hex(16))
    return json_response({"token": token, "expiresAt": (now_s + ttl) * 1000, "expiresIn": ttl * 1000})


@bp.get("/auth/verify")
@public
async def verify() -> Response:
    svc = services()
    raw = bearer_token(request.headers.get("Authorization"))
    claims = svc.authenticator().verify_bearer(raw) if raw else None
    device = await svc.store.get_device(claims.device_id) if claims else None
    if claims is None or device is None or device.revoked_at is not None or device.user_id != claims.user_id:
        return json_response({"valid": False, "error": "Invalid or expired token"})
    payload = {"user_id": claims.user_id, "device_id": claims.device_id, "iat": claims.iat, "exp": claims.exp}
    return json_response({"valid": True, "payload": payload})
