"""/api/devices: the caller's devices; rename and removal (§10.3)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, g

from ...accounts import USER_REVOKED
from ...errors import ApiError
from ...protocol.envelope import is_uuid4
from ...protocol.handshake import device_name_has_invalid_chars
from ...store import Device, Rename
from ..auth import Caller
from ..bodies import json_body, json_response
from ..guards import charge, signed_in
from ..services import services

EMPTY_MESSAGE = "No devices connected. Connect a device to start syncing."

bp = Blueprint("devices", __name__)


def device_info(device: Device, caller: Caller) -> dict[str, Any]:
    info: dict[str, Any] = {"device_id": device.device_id}
    if device.device_name is not None:
        info["device_name"] = device.device_name
    if device.device_type is not None:
        info["device_type"] = device.device_type
    info.update(
        is_online=device.is_online,
        last_seen=device.last_seen or device.registered_at,
        registered_at=device.registered_at,
        is_current=device.device_id == caller.device_id,
    )
    return info


def path_device_id(raw: str) -> str:
    if not is_uuid4(raw):
        raise ApiError("INVALID_DEVICE_ID")
    return raw.lower()


async def own_device(caller: Caller, device_id: str) -> Device:
    device = await services().store.get_device(path_device_id(device_id))
    if device is None or device.user_id != caller.user_id or device.revoked_at is not None:
        raise ApiError("DEVICE_NOT_FOUND")
    return device


@bp.get("/devices")
@signed_in
async def list_devices(caller: Caller) -> Response:
    store = services().store
    devices = await store.list_devices(caller.user_id)
    devices.sort(key=lambda d: (d.is_online, d.last_seen or d.registered_at), reverse=True)
    body: dict[str, Any] = {
        "devices": [device_info(d, caller) for d in devices],
        "count": len(devices),
        "is_empty": not devices,
        "user_id": caller.user_id,
    }
    profile = await store.get_profile(caller.user_id)
    if profile.display_name:
        body["user_display_name"] = profile.display_name
    if not devices:
        body["message"] = EMPTY_MESSAGE
    return json_response(body)


@bp.get("/devices/<device_id>")
@signed_in
async def get_device(caller: Caller, device_id: str) -> Response:
    return json_response(device_info(await own_device(caller, device_id), caller))


@bp.post("/devices/<device_id>/rename")
@signed_in
async def rename(caller: Caller, device_id: str) -> Response:
    svc = services()
    target = path_device_id(device_id)
    body = await json_body()
    charge(svc.limits.http.device_mutations, caller.user_id, "http_device_mutations")
    name = body.get("device_name")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 50:
        raise ApiError("INVALID_DEVICE_NAME")
    name = name.strip()
    if device_name_has_invalid_chars(name):  # the handshake's rule (§3.6), strict here
        raise ApiError("INVALID_DEVICE_NAME", "Device name contains invalid characters")
    outcome = await svc.store.rename_device(caller.user_id, target, name)
    if outcome is Rename.NOT_FOUND:
        raise ApiError("DEVICE_NOT_FOUND")
    if outcome is Rename.TAKEN:
        raise ApiError("DEVICE_NAME_TAKEN")
    svc.audit("device_renamed", actor=caller.device_id, target=target, peer=g.peer)
    return json_response({"success": True, "device_id": target, "device_name": name})


@bp.delete("/devices/<device_id>")
@signed_in
async def delete_device(caller: Caller, device_id: str) -> Response:
    svc = services()
    device = await own_device(caller, device_id)
    charge(svc.limits.http.device_mutations, caller.user_id, "http_device_mutations")
    await svc.accounts.revoke_device(device.device_id, USER_REVOKED, caller.user_id, actor=caller.device_id,
                                     peer=g.peer)
    return json_response({"success": True, "message": f"Device {device.device_id} has been removed"})
