"""relay: users with one sender and D-1 receiver devices (acking by device_seq, as web clients do); a closed-loop
phase (W events in flight per sender), then open-loop phases on a fixed timetable. Run by the worker processes
(worker.py: relay_setup, relay_phase, relay_teardown); this side sums their replies up."""

from __future__ import annotations

import time
from typing import Any

import trio

from ..env import Env, daemon_cpu, machine_load
from ..params import Params
from ..stats import cpu_report, percentiles, pg_delta, rate
from ..workers import call_all, split


async def run(env: Env, p: Params) -> dict[str, Any]:
    workers = env.workers
    users = split(p.users, len(workers))
    offsets = [sum(users[:i]) for i in range(len(workers))]
    setup = await call_all(
        workers,
        [
            {
                "cmd": "relay_setup",
                "url": env.url,
                "urls": env.urls,
                "users": u,
                "user_offset": o,
                "devices": p.devices,
                "payload_bytes": p.payload_bytes,
            }
            for u, o in zip(users, offsets, strict=True)
        ],
        timeout=90,
    )
    modes: list[dict[str, Any]] = [{"mode": "closed", "window": p.window}]
    modes += [{"mode": "open", "rate": r} for r in p.rates]
    results = []
    for phase_id, mode in enumerate(modes, start=1):
        env.check_alive()
        start_at = time.time() + 0.5
        cmd: dict[str, Any] = {
            "cmd": "relay_phase",
            "phase": phase_id,
            "mode": mode["mode"],
            "duration": p.duration,
            "drain": p.drain,
            "start_at": start_at,
        }
        if mode["mode"] == "closed":
            cmd.update(window=p.window, max_events=int(p.duration * 100_000))
        else:
            cmd.update(rate_per_user=mode["rate"] / p.users, offset_step_s=1.0 / mode["rate"])
        pg0 = await env.pg_stats()
        s0 = env.sample()
        replies = await call_all(workers, [cmd] * len(workers), timeout=p.duration + 2 * p.drain + 60)
        s1 = env.sample()
        summary = relay_summary(mode, replies, len(env.urls), p.duration)
        if pg0 is not None:
            await trio.sleep(1.0)  # PostgreSQL flushes its statistics at most once a second
            pg1 = await env.pg_stats()
            if pg1 is not None:
                summary["postgres"] = pg_delta(pg0, pg1, summary["active_s"])
        daemon = daemon_cpu(s0, s1, summary["active_s"])
        if daemon is not None:
            summary["daemon"] = daemon
        summary["machine_load"] = machine_load(s0, s1, replies)
        results.append(summary)
    await call_all(workers, [{"cmd": "relay_teardown", "timeout": 15}] * len(workers), timeout=30)
    return {
        "users": p.users,
        "devices": p.devices,
        "receivers_per_user": p.devices - 1,
        "processes": len(workers),
        "instances": len(env.urls),
        "placement": (
            "sender on instance 1; receiver i of user u on instance (u + i) mod N + 1"
            if len(env.urls) > 1
            else "one instance"
        ),
        "payload_bytes": p.payload_bytes,
        "duration_s": p.duration,
        "setup_s": max(r["setup_s"] for r in setup),
        "modes": results,
        "duplicates": sum(m["duplicates"] for m in results),
        "losses": sum(m["losses"] for m in results),
        "daemon_rss_kb_after": env.rss(),
    }


def relay_summary(
    mode: dict[str, Any], replies: list[dict[str, Any]], instances: int, duration: float
) -> dict[str, Any]:
    start = min(r["start_ns"] for r in replies)
    last_ack = max(r["last_ack_ns"] for r in replies)
    last_all = max(r["last_all_ns"] for r in replies)
    send_end = max(r["send_end_ns"] for r in replies)
    total = {
        k: sum(r[k] for r in replies)
        for k in (
            "sent",
            "acked_stored",
            "unacked",
            "delivered_all",
            "deliveries",
            "duplicates",
            "losses",
            "stray",
            "receivers",
        )
    }
    statuses: dict[str, int] = {}
    for r in replies:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    active = (max(last_all, last_ack, send_end) - start) / 1e9
    if active < 0.5 * duration:  # the phase broke off early (e.g. connections closed): use the whole phase
        active = (max(r["end_ns"] for r in replies) - start) / 1e9
    lat = {key: [x for r in replies for x in r[key]] for key in ("lat_ack_ms", "lat_recv_ms", "lat_all_ms")}
    label = f"closed W={mode['window']}" if mode["mode"] == "closed" else f"open {mode['rate']:g}/s"
    out: dict[str, Any] = {
        "mode": mode["mode"],
        "label": label,
        **({"window": mode["window"]} if mode["mode"] == "closed" else {"offered_rate": mode["rate"]}),
        **total,
        "statuses": statuses,
        "events_per_s_acked": rate(total["acked_stored"], start, last_ack),
        "events_per_s_delivered_all": rate(total["delivered_all"], start, last_all),
        "deliveries_per_s": rate(total["deliveries"], start, last_all),
        "active_s": round(active, 3),
        "ack_latency_ms": percentiles(lat["lat_ack_ms"]),
        "delivery_latency_ms": percentiles(lat["lat_recv_ms"]),
        "delivery_all_latency_ms": percentiles(lat["lat_all_ms"]),
        "workers": [cpu_report(r["cpu"], (r["end_ns"] - r["start_ns"]) / 1e9) for r in replies],
        "errors": [e for r in replies for e in r["errors"]][:20],
    }
    if instances > 1:  # by the receiving device's instance (the sender is always on instance 1)
        out["delivery_latency_ms_by_receiver_instance"] = [
            {"instance": i + 1, **percentiles([x for r in replies for x in r["lat_recv_ms_by_instance"][i]])}
            for i in range(instances)
        ]
    return out
