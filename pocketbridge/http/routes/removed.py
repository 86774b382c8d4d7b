"""/api/pairing and below: removed; pairing is over the WebSocket now (410 GONE)."""

from __future__ import annotations

from quart import Blueprint, Response

from ...errors import ApiError
from ..guards import public

ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

bp = Blueprint("removed", __name__)


@public
async def gone(rest: str = "") -> Response:
    raise ApiError("GONE")


bp.add_url_rule("/pairing", view_func=gone, methods=ALL_METHODS)
bp.add_url_rule("/pairing/<path:rest>", view_func=gone, methods=ALL_METHODS)
