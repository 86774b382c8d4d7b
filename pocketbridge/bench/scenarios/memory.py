"""memory: the daemon's RSS per handshaken idle connection (the worker processes hold N of them open)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import trio

from ..env import Env
from ..params import Params
from ..workers import call_all, split


async def steady_rss(env: Env) -> int | None:
    samples = []
    for _ in range(3):
        value = env.rss()
        if value is not None:
            samples.append(value)
        await trio.sleep(0.2)
    return int(statistics.median(samples)) if samples else None


async def run(env: Env, p: Params) -> dict[str, Any]:
    workers = env.workers
    await workers[0].call({"cmd": "warmup", "url": env.url, "timeout": 30}, timeout=40)
    await trio.sleep(1.0)
    before = await steady_rss(env)
    counts = split(p.idle, len(workers))
    conc = [max(1, c) for c in split(p.idle_concurrency, len(workers))]
    t0 = time.perf_counter()
    replies = await call_all(
        workers,
        [{"cmd": "idle_open", "url": env.url, "count": n, "concurrency": c} for n, c in zip(counts, conc, strict=True)],
        timeout=120 + p.idle / 5,
    )
    open_s = time.perf_counter() - t0
    opened = sum(r["opened"] for r in replies)
    await trio.sleep(2.0)
    env.check_alive()
    during = await steady_rss(env)
    await call_all(workers, [{"cmd": "idle_close", "timeout": 30}] * len(workers), timeout=45)
    await trio.sleep(1.0)
    after = await steady_rss(env)
    kb = round((during - before) / opened, 2) if before is not None and during is not None and opened else None
    return {
        "connections": p.idle,
        "opened": opened,
        "failed": sum(r["failed"] for r in replies),
        "failures": sorted({f for r in replies for f in r["failures"]})[:10],
        "open_s": round(open_s, 3),
        "connections_per_s": round(opened / open_s, 1) if open_s > 0 else None,
        "rss_kb_before": before,
        "rss_kb_with_connections": during,
        "rss_kb_after_close": after,
        "kb_per_connection": kb,
        "note": (None if env.pid else "daemon PID unknown (use --server-pid with --url): RSS is N/A")
        if len(env.urls) == 1
        else f"all connections on instance 1 of {len(env.urls)}; RSS of instance 1",
        "duplicates": 0,
        "losses": sum(r["failed"] for r in replies),
    }
