"""/admin: revocation, the audit trail (§10.4). Every route needs ``[admin] api_key``."""

from __future__ import annotations

from typing import Any

import attrs
from quart import Blueprint, Response, g, request

from ...accounts import ADMIN_REVOKED
from ...errors import ApiError
from ...protocol.envelope import is_hex, is_uuid4
from ...store import Device, Unrevoke
from ..bodies import json_body, json_response
from ..guards import admin_only
from ..services import services

bp = Blueprint("admin", __name__)


def _field(body: dict[str, Any], name: str, legacy: str) -> Any:
    """``name`` (snake_case, like the rest of the API), or its original camelCase spelling."""
    return body.get(name, body.get(legacy))


def _device_id(body: dict[str, Any]) -> str:
    device_id = _field(body, "device_id", "deviceId")
    if not isinstance(device_id, str) or not is_uuid4(device_id):
        raise ApiError("VALIDATION_ERROR")
    return device_id.lower()


@bp.post("/revoke-device")
@admin_only
async def revoke_device() -> Response:
    body = await json_body()
    device_id = _device_id(body)
    reason, user_id = body.get("reason"), _field(body, "user_id", "userId")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 200):
        raise ApiError("VALIDATION_ERROR")
    if user_id is not None and not is_hex(user_id, 64):
        raise ApiError("VALIDATION_ERROR")
    device = await services().accounts.revoke_device(device_id, reason or ADMIN_REVOKED,
                                                     user_id.lower() if user_id else None, actor="admin", peer=g.peer)
    if device is None:
        raise ApiError("DEVICE_NOT_FOUND")
    return json_response({"success": True, "message": "Device revoked"})


@bp.post("/unrevoke-device")
@admin_only
async def unrevoke_device() -> Response:
    svc = services()
    device_id = _device_id(await json_body())
    outcome = await svc.store.unrevoke_device(device_id, svc.config.limits.max_devices_per_user)
    if outcome is Unrevoke.NOT_FOUND:
        raise ApiError("DEVICE_NOT_FOUND")
    if outcome is Unrevoke.LIMIT:
        raise ApiError("DEVICE_LIMIT")
    svc.audit("device_unrevoked", actor="admin", target=device_id, peer=g.peer)
    return json_response({"success": True, "message": "Device unrevoked"})


@bp.get("/audit")
@admin_only
async def audit() -> Response:
    raw_limit, action = request.args.get("limit", "100"), request.args.get("action")
    since = request.args.get("since", "0")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 1000 or (action is not None and len(action) > 64):
        raise ApiError("VALIDATION_ERROR")
    if not since.isdigit() or len(since) > 16:
        raise ApiError("VALIDATION_ERROR")
    records = await services().store.audit_log(int(raw_limit), action)
    return json_response({"records": [attrs.asdict(r) for r in records if r.at >= int(since)]})


def _limit() -> int:
    raw = request.args.get("limit", "100")
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ApiError("VALIDATION_ERROR")
    return int(raw)


def _device(d: Device) -> dict[str, Any]:
    return {"device_id": d.device_id, "user_id": d.user_id, "device_name": d.device_name,
            "device_type": d.device_type, "registered_at": d.registered_at, "last_seen": d.last_seen,
            "is_online": d.is_online, "revoked_at": d.revoked_at}


@bp.get("/users")
@admin_only
async def users() -> Response:
    rows = await services().store.list_users(_limit())
    return json_response({"users": [attrs.asdict(u) for u in rows]})


@bp.get("/users/<user_id>/devices")
@admin_only
async def user_devices(user_id: str) -> Response:
    if not is_hex(user_id, 64):
        raise ApiError("VALIDATION_ERROR")
    rows = await services().store.all_devices(user_id.lower(), 1000)
    return json_response({"devices": [_device(d) for d in rows]})


@bp.get("/devices")
@admin_only
async def devices() -> Response:
    rows = await services().store.all_devices(None, _limit())
    return json_response({"devices": [_device(d) for d in rows]})


@bp.get("/revoked-devices")
@admin_only
async def revoked_devices() -> Response:
    user_id = request.args.get("user_id", request.args.get("userId"))
    if user_id is not None and not is_hex(user_id, 64):
        raise ApiError("VALIDATION_ERROR")
    rows = await services().store.revoked_devices(user_id.lower() if user_id else None, 1000)
    return json_response({"revoked": [{"device_id": r.device_id, "user_id": r.user_id, "revoked_at": r.revoked_at,
                                       "reason": r.reason} for r in rows]})
