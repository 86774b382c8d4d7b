"""delete-account: how long deleting a big account takes, and whether the daemon stays responsive meanwhile.

One device stores ``--account-mib`` MiB of events (``--event-mib`` each, one at a time, acked ``stored``) and
disconnects; then ``DELETE /api/user`` (PB1-signed by that device) deletes the account while another user's
connection sends app pings back to back (``{"type":"ping","payload":{"timestamp":...}}`` → ``pong``). The result:
the deletion time, the ping round trips before and during the deletion (count, p50, p99, max), the daemon's RSS and
the database size before and after. Run from this process; no load-generator processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ...client import Client, DeviceKey, connect, new_device_id
from ...config import EventsConfig
from ..env import Env
from ..http import http_request, pb1
from ..params import BenchError
from ..stats import percentiles

MiB = 1024 * 1024
STREAM = "clipboard:bench"
TYPE = "clipboard:text"
UNLIMITED = 1 << 50  # bytes


@attrs.define
class DeleteParams:
    account_mib: float = 500.0  # stored in the account before it is deleted
    event_mib: float = 10.0  # per event
    baseline_s: float = 3.0  # ping round trips measured before the deletion
    delete_timeout_s: float = 600.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DeleteParams:
        p = cls(account_mib=20.0, event_mib=2.0, baseline_s=1.0) if args.quick else cls()
        if getattr(args, "account_mib", None) is not None:
            p.account_mib = args.account_mib
        if getattr(args, "event_mib", None) is not None:
            p.event_mib = args.event_mib
        limit = EventsConfig().max_payload_bytes
        if p.event_bytes > limit:
            raise BenchError(f"--event-mib must be at most {limit / MiB:g} (the default [events] max_payload_bytes)")
        return p

    @property
    def event_bytes(self) -> int:
        return int(self.event_mib * MiB)

    @property
    def events(self) -> int:
        return max(1, math.ceil(self.account_mib / self.event_mib))


def settings(p: DeleteParams) -> dict[tuple[str, str], Any]:
    """The daemon may store the whole account at once: the per-user storage quotas are lifted."""
    return {
        ("limits", "max_stored_bytes_per_user"): UNLIMITED,
        ("limits", "stored_bytes_per_user_per_minute"): UNLIMITED,
    }


def progress(text: str) -> None:
    print(f"[bench] delete-account: {text}", file=sys.stderr, flush=True)


async def store_account(url: str, key: DeviceKey, device_id: str, p: DeleteParams) -> dict[str, Any]:
    """Store the account's events, one at a time; how many were acked ``stored``, and how fast."""
    payload = os.urandom(p.event_bytes)  # incompressible, as ciphertext is (PostgreSQL compresses TOAST values)
    stored = 0
    every = max(1, p.events // 10)
    t0 = time.perf_counter()
    async with connect(url, key, device_id, reply_timeout=120.0) as client:
        for i in range(1, p.events + 1):
            ack = await client.send_event(STREAM, TYPE, payload)
            if ack.status != "stored":
                raise BenchError(f"event {i} acked {ack.status!r} ({ack.code} {ack.error})")
            stored += 1
            if i % every == 0 or i == p.events:
                elapsed = time.perf_counter() - t0
                progress(f"stored {i}/{p.events} events ({i * p.event_bytes / MiB:,.0f} MiB) in {elapsed:.1f} s")
    seconds = time.perf_counter() - t0
    mib = stored * p.event_bytes / MiB
    return {"events": stored, "mib": round(mib, 1), "seconds": round(seconds, 2), "mib_per_s": round(mib / seconds, 1)}


class Pinger:
    """App pings back to back over one connection; each round trip with the time it was sent (perf_counter)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip in seconds)
        self.errors: list[str] = []

    async def run(self) -> None:
        try:
            while True:
                t0 = time.perf_counter()
                await self.client.ping()
                self.samples.append((t0, time.perf_counter() - t0))
        except Exception as exc:  # noqa: BLE001  (reported: a ping that failed is a failed check)
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def between(self, start: float, end: float) -> list[float]:
        """Round trips (ms) of the pings in flight at some moment between ``start`` and ``end``."""
        return [rtt * 1000 for t0, rtt in self.samples if t0 < end and t0 + rtt > start]

    def before(self, start: float) -> list[float]:
        return [rtt * 1000 for t0, rtt in self.samples if t0 + rtt <= start]


async def run(env: Env, p: DeleteParams) -> dict[str, Any]:
    daemon = env.daemons[0]
    http = urlsplit(daemon.http_url)
    host, port = http.hostname or "127.0.0.1", http.port or 80
    key, device_id = DeviceKey.generate(), new_device_id()
    progress(f"storing {p.events} events of {p.event_mib:g} MiB ({p.events * p.event_mib:,.0f} MiB) ...")
    store = await store_account(env.url, key, device_id, p)
    await trio.sleep(1.0)  # let the WAL checkpoint and the allocator settle
    db_before = await env.database_bytes()
    rss_before = env.rss()
    rss_max = rss_before or 0
    target = "/api/user"
    async with connect(env.url, DeviceKey.generate(), new_device_id()) as other:
        pinger = Pinger(other)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pinger.run)
            await trio.sleep(p.baseline_s)
            progress("deleting the account (DELETE /api/user) while another user pings ...")

            async def watch_rss() -> None:
                nonlocal rss_max
                while True:
                    rss_max = max(rss_max, env.rss() or 0)
                    await trio.sleep(0.05)

            nursery.start_soon(watch_rss)
            t_del0 = time.perf_counter()
            status, body = await http_request(
                host, port, "DELETE", target, pb1(key, device_id, "DELETE", target), timeout=p.delete_timeout_s
            )
            t_del1 = time.perf_counter()
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    delete_s = t_del1 - t_del0
    progress(f"answered {status} in {delete_s:.2f} s")
    try:
        reply = json.loads(body)
    except ValueError:
        reply = {"raw": body[:200].decode("utf-8", "replace")}
    deleted = reply.get("deleted") or {}
    await trio.sleep(1.0)
    db_after = await env.database_bytes()
    during = pinger.between(t_del0, t_del1)
    failed = []
    if status != 200:
        failed.append(f"DELETE /api/user answered {status}: {reply}")
    elif deleted.get("events") != store["events"]:
        failed.append(f"deleted {deleted.get('events')} events of {store['events']}")
    if pinger.errors:
        failed.append(f"pings failed: {pinger.errors[0]}")
    if not during:
        failed.append("no ping round trip during the deletion")
    return {
        "params": attrs.asdict(p),
        "event_mib": p.event_mib,
        "events_stored": store["events"],
        "store": store,
        "status": status,
        "deleted": deleted,
        "delete_s": round(delete_s, 3),
        "pings": {
            "before": percentiles(pinger.before(t_del0)),
            "during": percentiles(during),
        },
        "database_mib": None
        if db_before is None or db_after is None
        else {"before": round(db_before / MiB, 1), "after": round(db_after / MiB, 1), "measure": env.database_measure},
        "daemon_rss_kb": {"before": rss_before, "max_during": rss_max} if rss_before else None,
        "daemon_settings": {f"{sec}.{name}": value for (sec, name), value in settings(p).items()},
        "failed_checks": failed,
    }
