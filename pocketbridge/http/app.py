"""The HTTP side app (Quart-Trio on hypercorn): health, metrics, REST API and admin (§10).

Cross-cutting rules live here: request ids, the peer address, JSON error bodies, CORS, security headers, body
size and encoding limits. Routes are in :mod:`pocketbridge.http.routes` (one module per resource) behind the
guards of :mod:`pocketbridge.http.guards`; what they use is the :class:`HttpServices` the daemon hands in.
"""

from __future__ import annotations

import logging

import trio
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from ..errors import ApiError, StoreUnavailable
from ..limits import peer_address
from ..logs import request_id_var
from ..protocol.auth import request_id
from . import routes
from .bodies import error_response
from .guards import is_loopback
from .readiness import Readiness
from .services import STATE_KEY, AppState, HttpServices, services

__all__ = ["PROBE_TIMEOUT", "READY_CACHE_SECONDS", "create_app", "create_metrics_app", "is_loopback"]

log = logging.getLogger("pocketbridge.http")

CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = "Content-Type, Authorization, X-PB-Device-ID, X-PB-Timestamp, X-PB-Signature, X-Request-ID, X-User-ID"
CORS_EXPOSE = "X-Request-ID, Retry-After"
READY_CACHE_SECONDS = 5.0
PROBE_TIMEOUT = 3.0
HTTP_ERROR_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE",
                    415: "UNSUPPORTED_MEDIA_TYPE"}


def create_app(http_services: HttpServices) -> QuartTrio:
    app = QuartTrio("pocketbridge")
    app.url_map.merge_slashes = False  # no 308 to the merged path (see before()); set before any rule is added
    app.config["MAX_CONTENT_LENGTH"] = http_services.config.http.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    _install(app, http_services)
    app.before_request(before)
    app.after_request(after)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(StoreUnavailable, store_unavailable)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, internal_error)
    routes.register(app)
    return app


def create_metrics_app(http_services: HttpServices) -> QuartTrio:
    """The app of a separate ``[listen] metrics`` listener: /metrics only, open to any peer there."""
    app = QuartTrio("pocketbridge-metrics")
    _install(app, http_services)
    routes.register_metrics(app)
    return app


def _install(app: QuartTrio, http_services: HttpServices) -> None:
    readiness = Readiness(http_services.store, http_services.bus, READY_CACHE_SECONDS, PROBE_TIMEOUT)
    app.extensions[STATE_KEY] = AppState(http_services, readiness, trio.current_time())


async def before() -> Response | None:
    g.request_id = request_id(request.headers.get("X-Request-ID"))
    request_id_var.set(g.request_id)
    # A path with an empty segment ("//health", "/api//devices") is no route: werkzeug would serve it as the
    # path with the slashes merged (leading ones) or redirect to an absolute URL built from the Host header.
    if "//" in request.scope.get("path", "") or isinstance(request.routing_exception, RequestRedirect):
        raise ApiError("NOT_FOUND")
    svc = services()
    client = request.scope.get("client") or ("unknown", 0)
    g.peer = peer_address(client[0], request.headers.getlist("X-Forwarded-For"), svc.limits.trusted_proxies,
                          svc.config.limits.ipv6_prefix)
    if request.method == "OPTIONS":
        return Response("", status=204)
    if request.headers.get("Content-Encoding"):
        raise ApiError("UNSUPPORTED_MEDIA_TYPE")
    return None


async def after(response: Response) -> Response:
    log.info("%s %s %d", request.method, request.path, response.status_code)
    response.headers["X-Request-ID"] = getattr(g, "request_id", "") or request_id(None)
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith(("/api", "/admin")):
        response.headers["Cache-Control"] = "no-store"
    origin = request.headers.get("Origin")
    cors = services().config.http.cors_origins
    if origin and ("*" in cors or origin in cors):
        response.headers["Access-Control-Allow-Origin"] = "*" if "*" in cors else origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
        if request.method == "OPTIONS":
            response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
    return response


async def api_error(error: ApiError) -> Response:
    return error_response(error.code, error.text, error.retry_after)


async def store_unavailable(_: StoreUnavailable) -> Response:
    return error_response("SERVICE_UNAVAILABLE")  # with Retry-After (§10.1)


async def http_error(error: HTTPException) -> Response:
    status = error.code or 500
    return error_response(HTTP_ERROR_CODES.get(status, "NOT_FOUND" if status < 500 else "INTERNAL_ERROR"))


async def internal_error(error: Exception) -> Response:
    log.error("request failed: %s", type(error).__name__, exc_info=error)
    return error_response("INTERNAL_ERROR")
