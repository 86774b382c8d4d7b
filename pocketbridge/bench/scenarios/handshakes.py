"""handshakes: N clients, C at a time, each a full handshake then a disconnect (the worker processes'
``handshakes`` command); handshakes per second, latency percentiles, CPU."""

from __future__ import annotations

import time
from typing import Any

from ..env import Env, daemon_cpu, machine_load
from ..params import Params
from ..stats import cpu_report, percentiles
from ..workers import call_all, split


async def run(env: Env, p: Params) -> dict[str, Any]:
    workers = env.workers
    counts = split(p.handshakes, len(workers))
    conc = [max(1, c) for c in split(p.concurrency, len(workers))]
    start_at = time.time() + 1.0 + p.handshakes / 2000  # key generation happens before
    s0 = env.sample()
    replies = await call_all(
        workers,
        [
            {
                "cmd": "handshakes",
                "url": env.urls[j % len(env.urls)],  # several instances: the generator processes spread over them
                "count": n,
                "concurrency": c,
                "start_at": start_at,
                "timeout": 30,
            }
            for j, (n, c) in enumerate(zip(counts, conc, strict=True))
        ],
        timeout=120 + p.handshakes / 10,
    )
    s1 = env.sample()
    start = min(r["start_ns"] for r in replies)
    end = max(r["end_ns"] for r in replies)
    wall = (end - start) / 1e9
    completed = sum(r["completed"] for r in replies)
    out: dict[str, Any] = {
        "count": p.handshakes,
        "concurrency": p.concurrency,
        "processes": len(workers),
        "completed": completed,
        "failed": sum(r["failed"] for r in replies),
        "failures": sorted({f for r in replies for f in r["failures"]})[:10],
        "seconds": round(wall, 3),
        "handshakes_per_s": round(completed / wall, 1) if wall > 0 else None,
        "latency_ms": percentiles([x for r in replies for x in r["lat_ms"]]),
        "workers": [cpu_report(r["cpu"], wall) for r in replies],
        "duplicates": 0,
        "losses": sum(r["failed"] for r in replies),
        "instances": len({env.urls[j % len(env.urls)] for j in range(len(workers))}),
        "machine_load": machine_load(s0, s1, replies),
    }
    daemon = daemon_cpu(s0, s1, wall)
    if daemon is not None:
        out["daemon"] = daemon
    return out
