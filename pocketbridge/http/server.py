"""Serve the HTTP app with hypercorn inside the daemon's nursery."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..config import Config
from .app import create_app, create_metrics_app
from .services import HttpServices

log = logging.getLogger("pocketbridge.http")
RESTART_DELAY = 0.1  # seconds before a failed HTTP listener is started again
MAX_REQUEST_HEAD = 16 * 1024  # bytes: an HTTP/1.1 request head still incomplete past this is refused
MAX_H2_HEADER_LIST = 64 * 1024  # bytes: what the h2 library enforces on an HTTP/2 header list whatever is advertised


def _hypercorn_config(bind: tuple[str, int], config: Config) -> HypercornConfig:
    host, port = bind
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("pocketbridge.http.server")
    cfg.graceful_timeout = config.drain.window
    cfg.keep_alive_timeout = config.http.keep_alive_timeout
    cfg.include_server_header = False
    # hypercorn has no switch to turn off cleartext HTTP/2 (prior knowledge, or Upgrade: h2c): bound it like
    # HTTP/1.1 instead, one request at a time per connection; the body limit and rate limits are the app's
    cfg.h11_max_incomplete_size = MAX_REQUEST_HEAD
    cfg.h2_max_concurrent_streams = 1
    cfg.h2_max_header_list_size = MAX_H2_HEADER_LIST
    return cfg


async def _serve_supervised(
    app: Any, cfg: HypercornConfig, shutdown: Callable[[], Awaitable[None]], *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """hypercorn's ``serve``, started again on the same address if a connection's error ends it.

    hypercorn 0.18 lets some malformed HTTP/2 input (cleartext HTTP/2 cannot be turned off through its
    public API) raise out of its server; that must cost the requests in flight on this listener, never
    the daemon."""
    started = False
    while True:
        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(serve, closing_sends(app), cfg, shutdown_trigger=shutdown))
                if not started:
                    started = True
                    # a restart binds the same port, even when the configured one was 0 (ephemeral)
                    cfg.bind = [binds[0].split("://", 1)[-1]]
                    task_status.started(binds)
            return  # an orderly shutdown
        except Exception as exc:
            if not started:
                raise
            log.warning("the HTTP listener failed (%s); restarting it", _describe(exc))
            await trio.sleep(RESTART_DELAY)


def closing_sends(app: Any) -> Any:
    """The ASGI app with every ``send`` shielded from cancellation.

    quart-trio cancels a request's tasks when its receive side sees ``http.disconnect``, which hypercorn
    puts while the final body ``send`` is still closing the connection (``Connection: close``, or the
    keep-alive bookkeeping): the cancellation cut that short and the socket was never closed, so every
    connection that made a request stayed open for good. hypercorn already shields its socket writes, so
    this adds no wait that could not be cancelled before."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        async def shielded_send(message: Any) -> None:
            with trio.CancelScope(shield=True):
                await send(message)

        await app(scope, receive, shielded_send)

    return asgi


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return ", ".join(_describe(e) for e in exc.exceptions)
    return type(exc).__name__


async def serve_http(
    services: HttpServices, shutdown: Callable[[], Awaitable[None]], stopped: trio.Event, *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """The API listener (``[listen] http``) and, if configured, the separate metrics listener.

    ``task_status.started((http_port, metrics_port or None))`` once both are bound; when
    ``shutdown()`` returns, both stop accepting and finish their requests (within the drain window);
    ``stopped`` is set once they have stopped (or failed to start)."""
    config = services.config
    try:
        async with trio.open_nursery() as nursery:
            app_config = _hypercorn_config(config.http_address(), config)
            binds = await nursery.start(_serve_supervised, create_app(services), app_config, shutdown)
            http_port = int(binds[0].rsplit(":", 1)[1])
            metrics_port = None
            metrics_address = config.metrics_address()
            if metrics_address is not None:
                metrics_config = _hypercorn_config(metrics_address, config)
                mbinds = await nursery.start(_serve_supervised, create_metrics_app(services), metrics_config, shutdown)
                metrics_port = int(mbinds[0].rsplit(":", 1)[1])
            task_status.started((http_port, metrics_port))
    finally:
        stopped.set()
