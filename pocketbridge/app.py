"""The daemon: one trio process, nested nurseries, orderly stop.

``services`` (outer nursery) owns the store and the bus; ``front`` (inner nursery) owns the
listeners and every connection. Stopping cancels the front first, so sessions tear down (presence,
cursors) while the store is still there, then the services, whose writer flushes last.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import signal
import sys
import threading
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

import attrs
import trio
from attrs import evolve, fields_dict

from . import __version__
from .accounts import Accounts
from .backends import open_bus, open_store
from .bus import EventNotice
from .clock import Clock
from .config import Config, describe_problems, load_config
from .errors import SHUTTING_DOWN, ConfigError, StartupError, find_error, listen_problem
from .gateway.context import Gateway, Limits
from .gateway.server import run_session_clock, serve_gateway
from .http.server import serve_http
from .http.services import HttpServices
from .hub import Hub
from .identity import load_or_create_identity
from .maintenance import Wakeup, run_catch_up, run_heartbeat, run_purger
from .metrics import Metrics
from .protocol.delivery import event_message
from .protocol.handshake import ServerIdentity
from .store import StoredEvent
from .systemd import notify, run_watchdog
from .tracing import setup_tracing, span, stop_tracing

T = TypeVar("T")

log = logging.getLogger("pocketbridge")


@attrs.frozen
class Running:
    """What a started daemon tells its caller."""

    ws_port: int
    ws_url: str
    http_port: int
    http_url: str
    metrics_port: int | None
    identity: ServerIdentity
    identity_created: bool


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


FORCE_GRACE = 2.0  # seconds a forced stop may take before the process exits anyway
GIL_SWITCH_INTERVAL = 0.0005  # seconds

# Sections that can change at run time (SIGHUP); the others need a restart.
RELOADABLE = ("ws", "session", "events", "limits", "replay", "pairing", "retention", "http", "admin", "log")
RESTART_KEYS = (("http", "max_body_bytes"), ("log", "format"))  # inside reloadable sections, but fixed at start


def freeze_startup_heap() -> int:
    """Move every object alive now (once the daemon has started: the libraries, the configuration, the app) out
    of the garbage collector's sight, and return how many there are.

    A full collection scans every tracked object; the ~60,000 that importing the libraries leaves made each one
    take 50-70 ms on the benchmark machine, and with the event loop stopped for that long every connection's
    events waited too (the open-loop p99). Frozen, they are never scanned or collected again: they live as long
    as the process anyway. Only ``pocketbridge serve`` calls this (it changes the whole process)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class Daemon:
    """The daemon. ``services`` (store, bus, upkeep) outlive ``front`` (listeners, connections),
    so a drain tears connections down while the store still takes their last writes."""

    def __init__(self, config: Config, *, clock: Clock | None = None, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock or Clock()
        self.metrics = Metrics()
        self.instance_id = config.server.instance_id or secrets.token_hex(4)
        self.gateway: Gateway | None = None
        self._root: trio.CancelScope | None = None
        self._stop_requested = trio.Event()
        self._http_shutdown = trio.Event()
        self._reloaded = Wakeup()  # the purger re-reads [retention] at once

    def stop(self) -> None:
        """Begin the drain (safe from any task, any number of times): readiness 503 at once, both
        listeners stop accepting, open connections are closed with 1001 spread over
        ``[drain] window``; whatever still runs ``[drain] deadline`` seconds later is cancelled."""
        if self._stop_requested.is_set():
            return
        self._stop_requested.set()
        notify("STOPPING=1")
        if self.gateway is not None:
            self.gateway.draining = True
        if self._root is not None:
            self._root.deadline = min(self._root.deadline, trio.current_time() + self.config.drain.deadline)

    def force(self) -> None:
        """Stop now (a second SIGINT/SIGTERM): cancel everything; whatever is still running after
        FORCE_GRACE seconds (a close handshake, a commit) ends with the process."""
        log.warning("stopping now, without draining")
        if self._root is not None:
            self._root.cancel()
        timer = threading.Timer(FORCE_GRACE, os._exit, args=(130,))
        timer.daemon = True
        timer.start()

    def reload(self) -> list[str]:
        """Re-read the config file (SIGHUP); apply what can change at run time; returns the sections
        that changed but need a restart."""
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration:\n%s", describe_problems(exc))
            return []
        old = self.config
        pending = [f"[{name}]" for name in fields_dict(Config)
                   if name not in RELOADABLE and getattr(new, name) != getattr(old, name)]
        pending += [f"[{sec}] {key}" for sec, key in RESTART_KEYS
                    if getattr(getattr(new, sec), key) != getattr(getattr(old, sec), key)]
        self.config = evolve(old, **{name: getattr(new, name) for name in RELOADABLE})
        changed = [name for name in RELOADABLE if getattr(new, name) != getattr(old, name)]
        if "retention" in changed:
            self._reloaded.set()
        if self.gateway is not None:
            self.gateway.config = self.config
            self.gateway.limits = Limits.from_config(self.config, previous=self.gateway.limits)
        logging.getLogger().setLevel(self.config.log.level.upper())
        log.info("configuration reloaded; applied: %s", ", ".join(changed) or "no changes")
        if pending:
            log.warning("changes to %s need a restart to take effect", ", ".join(pending))
        return pending

    async def run(self, *, handle_signals: bool = False, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT with ``handle_signals``, or cancellation of the
        caller, which is turned into an orderly stop)."""
        async with trio.open_nursery() as guard:
            guard.start_soon(self._stop_when_cancelled)
            if handle_signals:  # until the very end, so a second signal always finds its handler
                await guard.start(self._watch_signals)
            with trio.CancelScope(shield=True) as root:
                self._root = root
                await self._run(handle_signals, task_status)
            guard.cancel_scope.cancel()

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    async def _run(self, handle_signals: bool, task_status: Any) -> None:
        self.clock.anchor()
        # The store's worker threads take the GIL back after every SQL call; with the default 5 ms
        # switch interval a busy event loop makes each of those waits long, and a batch of events
        # takes tens of milliseconds. A short interval keeps the writer moving.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        provider = setup_tracing(self.config) if self.config.tracing.exporter != "none" else None
        try:
            await self._serve(handle_signals, task_status)
        finally:
            stop_tracing(provider)

    async def _serve(self, handle_signals: bool, task_status: Any) -> None:
        store = open_store(self.config, self.clock, self.instance_id)
        bus = open_bus(self.config, self.instance_id)
        hub = Hub(bus)
        self.metrics.watch(store, bus, __version__, self.instance_id)

        async def on_commit(events: Sequence[StoredEvent]) -> None:
            with span("relay.publish", events=len(events)):
                await bus.publish(
                    [
                        EventNotice(e.user_id, e.server_seq, e.device_id, e.event_id, e.device_seq, e.ttl,
                                    event_message(e), e.created_at, e.trace)
                        for e in events
                    ]
                )

        async with trio.open_nursery() as services:
            await services.start(bus.run, hub.dispatch)
            try:
                await services.start(store.run, on_commit)
            except OSError as exc:  # the data directory (SQLite)
                raise StartupError(
                    f"[server] data_dir {self.config.data_dir()} cannot be used (PB_SERVER_DATA_DIR):"
                    f" {exc.strerror or type(exc).__name__}; create it, give the daemon's user access or choose"
                    " another directory"
                ) from exc
            services.start_soon(run_purger, store, lambda: self.config, self._reloaded)
            if self.config.storage.backend != "sqlite":
                services.start_soon(run_heartbeat, store, self.instance_id)
            if self.config.bus.backend != "memory" or self.config.storage.backend != "sqlite":
                wake = Wakeup()
                store.on_write_failure(wake.set)
                services.start_soon(run_catch_up, hub, store, bus, wake)
            # after the store opened: a start that fails earlier never creates a key
            identity, created = await trio.to_thread.run_sync(load_or_create_identity, self.config.identity_key_path())
            gw = self.gateway = Gateway(
                config=self.config, clock=self.clock, identity=identity, store=store, bus=bus, hub=hub,
                metrics=self.metrics, limits=Limits.from_config(self.config), instance_id=self.instance_id,
            )
            if self.config.bus.backend == "redis":  # one budget per address, user or device across instances
                from .shared_limits import SharedLimits, redis_prefix  # only with Redis: the default never loads it

                shared = SharedLimits(self.config.bus.url, lambda: gw.limits, redis_prefix(identity.public_hex),
                                      lambda up: self.metrics.rate_limits_shared.set(1 if up else 0))
                services.start_soon(shared.run)
            try:
                async with trio.open_nursery() as front:
                    ws_port = await _bind("ws", self.config.listen.ws, front.start(serve_gateway, gw))
                    front.start_soon(run_session_clock, gw)
                    http_port, metrics_port = await _bind(
                        "http", self.config.listen.http,
                        front.start(serve_http, http_services(gw), self._http_shutdown.wait, gw.http_done),
                    )
                    url = f"ws://{_host(self.config.ws_address()[0])}:{ws_port}/ws"
                    http_url = f"http://{_host(self.config.http_address()[0])}:{http_port}"
                    log.info("pocketbridge %s serving %s and %s (instance %s)", __version__, url, http_url,
                             self.instance_id)
                    front.start_soon(run_watchdog, lambda: f"{len(gw.connections)} connections")
                    front.start_soon(self._drain, front.cancel_scope)
                    notify("READY=1")
                    task_status.started(Running(ws_port, url, http_port, http_url, metrics_port, identity, created))
            finally:
                services.cancel_scope.cancel()

    async def _drain(self, front: trio.CancelScope) -> None:
        await self._stop_requested.wait()
        gw = self.gateway
        assert gw is not None
        log.info("draining %d connections over %.1f s", len(gw.connections), self.config.drain.window)
        gw.stop_accepting()
        connections = list(gw.connections)
        start, window = trio.current_time(), self.config.drain.window
        for i, conn in enumerate(connections):
            await trio.sleep_until(start + window * i / len(connections))
            conn.close(SHUTTING_DOWN, after_current=True)
        await gw.connections.wait_empty()
        # The HTTP listener answers (readiness 503 "draining") until the WebSockets are gone, so
        # load balancers see the drain; then it stops accepting and finishes its requests.
        self._http_shutdown.set()
        with trio.move_on_after(window):
            await gw.http_done.wait()
        front.cancel()

    async def _watch_signals(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload()
                    continue
                if self._stop_requested.is_set():
                    self.force()  # a second Ctrl+C: the user does not want to wait for the drain
                    continue
                log.info("received %s, draining (send it again to stop at once)", signal.Signals(signum).name)
                self.stop()


def http_services(gw: Gateway) -> HttpServices:
    """What the HTTP side uses of the gateway; config, limits and draining are read per request (reload, stop)."""
    return HttpServices(
        store=gw.store, bus=gw.bus, clock=gw.clock, identity=gw.identity, metrics=gw.metrics,
        accounts=Accounts.of(gw), current_config=lambda: gw.config, current_limits=lambda: gw.limits,
        is_draining=lambda: gw.draining,
    )


async def _bind(key: str, address: str, starting: Awaitable[T]) -> T:
    """Start a listener; a bind failure becomes one line naming ``[listen] <key>``."""
    try:
        return await starting
    except (OSError, BaseExceptionGroup) as exc:
        error = find_error(exc, OSError)
        if isinstance(error, OSError) and error.errno is not None:
            raise StartupError(listen_problem(key, address, error)) from exc
        raise
