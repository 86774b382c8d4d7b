"""/api/events/files: the caller's file history, a page at a time (§10.3)."""

from __future__ import annotations

import re

from quart import Blueprint, Response, request

from ...errors import ApiError
from ..auth import Caller
from ..bodies import json_response
from ..guards import signed_in
from ..services import services

FIELDS = ("event_id", "device_id", "stream_id", "stream_seq", "type", "encrypted_payload", "payload_size",
          "created_at")

bp = Blueprint("files", __name__)


def _number(name: str, default: int) -> int | None:
    """The query argument ``name`` (``default`` when absent), or None if it is no integer."""
    raw = request.args.get(name)
    if raw is None:
        return default
    return int(raw) if re.fullmatch(r"-?[0-9]{1,15}", raw) else None


@bp.get("/events/files")
@signed_in
async def file_events(caller: Caller) -> Response:
    svc = services()
    limit, offset = _number("limit", 50), _number("offset", 0)
    if limit is None or offset is None or offset < 0:
        raise ApiError("VALIDATION_ERROR")
    limit = min(100, max(1, limit))
    events, total = await svc.store.file_events(caller.user_id, limit, offset, svc.clock.now_ms())
    out = []
    for e in events:
        item = e.wire()
        item.pop("user_id")
        item.pop("device_seq")
        item.pop("ttl", None)
        item["payload_size"] = e.payload_size
        out.append({k: item[k] for k in FIELDS})
    pagination = {"limit": limit, "offset": offset, "total": total, "hasMore": offset + len(out) < total}
    return json_response({"events": out, "pagination": pagination})
