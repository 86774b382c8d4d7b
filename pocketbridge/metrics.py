"""The daemon's Prometheus metrics (one registry per daemon; bounded label sets only).

Never label by user, device or error text.
"""

from __future__ import annotations

import gc
import math
from functools import partial
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics


def trio_task_count() -> float:
    """Tasks alive in the calling thread's trio run, counted from the root task down through every nursery.

    Called at scrape time: /metrics is rendered on the event-loop thread, so this sees the daemon's run. Outside a
    trio run (another thread, no run) it is NaN. Public trio API only (current_root_task, child_nurseries,
    child_tasks); the walk is O(tasks) and does not yield.
    """
    try:
        root = trio.lowlevel.current_root_task()
    except RuntimeError:
        return math.nan
    if root is None:
        return math.nan
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return float(count)


disable_created_metrics()  # no `_created` series beside every counter: nobody graphs them


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.info = Gauge(
            "pocketbridge_info",
            "Always 1; labels name the version and [server] instance_id",
            ["version", "instance_id"],
            registry=r,
        )
        self.connections_open = Gauge("pocketbridge_connections_open", "Open WebSocket connections", registry=r)
        self.sessions_open = Gauge("pocketbridge_sessions_open", "Established sessions on this instance", registry=r)
        self.handshakes = Counter("pocketbridge_handshakes", "Handshakes by outcome", ["outcome"], registry=r)
        self.closes = Counter(
            "pocketbridge_closes", "Connections closed by the server, by close code", ["code"], registry=r
        )
        self.events = Counter(
            "pocketbridge_events",
            "Client events by outcome (stored, duplicate, rejected, conflict)",
            ["outcome"],
            registry=r,
        )
        self.events_relayed = Counter("pocketbridge_events_relayed", "Events relayed live to a connection", registry=r)
        self.delivery_latency = Histogram(
            "pocketbridge_delivery_latency_seconds",
            "Commit to enqueue on a recipient's connection",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.gap_fills = Counter("pocketbridge_gap_fills", "Live gaps filled from the store", registry=r)
        self.replay_pages = Counter("pocketbridge_replay_pages", "Replay pages served", registry=r)
        self.replay_events = Counter("pocketbridge_replay_events", "Events served by replay", registry=r)
        self.replay_full_resync = Counter("pocketbridge_replay_full_resync", "full_resync_required sent", registry=r)
        self.replay_failed = Counter("pocketbridge_replay_failed", "Replays that failed (store)", registry=r)
        self.invalid_tokens = Counter("pocketbridge_replay_invalid_tokens", "Continuation tokens ignored", registry=r)
        self.send_overflow = Counter(
            "pocketbridge_send_buffer_overflow_closes",
            "Connections closed because their send queue was full",
            registry=r,
        )
        self.unknown_messages = Counter("pocketbridge_unknown_messages", "Messages of unknown type ignored", registry=r)
        self.rate_limited = Counter(
            "pocketbridge_rate_limited", "Rate-limit rejections by limit", ["limit"], registry=r
        )
        self.scratchpad_dropped = Counter(
            "pocketbridge_scratchpad_dropped", "scratchpad_sync messages dropped", registry=r
        )
        self.store = Gauge(
            "pocketbridge_store",
            "Store gauges: pool_size, pool_idle, pool_waiting, writer_queue, breaker_open",
            ["gauge"],
            registry=r,
        )
        self.dropped = Gauge(
            "pocketbridge_dropped",
            "Best-effort records dropped so far: audit (queue full), bus_publish (Redis)",
            ["what"],
            registry=r,
        )
        self.bus_connected = Gauge("pocketbridge_bus_connected", "1 while the fan-out bus works", registry=r)
        self.rate_limits_shared = Gauge(
            "pocketbridge_rate_limits_shared",
            "1 while rate-limit budgets are shared between instances through Redis; 0 while this instance keeps"
            " its own (bus = memory, or Redis down)",
            registry=r,
        )
        self.store_query_seconds = Histogram(
            "pocketbridge_store_query_seconds",
            "Store call latency by kind (write batch, read)",
            ["kind"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.trio_tasks = Gauge(
            "pocketbridge_trio_tasks", "trio tasks alive in the daemon's event loop, counted at scrape time", registry=r
        )
        self.trio_tasks.set_function(trio_task_count)
        self.gc_frozen = Gauge(
            "pocketbridge_gc_frozen_objects",
            "Objects of the process that the garbage collector no longer scans (`pocketbridge serve` freezes what"
            " exists once it has started, so full collections stay short)",
            registry=r,
        )
        self.gc_frozen.set_function(lambda: float(gc.get_freeze_count()))

    def watch(self, store: Any, bus: Any, version: str, instance: str) -> None:
        """Read the store's and bus's gauges at scrape time."""
        self.info.labels(version, instance).set(1)
        self.dropped.labels("audit").set_function(lambda: store.stats()["audit_dropped"])
        self.dropped.labels("bus_publish").set_function(lambda: float(getattr(bus, "dropped", 0)))
        for name in ("pool_size", "pool_idle", "pool_waiting", "writer_queue", "breaker_open"):
            self.store.labels(name).set_function(partial(_store_stat, store, name))
        self.bus_connected.set_function(lambda: float(bus.connected))
        store.observe_with(lambda kind, seconds: self.store_query_seconds.labels(kind).observe(seconds))


def _store_stat(store: Any, name: str) -> float:
    return store.stats()[name]
