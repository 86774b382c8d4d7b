"""The benchmark's verdicts on this release's targets (pocketbridge.bench.targets), on hand-made summaries."""

from __future__ import annotations

from typing import Any

from pocketbridge.bench.targets import evaluate_targets


def mode(kind: str, rate: float | None = None, per_s: float = 0.0, p99: float = 0.0, deadlocks: int | None = None
         ) -> dict[str, Any]:
    m: dict[str, Any] = {"mode": kind, "events_per_s_delivered_all": per_s, "delivery_all_latency_ms": {"p99": p99},
                         "unacked": 0, "errors": []}
    if rate is not None:
        m["offered_rate"] = rate
    if deadlocks is not None:
        m["postgres"] = {"deadlocks": deadlocks}
    return m


def verdicts(summary: dict[str, Any]) -> dict[str, tuple[Any, bool | None]]:
    return {row["target"]: (row["value"], row["met"]) for row in evaluate_targets(summary)}


def test_embedded_targets() -> None:
    summary = {"scenarios": {
        "relay": {"modes": [mode("closed", per_s=1999.0), mode("open", 500, p99=9.9)]},
        "memory": {"opened": 10_000, "rss_kb_before": 84_000, "rss_kb_with_connections": 249_000,
                   "kb_per_connection": 16.5},
    }}
    v = verdicts(summary)
    assert v["relay events/s delivered to all other devices (closed loop)"] == (1999.0, False)
    assert v["p99 delivery to all devices at open loop 500/s (ms)"] == (9.9, True)
    assert v["daemon RSS with 10,000 idle connections (MB)"] == (249.0, True)


def test_postgres_targets_and_deadlocks_across_instances() -> None:
    one = {"backend": "postgres", "bus": "redis", "instances": 1, "scenarios": {"relay": {"modes": [
        mode("closed", per_s=1600.0), mode("open", 500, p99=31.0)]}}}
    v = verdicts(one)
    assert v["relay events/s delivered to all other devices, PostgreSQL + Redis, one instance (closed loop)"] == (
        1600.0, True)
    assert v["p99 delivery to all devices at open loop 500/s, PostgreSQL + Redis, one instance (ms)"] == (31.0, False)
    two = {"backend": "postgres", "bus": "redis", "instances": 2, "scenarios": {"relay": {
        "duplicates": 0, "losses": 0, "modes": [mode("closed", deadlocks=1), mode("open", 300, p99=20.0, deadlocks=0)]}}}
    assert verdicts(two)["PostgreSQL deadlocks across 2 instances (whole relay run)"] == (1, False)
