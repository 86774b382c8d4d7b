"""Serve the HTTP app with hypercorn inside the daemon's nursery."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..gateway.context import Gateway
from .app import create_app, create_metrics_app


def _hypercorn_config(bind: tuple[str, int], gw: Gateway) -> HypercornConfig:
    host, port = bind
    cfg = HypercornConfig()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None
    cfg.errorlog = logging.getLogger("pocketbridge.http.server")
    cfg.graceful_timeout = gw.config.drain.window
    cfg.keep_alive_timeout = 30
    cfg.include_server_header = False
    return cfg


async def serve_http(
    gw: Gateway, shutdown: Callable[[], Awaitable[None]], *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """The API listener (``[listen] http``) and, if configured, the separate metrics listener.

    ``task_status.started((http_port, metrics_port or None))`` once both are bound; when
    ``shutdown()`` returns, both stop accepting and finish their requests (within the drain window)."""
    try:
        async with trio.open_nursery() as nursery:
            app_config = _hypercorn_config(gw.config.http_address(), gw)
            binds = await nursery.start(partial(serve, create_app(gw), app_config, shutdown_trigger=shutdown))
            http_port = int(binds[0].rsplit(":", 1)[1])
            metrics_port = None
            metrics_address = gw.config.metrics_address()
            if metrics_address is not None:
                metrics_config = _hypercorn_config(metrics_address, gw)
                mbinds = await nursery.start(
                    partial(serve, create_metrics_app(gw), metrics_config, shutdown_trigger=shutdown)
                )
                metrics_port = int(mbinds[0].rsplit(":", 1)[1])
            task_status.started((http_port, metrics_port))
    finally:
        gw.http_done.set()
