"""Who may call a route and how often (§9, §10.1, §10.2, §10.4): the wrappers around route handlers.

``@public`` routes are charged to the peer address; ``@signed_in`` routes get the authenticated
:class:`Caller` as first argument and are charged to its device; ``@admin_only`` routes need the admin key.
Every ``/api`` route answers 429 while its address has used up its failed authentications.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from ipaddress import ip_address
from typing import Concatenate, ParamSpec

from quart import Response, g, request

from ..errors import ApiError
from ..limits import KeyedBuckets
from ..protocol.auth import admin_key_matches, presented_admin_key
from .auth import Caller
from .services import HttpBuckets, services

P = ParamSpec("P")


def is_loopback(peer: str) -> bool:
    """Whether a peer key (:func:`pocketbridge.limits.peer_address`) is a loopback address. The key of a loopback
    address is the address itself; anything else (an IPv6 prefix, ``unknown``, text that is no address) is not."""
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 too


def charge(bucket: KeyedBuckets, key: str, name: str) -> None:
    """Spend one token of ``bucket`` for ``key`` or answer 429 with Retry-After (counted and audited)."""
    if not bucket.take(key):
        svc = services()
        svc.metrics.rate_limited.labels(name).inc()
        svc.audit("rate_limited", actor=None if key == g.peer else key, peer=g.peer, detail=name)
        raise ApiError("RATE_LIMITED", retry_after=max(1, math.ceil(bucket.retry_after(key))))


def _refuse_locked_out(limits: HttpBuckets, peer: str) -> None:
    """After too many failed authentications from an address, all of /api answers 429."""
    if limits.auth_failures.available(peer) < 1:
        charge(limits.auth_failures, peer, "http_auth_failures")


def public(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """An /api route without credentials."""

    @functools.wraps(handler)
    async def endpoint(*args: P.args, **kwargs: P.kwargs) -> Response:
        limits = services().limits.http
        _refuse_locked_out(limits, g.peer)
        charge(limits.unauthenticated, g.peer, "http_unauthenticated")
        return await handler(*args, **kwargs)

    return endpoint


def signed_in(handler: Callable[Concatenate[Caller, P], Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """An /api route for a PB1 signed request or a bearer token."""

    @functools.wraps(handler)
    async def endpoint(*args: P.args, **kwargs: P.kwargs) -> Response:
        return await handler(await _caller(), *args, **kwargs)

    return endpoint


async def _caller() -> Caller:
    svc = services()
    limits, peer = svc.limits.http, g.peer
    _refuse_locked_out(limits, peer)
    body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    target = request.scope.get("raw_path", request.path.encode()).decode("latin-1")  # as sent: PB1 signs it
    query = request.scope.get("query_string", b"")
    if query:
        target += "?" + query.decode("latin-1")
    headers = {k.lower(): v for k, v in request.headers.items()}
    try:
        caller = await svc.authenticator().authenticate(headers, request.method, target, body)
    except ApiError as error:
        if error.status == 401:
            if error.code == "AUTH_REQUIRED":
                charge(limits.unauthenticated, peer, "http_unauthenticated")
            limits.auth_failures.take(peer)
        raise
    charge(limits.per_device, caller.device_id, "http_requests_per_device")
    svc.store.note_seen(caller.device_id, caller.user_id)
    return caller


def admin_only(handler: Callable[P, Awaitable[Response]]) -> Callable[P, Awaitable[Response]]:
    """An /admin route: the ``[admin] api_key`` is required; failures are charged to the address and audited."""

    @functools.wraps(handler)
    async def endpoint(*args: P.args, **kwargs: P.kwargs) -> Response:
        svc = services()
        peer = g.peer
        configured = svc.config.admin.api_key
        if not configured:
            raise ApiError("ADMIN_DISABLED")
        limits = svc.limits.http
        if limits.admin_failures.available(peer) < 1:
            charge(limits.admin_failures, peer, "admin_auth_failures")
        charge(limits.admin, peer, "admin_requests")
        presented = presented_admin_key(request.headers.get("X-Admin-API-Key"), request.headers.get("Authorization"))
        if not admin_key_matches(configured, presented):
            limits.admin_failures.take(peer)
            svc.audit("admin_auth_failed", peer=peer, detail=request.path)
            raise ApiError("ADMIN_AUTH_REQUIRED")
        return await handler(*args, **kwargs)

    return endpoint
