"""/health, /health/live and /health/ready (§10.3)."""

from __future__ import annotations

from typing import Any

import trio
from quart import Blueprint, Response

from ... import __version__
from ..bodies import json_response
from ..services import state

bp = Blueprint("health", __name__)

HINTS = {
    "database": "The database is unreachable; check [storage] settings.",
    "bus": "The message bus is unreachable; check [bus] settings.",
    "storage_full": "The disk of the database is full: events are refused (1013) until space is freed.",
    "storage_low": "Free disk is below [storage] min_free_bytes: new events are refused (STORAGE_FULL) until"
    " space is freed.",
    "write_failed": "Database writes are failing (see the log): events are refused (1013) until they work again.",
}


@bp.get("/health")
async def health() -> Response:
    app = state()
    services = await app.readiness.services()
    body: dict[str, Any] = {
        "status": "ok",
        "timestamp": app.services.clock.now_ms(),
        "uptime": round(trio.current_time() - app.started, 1),  # seconds (the spec fixes the name)
        "services": services,
        "version": __version__,
    }
    down = [name for name, status in services.items() if status != "connected"]
    if not down:
        return json_response(body)
    body["status"] = "degraded"
    body["hint"] = " ".join(HINTS.get(services[name], HINTS[name]) for name in down)
    return json_response(body, 503, {"Retry-After": "30"})


@bp.get("/health/live")
async def live() -> Response:
    return json_response({"status": "ok"})


@bp.get("/health/ready")
async def ready() -> Response:
    app = state()
    if app.services.draining:
        return json_response({"status": "draining"}, 503, {"Retry-After": "5"})
    services = await app.readiness.services()
    if all(status == "connected" for status in services.values()):
        return json_response({"status": "ready"})
    return json_response({"status": "not_ready", "services": services}, 503, {"Retry-After": "5"})
