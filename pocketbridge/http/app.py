"""The HTTP side app (Quart-Trio on hypercorn): health, metrics, REST API and admin (§10).

Cross-cutting rules live here: request ids, JSON error bodies, rate limits, CORS, security headers,
body size and encoding limits. Routes are in :mod:`pocketbridge.http.api`.
"""

from __future__ import annotations

import json
import logging
import math
from ipaddress import ip_address
from typing import Any

import trio
from prometheus_client import generate_latest
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from .. import __version__
from ..audit import audit
from ..errors import HTTP_ERRORS, ApiError
from ..gateway.context import Gateway
from ..limits import KeyedBuckets, peer_address
from ..logs import request_id_var
from ..protocol.auth import request_id

log = logging.getLogger("pocketbridge.http")

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, X-PB-Device-ID, X-PB-Timestamp, X-PB-Signature, X-Request-ID, X-User-ID"
CORS_EXPOSE = "X-Request-ID, Retry-After"
READY_CACHE_SECONDS = 5.0
SERVICE_UNAVAILABLE_RETRY_AFTER = 5  # seconds, while the store is unreachable
PROBE_TIMEOUT = 3.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the exposition format generate_latest writes


def is_loopback(peer: str) -> bool:
    """Whether a peer key (:func:`peer_address`) is a loopback address. The key of a loopback address is the
    address itself; anything else (an IPv6 prefix, ``unknown``, text that is no address) is not loopback."""
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def charge(gw: Gateway, bucket: KeyedBuckets, key: str, name: str) -> None:
    """Spend one token of ``bucket`` for ``key`` or answer 429 with Retry-After."""
    if not bucket.take(key):
        gw.metrics.rate_limited.labels(name).inc()
        audit(gw, "rate_limited", actor=None if key == g.peer else key, peer=g.peer, detail=name)
        raise ApiError("RATE_LIMITED", retry_after=max(1, math.ceil(bucket.retry_after(key))))


def error_response(code: str, text: str | None = None, retry_after: int | None = None) -> Response:
    status, default = HTTP_ERRORS[code]
    body = {"error": text or default, "code": code, "request_id": getattr(g, "request_id", None) or request_id(None)}
    if retry_after is None and code == "SERVICE_UNAVAILABLE":
        retry_after = SERVICE_UNAVAILABLE_RETRY_AFTER  # every 503 tells clients when to retry (§10.1)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status in (413, 415):
        headers["Connection"] = "close"  # the body was not read; the connection cannot be reused
    return json_response(body, status, headers or None)


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload, separators=(",", ":")), status=status, content_type="application/json",
                    headers=headers)


class Readiness:
    """Store and bus round trips, cached for a few seconds (§10.3)."""

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._checked_at = -math.inf
        self._services: dict[str, str] = {}

    async def services(self, fresh: bool = False) -> dict[str, str]:
        if fresh or trio.current_time() - self._checked_at > READY_CACHE_SECONDS:
            store = self._gw.store
            database = await self._probe(store.ping)
            if database == "connected" or store.write_failing == "storage_full":  # reads work: say if writes do not
                database = store.write_failing or ("storage_low" if store.space_low() else database)
            self._services = {"database": database, "bus": await self._probe(self._gw.bus.ping)}
            self._checked_at = trio.current_time()
        return self._services

    @staticmethod
    async def _probe(ping: Any) -> str:
        with trio.move_on_after(PROBE_TIMEOUT):
            try:
                await ping()
                return "connected"
            except Exception:
                return "disconnected"
        return "disconnected"


HINTS = {
    "database": "The database is unreachable; check [storage] settings.",
    "bus": "The message bus is unreachable; check [bus] settings.",
    "storage_full": "The disk of the database is full: events are refused (1013) until space is freed.",
    "storage_low": "Free disk is below [storage] min_free_bytes: new events are refused (STORAGE_FULL) until"
    " space is freed.",
    "write_failed": "Database writes are failing (see the log): events are refused (1013) until they work again.",
}


def create_app(gw: Gateway) -> QuartTrio:
    app = QuartTrio("pocketbridge")
    app.url_map.merge_slashes = False  # no 308 to the merged path (see before()); set before any rule is added
    app.config["MAX_CONTENT_LENGTH"] = gw.config.http.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    readiness = Readiness(gw)
    started = trio.current_time()

    @app.before_request
    async def before() -> Response | None:
        g.request_id = request_id(request.headers.get("X-Request-ID"))
        request_id_var.set(g.request_id)
        # A path with an empty segment ("//health", "/api//devices") is no route: werkzeug would serve it as the
        # path with the slashes merged (leading ones) or redirect to an absolute URL built from the Host header.
        if "//" in request.scope.get("path", "") or isinstance(request.routing_exception, RequestRedirect):
            raise ApiError("NOT_FOUND")
        client = request.scope.get("client") or ("unknown", 0)
        g.peer = peer_address(client[0], request.headers.getlist("X-Forwarded-For"), gw.limits.trusted_proxies,
                              gw.config.limits.ipv6_prefix)
        if request.method == "OPTIONS":
            return Response("", status=204)
        if request.headers.get("Content-Encoding"):
            raise ApiError("UNSUPPORTED_MEDIA_TYPE")
        return None

    @app.after_request
    async def after(response: Response) -> Response:
        log.info("%s %s %d", request.method, request.path, response.status_code)
        response.headers["X-Request-ID"] = getattr(g, "request_id", "") or request_id(None)
        response.headers["X-Content-Type-Options"] = "nosniff"
        path = request.path
        if path.startswith(("/api", "/admin")):
            response.headers["Cache-Control"] = "no-store"
        origin = request.headers.get("Origin")
        cors = gw.config.http.cors_origins
        if origin and ("*" in cors or origin in cors):
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors else origin
            response.headers["Vary"] = "Origin"
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        return error_response(error.code, error.text, error.retry_after)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}
        return error_response(code.get(error.code or 500, "NOT_FOUND" if (error.code or 500) < 500 else "INTERNAL_ERROR"))

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        log.error("request failed: %s", type(error).__name__, exc_info=error)
        return error_response("INTERNAL_ERROR")

    # --- health and metrics ----------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        services = await readiness.services()
        body: dict[str, Any] = {
            "status": "ok",
            "timestamp": gw.clock.now_ms(),
            "uptime": round(trio.current_time() - started, 1),
            "services": services,
            "version": __version__,
        }
        down = [name for name, state in services.items() if state != "connected"]
        if not down:
            return json_response(body)
        body["status"] = "degraded"
        body["hint"] = " ".join(HINTS.get(services[name], HINTS[name]) for name in down)
        return json_response(body, 503, {"Retry-After": "30"})

    @app.get("/health/live")
    async def live() -> Response:
        return json_response({"status": "ok"})

    @app.get("/health/ready")
    async def ready() -> Response:
        if gw.draining:
            return json_response({"status": "draining"}, 503, {"Retry-After": "5"})
        services = await readiness.services()
        if all(state == "connected" for state in services.values()):
            return json_response({"status": "ready"})
        return json_response({"status": "not_ready", "services": services}, 503, {"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if gw.config.listen.metrics or not is_loopback(g.peer):
            raise ApiError("NOT_FOUND")
        return Response(generate_latest(gw.metrics.registry), content_type=METRICS_CONTENT_TYPE)

    from .api import register

    register(app, gw)
    return app


def create_metrics_app(gw: Gateway) -> QuartTrio:
    """The app of a separate ``[listen] metrics`` listener: /metrics only, open to any peer there."""
    app = QuartTrio("pocketbridge-metrics")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), content_type=METRICS_CONTENT_TYPE)

    return app
