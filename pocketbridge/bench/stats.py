"""Figures from raw measurements: percentiles, rates, CPU shares, deltas and slopes (pure functions)."""

from __future__ import annotations

import math
import statistics
from typing import Any


def percentiles(samples: list[float], points: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | int | None]:
    """Nearest-rank percentiles (and max, count) of ``samples`` (ms), rounded to 0.01."""
    out: dict[str, float | int | None] = {"count": len(samples)}
    if not samples:
        for p in points:
            out[f"p{p:g}"] = None
        out["max"] = None
        return out
    data = sorted(samples)
    n = len(data)
    for p in points:
        rank = max(1, math.ceil(p / 100 * n))
        out[f"p{p:g}"] = round(data[rank - 1], 2)
    out["max"] = round(data[-1], 2)
    return out


def rate(count: int, start_ns: int, end_ns: int) -> float | None:
    """``count`` per second between two time_ns readings (0.0 for no count; None if no time passed)."""
    seconds = (end_ns - start_ns) / 1e9
    return round(count / seconds, 1) if count and seconds > 0 else (0.0 if not count else None)


def cpu_report(cpu: dict[str, float], wall: float) -> dict[str, Any]:
    """A process's user + system CPU seconds, and as a percentage of ``wall`` seconds."""
    total = cpu["user"] + cpu["sys"]
    return {"cpu_s": round(total, 3), "cpu_pct": round(100 * total / wall, 1) if wall > 0 else None}


def delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def pg_delta(pg0: dict[str, float], pg1: dict[str, float], active: float) -> dict[str, Any]:
    """What PostgreSQL counted for the benchmark database over a step (commits ~ write batches + reads)."""
    d: dict[str, Any] = {k: int(pg1[k] - pg0[k]) for k in pg0}
    if active > 0:
        d["commits_per_s"] = round(d["commits"] / active, 1)
    return d


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den <= 0:
        return None
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den
