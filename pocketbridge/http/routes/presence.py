"""/api/presence: which of the caller's devices are online (§10.3)."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from ..auth import Caller
from ..bodies import json_response
from ..guards import signed_in
from ..services import services
from .devices import EMPTY_MESSAGE

bp = Blueprint("presence", __name__)


@bp.get("/presence")
@signed_in
async def presence(caller: Caller) -> Response:
    devices = sorted(await services().store.list_devices(caller.user_id), key=lambda d: d.last_seen or 0,
                     reverse=True)
    body: dict[str, Any] = {
        "user_id": caller.user_id,
        "devices": [
            {"device_id": d.device_id, "device_name": d.device_name, "is_online": d.is_online,
             "last_seen": d.last_seen or d.registered_at}
            for d in devices
        ],
        "online_count": sum(d.is_online for d in devices),
        "total_count": len(devices),
        "is_empty": not devices,
    }
    if not devices:
        body["message"] = EMPTY_MESSAGE
    return json_response(body)
