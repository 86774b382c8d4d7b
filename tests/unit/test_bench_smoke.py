"""Smoke test of `pocketbridge bench --quick`: every scenario runs against a real daemon subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_quick_all(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pocketbridge", "bench", "--quick", "--scenario", "all", "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    assert summary["machine"]["cores"]
    assert summary["daemon"]["storage_backend"]
    scenarios = summary["scenarios"]
    assert set(scenarios) == {"relay", "handshakes", "memory", "replay"}
    for name, result in scenarios.items():
        assert "error" not in result, (name, result.get("error"))
        assert result["duplicates"] == 0, name
        assert result["losses"] == 0, name

    relay = scenarios["relay"]
    assert [m["mode"] for m in relay["modes"]] == ["closed", "open", "open"]
    for mode in relay["modes"]:
        assert mode["duplicates"] == 0 and mode["losses"] == 0 and mode["unacked"] == 0, mode["label"]
        assert mode["acked_stored"] > 0 and mode["delivered_all"] == mode["acked_stored"], mode["label"]
        assert mode["events_per_s_acked"] > 0 and mode["events_per_s_delivered_all"] > 0, mode["label"]
        assert mode["delivery_all_latency_ms"]["p99"] is not None

    handshakes = scenarios["handshakes"]
    assert handshakes["completed"] == handshakes["count"] and handshakes["handshakes_per_s"] > 0

    memory = scenarios["memory"]
    assert memory["opened"] == memory["connections"] and memory["connections_per_s"] > 0
    assert memory["rss_kb_before"] > 0 and memory["rss_kb_with_connections"] > 0

    replay = scenarios["replay"]
    assert replay["stored"] == replay["events"]
    for run in replay["runs"]:
        assert run["received"] == replay["events"] and run["events_per_s"] > 0
        assert run["duplicates"] == 0 and run["losses"] == 0


def _bench(tmp_path: Path, *args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pocketbridge", "bench", *args, "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_quick_delete_account(tmp_path: Path) -> None:
    proc, summary = _bench(tmp_path, "--quick", "--scenario", "delete-account")
    assert set(summary["scenarios"]) == {"delete-account"}
    x = summary["scenarios"]["delete-account"]
    assert "error" not in x and not x.get("problems"), x
    assert x["status"] == 200 and x["events_stored"] == 10 and x["deleted"]["events"] == 10
    assert x["store"]["mib"] == 20 and x["delete_s"] > 0
    assert x["pings"]["before"]["count"] > 0 and x["pings"]["during"]["count"] > 0
    assert x["pings"]["during"]["max"] is not None and x["pings"]["during"]["p99"] is not None
    assert summary["scenario_params"]["delete-account"]["account_mib"] == 20
    assert "DELETE /api/user answered 200" in proc.stdout and "during the deletion" in proc.stdout


@pytest.mark.slow
def test_bench_quick_fragmented(tmp_path: Path) -> None:
    proc, summary = _bench(tmp_path, "--quick", "--scenario", "fragmented")
    x = summary["scenarios"]["fragmented"]
    assert "error" not in x and not x.get("problems"), x
    (run,) = x["runs"]
    assert run["fragment_bytes"] == 64 and run["delivered"] is True
    assert run["message_bytes"] == 1024 * 1024 and run["frames"] == 2 + -(-(1024 * 1024 - 37) // 64)
    assert run["rss_growth_kb"] is not None and run["samples"]
    cap = x["default_cap"]
    assert (cap["close_code"], cap["close_reason"], cap["frames_sent"]) == (1009, "Message too big", 4097)
    assert "1009 close 'Message too big'" in proc.stdout


@pytest.mark.slow
def test_bench_own_daemon_scenarios_refuse_url(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pocketbridge", "bench", "--scenario", "fragmented", "--url", "ws://127.0.0.1:1/ws"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "--scenario fragmented measures the daemon it starts; --url is not supported" in proc.stderr


# The machine's PostgreSQL and Redis, as in tests/conftest.py (the bench creates and drops its own database there).
PG_ADMIN_DSN = os.environ.get("PB_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _require_postgres_and_redis() -> None:
    """Skip (a failure under CI=true, see conftest) when PostgreSQL or Redis is unreachable."""
    import psycopg
    import redis

    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {type(exc).__name__}")
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {type(exc).__name__}")


def _bench_databases() -> set[str]:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'pocketbridge_bench_%'").fetchall()
    return {r[0] for r in rows}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_bench_quick_relay_two_instances_postgres_redis(tmp_path: Path) -> None:
    _require_postgres_and_redis()
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, "-m", "pocketbridge", "bench", "--quick", "--scenario", "relay",
        "--backend", "postgres", "--bus", "redis", "--instances", "2",
        "--dsn", PG_ADMIN_DSN, "--redis-url", REDIS_URL, "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    assert (summary["backend"], summary["bus"], summary["instances"]) == ("postgres", "redis", 2)
    assert summary["daemon"]["storage_backend"] == "postgres" and summary["daemon"]["bus_backend"] == "redis"

    relay = summary["scenarios"]["relay"]
    assert "error" not in relay, relay.get("error")
    assert relay["instances"] == 2 and len(relay["daemon_pids"]) == 2
    assert relay["duplicates"] == 0 and relay["losses"] == 0
    assert [m["offered_rate"] for m in relay["modes"] if m["mode"] == "open"] == [300]  # the postgres default
    for mode in relay["modes"]:
        assert mode["duplicates"] == 0 and mode["losses"] == 0 and mode["unacked"] == 0, mode["label"]
        assert mode["acked_stored"] > 0 and mode["delivered_all"] == mode["acked_stored"], mode["label"]
        # receivers on both instances got events (relay crossed instances)
        by_instance = mode["delivery_latency_ms_by_receiver_instance"]
        assert [x["instance"] for x in by_instance] == [1, 2] and all(x["count"] > 0 for x in by_instance)
        assert [i["instance"] for i in mode["daemon"]["instances"]] == [1, 2], mode["label"]
        assert all(i["cpu_s"] > 0 for i in mode["daemon"]["instances"]), mode["label"]

    targets = {t["target"]: t for t in summary["targets"]}
    crossing = [t for name, t in targets.items() if "duplicates + losses across 2 instances" in name]
    assert len(crossing) == 1 and crossing[0]["value"] == 0 and crossing[0]["met"] is True
    assert relay["database"].startswith("pocketbridge_bench_")
    assert relay["database"] not in _bench_databases(), "the bench left its database behind"


@pytest.mark.slow
def test_bench_instances_need_postgres_and_redis(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pocketbridge", "bench", "--quick", "--scenario", "relay", "--instances", "2"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "--instances 2 needs --backend postgres --bus redis" in proc.stderr


@pytest.mark.slow
def test_bench_replays_more_events_than_the_full_resync_threshold(tmp_path: Path) -> None:
    """The benchmark daemon's ``full_resync_threshold`` (10,000 by default) is lifted: a replay of 10,050
    events is measured as a replay, not answered with ``full_resync_required`` and counted as lost."""
    proc, summary = _bench(tmp_path, "--quick", "--scenario", "replay", "--replay-events", "10050")
    replay = summary["scenarios"]["replay"]
    assert replay["stored"] == 10050 and replay["losses"] == 0 and replay["duplicates"] == 0
    for run in replay["runs"]:
        assert not run["full_resync"] and run["received"] == 10050, run
    assert "full_resync_required" not in proc.stdout
