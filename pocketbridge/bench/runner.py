"""`pocketbridge bench`: orchestrates daemon, load-generator worker processes, scenarios and the report.

Each scenario (relay, handshakes, memory, replay) gets its own daemon subprocess unless --url is given, and its
own worker processes (``python -m pocketbridge.bench.worker``, see worker.py for the line protocol). Everything
started here is stopped in ``finally`` blocks; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from .. import __version__
from .cli import DEFAULT_DSN, DEFAULT_REDIS_URL, SCENARIOS, SOAK
from .daemon import BackendChoice, DaemonProcess, SharedBackend, describe_config
from .sysinfo import (
    busy_cores,
    cpu_by_command,
    cpu_seconds,
    machine_info,
    machine_jiffies,
    main_thread_cpu_seconds,
    percentiles,
    raise_nofile,
    rss_kb,
)

TARGETS = {
    "relay_delivered_all_per_s": 1500,
    "open_150_p99_delivery_ms": 15,
    "open_500_p99_delivery_ms": 50,
    "handshakes_per_s": 500,
    "kb_per_idle_connection": 30,
    "replay_events_per_s": 20000,
}
# with --backend postgres --bus redis (printed only then; the relay targets above are for sqlite + memory)
TARGETS_POSTGRES_REDIS = {
    "relay_delivered_all_per_s": 1000,  # one instance, closed loop
    "open_300_p99_delivery_ms": 100,  # strictly below
    "instances_duplicates_losses": 0,  # the run with --instances >= 2
}
DATABASE_COMMANDS = ("postgres", "redis-server")  # their CPU is reported beside the daemons' when they are in use


class BenchError(Exception):
    pass


@attrs.define
class Params:
    users: int = 20
    devices: int = 3
    duration: float = 10.0
    rates: list[float] = attrs.Factory(lambda: [150.0, 500.0])
    window: int = 32
    processes: int = 2
    payload_bytes: int = 256
    drain: float = 10.0
    handshakes: int = 500
    concurrency: int = 100
    idle: int = 1000
    idle_concurrency: int = 50
    replay_events: int = 5000
    replay_window: int = 64
    replay_page_sizes: list[int] = attrs.Factory(lambda: [1000, 100])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Params:
        p = cls()
        if args.quick:
            p = cls(users=3, duration=2.0, drain=5.0, handshakes=50, concurrency=20, idle=50, replay_events=500)
        for name, attr in (
            ("users", "users"),
            ("devices", "devices"),
            ("duration", "duration"),
            ("window", "window"),
            ("processes", "processes"),
            ("payload_bytes", "payload_bytes"),
            ("drain", "drain"),
            ("handshakes", "handshakes"),
            ("concurrency", "concurrency"),
            ("idle", "idle"),
            ("replay_events", "replay_events"),
        ):
            value = getattr(args, name, None)
            if value is not None:
                setattr(p, attr, value)
        if args.rate:
            p.rates = list(args.rate)
        elif (getattr(args, "backend", None) or "sqlite") == "postgres":
            p.rates = [300.0]
        if p.devices < 2:
            raise BenchError("--devices must be at least 2 (one sender, at least one receiver)")
        if p.payload_bytes < 17:
            raise BenchError("--payload-bytes must be at least 17 (phase, counter and timestamp)")
        return p


# --- worker processes ------------------------------------------------------------------------------------


class WorkerProc:
    """One ``python -m pocketbridge.bench.worker`` subprocess; JSON lines in and out."""

    def __init__(self, index: int, log_dir: Path) -> None:
        self.index = index
        self.log_path = log_dir / f"worker-{index}.log"
        self.proc: trio.Process | None = None
        self._buf = b""

    async def start(self) -> None:
        with open(self.log_path, "wb") as log:  # noqa: ASYNC230  (a local file, opened once)
            self.proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "pocketbridge.bench.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )

    async def _readline(self) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.proc.stdout.receive_some(1 << 20)
            if not chunk:
                raise BenchError(f"worker {self.index} exited unexpectedly:\n{self.log_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    async def call(self, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            with trio.fail_after(timeout):
                await self.proc.stdin.send_all(json.dumps(cmd).encode() + b"\n")
                reply: dict[str, Any] = json.loads(await self._readline())
        except trio.TooSlowError:
            raise BenchError(f"worker {self.index}: {cmd['cmd']} did not answer within {timeout:.0f} s") from None
        if not reply.get("ok"):
            raise BenchError(f"worker {self.index}: {cmd['cmd']} failed: {reply.get('error')}")
        return reply

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self) -> None:
        """Ask it to exit (closing its connections), then kill it if it hasn't within 5 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            with trio.move_on_after(5):
                try:
                    if proc.stdin is not None:
                        await proc.stdin.send_all(b'{"cmd":"exit"}\n')
                        await proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                with trio.move_on_after(5):
                    await proc.wait()


async def call_all(
    workers: Sequence[WorkerProc], cmds: Sequence[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(workers)

    async def one(i: int) -> None:
        results[i] = await workers[i].call(cmds[i], timeout)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(workers)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [r for r in results if r is not None]


def split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# --- the environment of one scenario ----------------------------------------------------------------------


@attrs.define
class Sample:
    """CPU readings at one moment: per daemon instance (whole process, event-loop thread), machine, databases."""

    t: float
    cpu: list[float | None]
    loop: list[float | None]
    jiffies: Any
    databases: dict[str, float] | None


@attrs.define
class Env:
    urls: list[str]
    pids: list[int | None]
    workers: list[WorkerProc]
    daemons: list[DaemonProcess]
    choice: BackendChoice
    shared: SharedBackend | None = None

    @property
    def database(self) -> str | None:
        return self.shared.dbname if self.shared else None

    async def pg_stats(self) -> dict[str, float] | None:
        """The benchmark database's pg_stat_database counters (PostgreSQL publishes them within about a second)."""
        if self.shared is None or self.shared.dbname is None:
            return None
        return await trio.to_thread.run_sync(self.shared.pg_stats)

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def pid(self) -> int | None:
        return self.pids[0]

    def cpu(self) -> float | None:
        """CPU seconds of all the daemon instances (None if any PID is unknown)."""
        values = [cpu_seconds(pid) if pid else None for pid in self.pids]
        return None if any(v is None for v in values) else sum(v for v in values if v is not None)

    def rss(self) -> int | None:
        return rss_kb(self.pid) if self.pid else None

    def sample(self) -> Sample:
        uses = self.choice.storage == "postgres" or self.choice.bus == "redis"
        return Sample(
            t=time.time(),
            cpu=[cpu_seconds(pid) if pid else None for pid in self.pids],
            loop=[main_thread_cpu_seconds(pid) if pid else None for pid in self.pids],
            jiffies=machine_jiffies(),
            databases=cpu_by_command(DATABASE_COMMANDS) if uses else None,
        )

    def check_alive(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is not None:
                raise BenchError(f"daemon instance {d.instance} died (exit {d.proc.returncode}):\n{d.log_tail()}")


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def daemon_cpu(s0: Sample, s1: Sample, seconds: float) -> dict[str, Any] | None:
    """The daemons' CPU between two samples: total, and per instance (whole process and event-loop thread)."""
    cpu = [_delta(a, b) for a, b in zip(s0.cpu, s1.cpu, strict=True)]
    loop = [_delta(a, b) for a, b in zip(s0.loop, s1.loop, strict=True)]
    if any(c is None for c in cpu) or seconds <= 0:
        return None
    total = sum(c for c in cpu if c is not None)
    out: dict[str, Any] = {"cpu_s": round(total, 2), "cpu_pct": round(100 * total / seconds, 1)}
    if all(x is not None for x in loop):
        out["main_thread_cpu_pct"] = round(100 * sum(x for x in loop if x is not None) / seconds, 1)
    if len(cpu) > 1:
        out["instances"] = [
            {
                "instance": i + 1,
                "cpu_s": round(c, 2) if c is not None else None,
                "cpu_pct": round(100 * c / seconds, 1) if c is not None else None,
                "main_thread_cpu_pct": round(100 * x / seconds, 1) if x is not None else None,
            }
            for i, (c, x) in enumerate(zip(cpu, loop, strict=True))
        ]
    return out


async def _stop_daemon(daemon: DaemonProcess) -> None:
    await trio.to_thread.run_sync(daemon.stop)


@asynccontextmanager
async def scenario_env(
    args: argparse.Namespace, params: Params, choice: BackendChoice, workers: int, log_dir: Path, tag: str
) -> AsyncIterator[Env]:
    """The daemon instance(s) (sharing a fresh database, the bus and one key) and the worker processes of one
    scenario; everything is stopped, and the database dropped, on the way out."""
    daemons: list[DaemonProcess] = []
    shared: SharedBackend | None = None
    procs: list[WorkerProc] = []
    try:
        if args.url:
            urls, pids = [args.url], [args.server_pid]
        else:
            overrides = None
            if (choice.storage, choice.bus, choice.instances) != ("sqlite", "memory", 1):
                shared = SharedBackend(choice, config_file=args.config, tag=tag)
                await trio.to_thread.run_sync(shared.setup)
                overrides = shared.overrides()
            for i in range(choice.instances):
                daemons.append(
                    DaemonProcess(
                        config_file=args.config,
                        devices=params.devices,
                        log_level=args.daemon_log_level,
                        shared=overrides,
                        instance=i + 1,
                    )
                )
                await trio.to_thread.run_sync(daemons[-1].start)
            urls, pids = [d.url for d in daemons], [d.pid for d in daemons]
        procs = [WorkerProc(i, log_dir) for i in range(workers)]
        for w in procs:
            await w.start()
        yield Env(urls, pids, procs, daemons, choice, shared)
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:  # each stop is bounded; all at once
                for w in procs:
                    nursery.start_soon(w.stop)
            async with trio.open_nursery() as nursery:
                for d in daemons:
                    nursery.start_soon(_stop_daemon, d)
            if shared is not None:
                await trio.to_thread.run_sync(shared.teardown)


# --- scenarios ------------------------------------------------------------------------------------------


def _cpu_report(cpu: dict[str, float], wall: float) -> dict[str, Any]:
    total = cpu["user"] + cpu["sys"]
    return {"cpu_s": round(total, 3), "cpu_pct": round(100 * total / wall, 1) if wall > 0 else None}


def _rate(count: int, start_ns: int, end_ns: int) -> float | None:
    seconds = (end_ns - start_ns) / 1e9
    return round(count / seconds, 1) if count and seconds > 0 else (0.0 if not count else None)


async def run_relay(env: Env, p: Params) -> dict[str, Any]:
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
        summary = _relay_summary(mode, replies, len(env.urls), p.duration)
        if pg0 is not None:
            await trio.sleep(1.0)  # PostgreSQL flushes its statistics at most once a second
            pg1 = await env.pg_stats()
            if pg1 is not None:
                summary["postgres"] = _pg_delta(pg0, pg1, summary["active_s"])
        daemon = daemon_cpu(s0, s1, summary["active_s"])
        if daemon is not None:
            summary["daemon"] = daemon
        summary["machine_load"] = _machine_load(s0, s1, replies)
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


def _pg_delta(pg0: dict[str, float], pg1: dict[str, float], active: float) -> dict[str, Any]:
    """What PostgreSQL counted for the benchmark database over a step (commits ~ write batches + reads)."""
    d: dict[str, Any] = {k: int(pg1[k] - pg0[k]) for k in pg0}
    if active > 0:
        d["commits_per_s"] = round(d["commits"] / active, 1)
    return d


def _machine_load(s0: Sample, s1: Sample, replies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cores busy on the whole machine over a step, and how much of it was the daemons, the workers and (when the
    benchmark uses them) the PostgreSQL and Redis servers."""
    load = busy_cores(s0.jiffies, s1.jiffies)
    wall = s1.t - s0.t
    if load is None or wall <= 0:
        return None
    ours = sum(r["cpu"]["user"] + r["cpu"]["sys"] for r in replies)
    for a, b in zip(s0.cpu, s1.cpu, strict=True):
        if a is not None and b is not None:
            ours += b - a
    ours_cores = round(ours / wall, 2)
    out: dict[str, Any] = {
        "machine_busy_cores": load["busy"],
        "softirq_cores": load["softirq"],
        "bench_processes_cores": ours_cores,
    }
    databases = 0.0
    if s0.databases is not None and s1.databases is not None:
        for name in DATABASE_COMMANDS:
            cores = max(0.0, (s1.databases[name] - s0.databases[name]) / wall)
            out[f"{name.replace('-', '_')}_cores"] = round(cores, 2)
            databases += cores
    out["other_cores"] = round(max(0.0, load["busy"] - ours_cores - load["softirq"] - databases), 2)
    return out


def _relay_summary(
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
        "events_per_s_acked": _rate(total["acked_stored"], start, last_ack),
        "events_per_s_delivered_all": _rate(total["delivered_all"], start, last_all),
        "deliveries_per_s": _rate(total["deliveries"], start, last_all),
        "active_s": round(active, 3),
        "ack_latency_ms": percentiles(lat["lat_ack_ms"]),
        "delivery_latency_ms": percentiles(lat["lat_recv_ms"]),
        "delivery_all_latency_ms": percentiles(lat["lat_all_ms"]),
        "workers": [_cpu_report(r["cpu"], (r["end_ns"] - r["start_ns"]) / 1e9) for r in replies],
        "errors": [e for r in replies for e in r["errors"]][:20],
    }
    if instances > 1:  # by the receiving device's instance (the sender is always on instance 1)
        out["delivery_latency_ms_by_receiver_instance"] = [
            {"instance": i + 1, **percentiles([x for r in replies for x in r["lat_recv_ms_by_instance"][i]])}
            for i in range(instances)
        ]
    return out


async def run_handshakes(env: Env, p: Params) -> dict[str, Any]:
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
        "workers": [_cpu_report(r["cpu"], wall) for r in replies],
        "duplicates": 0,
        "losses": sum(r["failed"] for r in replies),
        "instances": len({env.urls[j % len(env.urls)] for j in range(len(workers))}),
        "machine_load": _machine_load(s0, s1, replies),
    }
    daemon = daemon_cpu(s0, s1, wall)
    if daemon is not None:
        out["daemon"] = daemon
    return out


async def _steady_rss(env: Env) -> int | None:
    samples = []
    for _ in range(3):
        value = env.rss()
        if value is not None:
            samples.append(value)
        await trio.sleep(0.2)
    return int(statistics.median(samples)) if samples else None


async def run_memory(env: Env, p: Params) -> dict[str, Any]:
    workers = env.workers
    await workers[0].call({"cmd": "warmup", "url": env.url, "timeout": 30}, timeout=40)
    await trio.sleep(1.0)
    before = await _steady_rss(env)
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
    during = await _steady_rss(env)
    await call_all(workers, [{"cmd": "idle_close", "timeout": 30}] * len(workers), timeout=45)
    await trio.sleep(1.0)
    after = await _steady_rss(env)
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


async def run_replay(env: Env, p: Params) -> dict[str, Any]:
    reply = await env.workers[0].call(
        {
            "cmd": "replay",
            "url": env.url,
            "replay_url": env.urls[-1],  # several instances: stored through instance 1, replayed through the last
            "events": p.replay_events,
            "window": p.replay_window,
            "page_sizes": p.replay_page_sizes,
            "timeout": 60 + p.replay_events / 100,
            "daemon_pid": env.pids[-1],
        },
        timeout=90 + p.replay_events / 100,
    )
    pages = reply["pages"]
    return {
        "events": p.replay_events,
        "stored": reply["stored"],
        "store_s": reply["store_s"],
        "store_events_per_s": reply["store_events_per_s"],
        "runs": pages,
        "events_per_s": pages[0]["events_per_s"] if pages else None,
        "duplicates": sum(x["duplicates"] for x in pages),
        "losses": sum(x["losses"] for x in pages) + (p.replay_events - reply["stored"]),
        "replayed_on_instance": len(env.urls),
    }


RUNNERS = {"relay": run_relay, "handshakes": run_handshakes, "memory": run_memory, "replay": run_replay}


# --- report ---------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _lat(d: dict[str, Any]) -> str:
    return "/".join("n/a" if d.get(k) is None else f"{d[k]:.1f}" for k in ("p50", "p95", "p99"))


def _load_text(load: dict[str, Any]) -> str:
    databases = ""
    if "postgres_cores" in load:
        databases = f" + PostgreSQL {load['postgres_cores']:.2f} + Redis {load['redis_server_cores']:.2f}"
    return (
        f"machine: {load['machine_busy_cores']:.2f} cores busy = daemon+workers {load['bench_processes_cores']:.2f}"
        f"{databases} + softirq {load['softirq_cores']:.2f} + other processes {load['other_cores']:.2f}"
    )


def evaluate_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    sc = summary["scenarios"]
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: float, higher_is_better: bool, strict: bool = False) -> None:
        if value is None:
            met = None
        elif higher_is_better:
            met = value > target if strict else value >= target
        else:
            met = value < target if strict else value <= target
        op = (">" if higher_is_better else "<") + ("" if strict else "=")
        if op == "<=" and target == 0:  # a count that must be zero
            op = "="
        rows.append({"target": name, "value": value, "goal": f"{op} {target:g}", "met": met})

    relay = sc.get("relay") or {}
    stack = (summary.get("backend", "sqlite"), summary.get("bus", "memory"))
    instances = int(summary.get("instances", 1))
    if stack == ("postgres", "redis"):
        pg = TARGETS_POSTGRES_REDIS
        for m in relay.get("modes", []):
            if m["mode"] == "closed" and instances == 1:
                add(
                    "relay events/s delivered to all other devices, PostgreSQL + Redis, one instance (closed loop)",
                    m["events_per_s_delivered_all"],
                    pg["relay_delivered_all_per_s"],
                    True,
                )
            elif m["mode"] == "open" and m.get("offered_rate") == 300:
                add(
                    f"p99 delivery to all devices at open loop 300/s, PostgreSQL + Redis, {instances} "
                    f"instance{'s' if instances > 1 else ''} (ms)",
                    m["delivery_all_latency_ms"]["p99"],
                    pg["open_300_p99_delivery_ms"],
                    False,
                    strict=True,
                )
        if instances > 1 and relay:
            lost = None if "error" in relay else (relay["duplicates"] or 0) + (relay["losses"] or 0)
            add(
                f"relay duplicates + losses across {instances} instances",
                lost,
                pg["instances_duplicates_losses"],
                False,
            )
            unacked = sum(m["unacked"] for m in relay.get("modes", []))
            errors = sum(len(m["errors"]) for m in relay.get("modes", []))
            if unacked or errors:  # a run that broke off proves nothing about losses
                rows[-1]["met"] = False
                rows[-1]["note"] = f"run incomplete: {unacked} events unacked, {errors} errors"
    for m in relay.get("modes", []) if stack == ("sqlite", "memory") else []:
        if m["mode"] == "closed":
            add(
                "relay events/s delivered to all other devices (closed loop)",
                m["events_per_s_delivered_all"],
                TARGETS["relay_delivered_all_per_s"],
                True,
            )
        elif m.get("offered_rate") in (150, 500):
            key = f"open_{int(m['offered_rate'])}_p99_delivery_ms"
            add(
                f"p99 delivery to all devices at open loop {m['offered_rate']:g}/s (ms)",
                m["delivery_all_latency_ms"]["p99"],
                TARGETS[key],
                False,
            )
    if "handshakes_per_s" in (sc.get("handshakes") or {}):
        add("handshakes/s", sc["handshakes"]["handshakes_per_s"], TARGETS["handshakes_per_s"], True)
    if "kb_per_connection" in (sc.get("memory") or {}):
        add("kB per idle connection", sc["memory"]["kb_per_connection"], TARGETS["kb_per_idle_connection"], False)
    if "events_per_s" in (sc.get("replay") or {}):
        add("replay events/s (page 1000)", sc["replay"]["events_per_s"], TARGETS["replay_events_per_s"], True)
    return rows


def render(summary: dict[str, Any]) -> str:
    m, d = summary["machine"], summary.get("daemon") or {}
    lines = [
        (
            f"PocketBridge {summary['pocketbridge']} benchmark — {m['cpu_model']}, {m['cores']} cores, "
            f"{_f(m['ram_mib'])} MiB RAM, Python {m['python']}, kernel {m['kernel']}"
        ),
        f"server: {summary['target']}"
        + (
            f"; storage {d.get('storage_backend')}"
            + (f" (synchronous={d['sqlite_synchronous']})" if d.get("sqlite_synchronous") else "")
            + f", bus {d.get('bus_backend')}, log {d.get('log_level')}"
            if d
            else ""
        )
        + (
            f"; PostgreSQL database {summary['database']['name']} on {summary['database']['server']} "
            "(fresh per scenario, dropped after)"
            if summary.get("database")
            else ""
        ),
    ]
    if summary.get("instances", 1) > 1:
        lines.append(
            f"instances: {summary['instances']} daemons sharing that database, the Redis bus and one identity key"
        )
    sc = summary["scenarios"]
    if "relay" in sc:
        r = sc["relay"]
        lines.append("")
        if "error" in r:
            lines.append(f"relay: FAILED: {r['error']}")
        else:
            lines.append(
                f"relay: {r['users']} users x {r['devices']} devices (1 sender, {r['receivers_per_user']} receivers "
                f"acking by device_seq), {r['processes']} generator processes, {r['payload_bytes']} B payloads, "
                f"{r['duration_s']:g} s per mode"
            )
            if r.get("instances", 1) > 1:
                lines.append(f"  {r['instances']} instances: {r['placement']}; daemon CPU = sum over instances")
            head = (
                f"  {'mode':<14}{'sent':>8}{'acked/s':>10}{'all-dev/s':>11}{'ack p50/95/99 ms':>22}"
                f"{'deliv p50/95/99':>22}{'all-dev p50/95/99':>22}{'dup':>5}{'loss':>6}{'daemon':>8}  workers CPU"
            )
            lines.append(head)
            for x in r["modes"]:
                daemon_cpu = f"{_f(x['daemon']['cpu_pct'], 0)}%" if x.get("daemon") else "n/a"
                wcpu = " ".join(f"{_f(w['cpu_pct'], 0)}%" for w in x["workers"])
                lines.append(
                    f"  {x['label']:<14}{x['sent']:>8,}{_f(x['events_per_s_acked']):>10}"
                    f"{_f(x['events_per_s_delivered_all']):>11}{_lat(x['ack_latency_ms']):>22}"
                    f"{_lat(x['delivery_latency_ms']):>22}{_lat(x['delivery_all_latency_ms']):>22}"
                    f"{x['duplicates']:>5}{x['losses']:>6}{daemon_cpu:>8}  {wcpu}"
                )
                load = x.get("machine_load")
                per_instance = (x.get("daemon") or {}).get("instances")
                if per_instance:
                    lines.append(
                        "    daemon CPU per instance: "
                        + ", ".join(
                            f"#{i['instance']} {_f(i['cpu_pct'], 0)}% (event loop {_f(i['main_thread_cpu_pct'], 0)}%)"
                            for i in per_instance
                        )
                        + "; delivery p50/95/99 ms by receiver instance: "
                        + ", ".join(
                            f"#{i['instance']} {_lat(i)}" for i in x.get("delivery_latency_ms_by_receiver_instance", [])
                        )
                    )
                pg = x.get("postgres")
                if pg:
                    lines.append(
                        f"    PostgreSQL (benchmark database): {_f(pg.get('commits_per_s'))} commits/s, "
                        f"{pg['rows_inserted']:,} rows inserted, {pg['rows_updated']:,} updated, "
                        f"{pg['rollbacks']} rollbacks, {pg['deadlocks']} deadlocks"
                    )
                if load:
                    loop = (x.get("daemon") or {}).get("main_thread_cpu_pct")
                    loop_text = (
                        f"daemon event-loop thread{'s' if per_instance else ''} {_f(loop, 0)}%; "
                        if loop is not None
                        else ""
                    )
                    lines.append(f"    {loop_text}{_load_text(load)}")
                if x["unacked"] or x["errors"]:
                    lines.append(f"    unacked {x['unacked']}; errors: {'; '.join(x['errors'][:3]) or 'none'}")
    if "handshakes" in sc:
        h = sc["handshakes"]
        lines.append("")
        if "error" in h:
            lines.append(f"handshakes: FAILED: {h['error']}")
        else:
            daemon_cpu = f", daemon CPU {_f(h['daemon']['cpu_pct'], 0)}%" if h.get("daemon") else ""
            lines.append(
                f"handshakes: {h['completed']:,}/{h['count']:,} (concurrency {h['concurrency']}) in {h['seconds']:.2f} s "
                f"= {_f(h['handshakes_per_s'])}/s; latency p50 {_f(h['latency_ms']['p50'])} ms, "
                f"p99 {_f(h['latency_ms']['p99'])} ms; failures {h['failed']}{daemon_cpu}; "
                f"workers CPU {' '.join(_f(w['cpu_pct'], 0) + '%' for w in h['workers'])}"
            )
            if h.get("machine_load"):
                lines.append(f"  {_load_text(h['machine_load'])}")
            if h["failures"]:
                lines.append(f"  failures: {'; '.join(h['failures'][:3])}")
    if "memory" in sc:
        mm = sc["memory"]
        lines.append("")
        if "error" in mm:
            lines.append(f"memory: FAILED: {mm['error']}")
        else:
            lines.append(
                f"memory: {mm['opened']:,}/{mm['connections']:,} idle handshaken connections (opened in "
                f"{mm['open_s']:.1f} s); daemon RSS {_f(mm['rss_kb_before'])} kB -> {_f(mm['rss_kb_with_connections'])} kB "
                f"(after close {_f(mm['rss_kb_after_close'])} kB) = {_f(mm['kb_per_connection'])} kB per connection"
            )
            if mm.get("note"):
                lines.append(f"  {mm['note']}")
    if "replay" in sc:
        rp = sc["replay"]
        lines.append("")
        if "error" in rp:
            lines.append(f"replay: FAILED: {rp['error']}")
        else:
            lines.append(
                f"replay: stored {rp['stored']:,} events in {rp['store_s']:.2f} s ({_f(rp['store_events_per_s'])}/s, "
                f"one sender, windowed); a fresh device of the same user replays and acks them:"
            )
            for x in rp["runs"]:
                cpu = f"client CPU {_f(x['client_cpu_pct'], 0)}%"
                if x.get("daemon_cpu_pct") is not None:
                    cpu += f", daemon CPU {_f(x['daemon_cpu_pct'], 0)}%"
                lines.append(
                    f"  page size {x['page_size']:>5}: {x['received']:,} events in {x['pages']} pages, "
                    f"{x['seconds']:.3f} s = {_f(x['events_per_s'])} events/s; dup {x['duplicates']}, "
                    f"loss {x['losses']}; {cpu}"
                )
    noisy = [
        (name, x)
        for name, result in sc.items()
        for x in result.get("daemon_log") or []
        if (x.get("warning") or 0) + (x.get("error") or 0)
    ]
    if noisy:
        lines += ["", "daemon logs (warnings and errors while measuring):"]
        for name, x in noisy:
            lines.append(f"  {name}, instance {x['instance']}: {x['warning']} warnings, {x['error']} errors")
            lines += [f"    {entry}" for entry in x["first"][:3]]
    if summary.get("targets"):
        lines += ["", "targets:"]
        width = max(62, *(len(t["target"]) for t in summary["targets"]))
        for t in summary["targets"]:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"  {t['target']:<{width}} {_f(t['value']):>10}  (goal {t['goal']}): {verdict}{note}")
    return "\n".join(lines)


# --- entry point ----------------------------------------------------------------------------------------


def _check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError(f"--url must be a ws:// URL on a loopback address (127.0.0.1), got {url!r}")


def _problems(result: dict[str, Any]) -> list[str]:
    """Why a scenario's figures are not clean (the exit status is then 1): errors, duplicates, losses."""
    if "error" in result:
        return ["did not complete"]
    out = []
    if result.get("duplicates"):
        out.append(f"{result['duplicates']} duplicates")
    if result.get("losses"):
        out.append(f"{result['losses']} losses")
    for mode in result.get("modes", []):
        if mode["unacked"] or mode["errors"]:
            out.append(f"{mode['label']}: {mode['unacked']} unacked, {len(mode['errors'])} errors")
    return out


async def _main(args: argparse.Namespace, params: Params, choice: BackendChoice, summary: dict[str, Any]) -> bool:
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    ok = True
    with tempfile.TemporaryDirectory(prefix="pb-bench-logs-") as logs:
        for name in chosen:
            workers = {"relay": min(params.processes, params.users), "replay": 1}.get(name, params.processes)
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                async with scenario_env(args, params, choice, workers, Path(logs), name) as env:
                    result = await RUNNERS[name](env, params)
                    result["daemon_pid"] = env.pid
                    logs_seen = [{"instance": d.instance, **d.log_summary()} for d in env.daemons]
                    if logs_seen:
                        result["daemon_log"] = logs_seen
                    if len(env.pids) > 1:
                        result["daemon_pids"] = env.pids
                    if env.database:
                        result["database"] = env.database
            except (BenchError, RuntimeError, OSError) as exc:  # RuntimeError: the daemon would not start
                result = {"error": str(exc), "duplicates": None, "losses": None}
                print(f"[bench] {name} failed: {exc}", file=sys.stderr, flush=True)
            problems = _problems(result)
            if problems:
                ok = False
                result["problems"] = problems
                print(f"[bench] {name}: {'; '.join(problems)}", file=sys.stderr, flush=True)
            result["wall_s"] = round(time.perf_counter() - t0, 2)
            summary["scenarios"][name] = result
    return ok


def _server_of(dsn: str) -> str:
    try:
        import psycopg.conninfo

        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001  (only a label)
        return "?"
    return f"{info.get('hostaddr') or info.get('host') or 'local socket'}:{info.get('port') or 5432}"


def backend_choice(args: argparse.Namespace) -> BackendChoice:
    """--backend, --bus, --dsn, --redis-url and --instances, checked (BenchError says what is wrong)."""
    choice = BackendChoice(
        storage=getattr(args, "backend", None) or "sqlite",
        bus=getattr(args, "bus", None) or "memory",
        admin_dsn=getattr(args, "dsn", None) or DEFAULT_DSN,
        redis_url=getattr(args, "redis_url", None) or DEFAULT_REDIS_URL,
        instances=getattr(args, "instances", None) or 1,
    )
    problems = choice.problems()
    if args.url:
        if choice.instances > 1:
            problems.append("--instances applies to the daemons the benchmark starts, not to --url")
        if getattr(args, "dsn", None) or getattr(args, "redis_url", None):
            problems.append("--dsn and --redis-url apply to the daemons the benchmark starts, not to --url")
    if problems:
        raise BenchError("; ".join(problems))
    return choice


def main(args: argparse.Namespace) -> int:
    if args.scenario == SOAK:  # its own flow, report and exit status (bench/soak.py)
        from .soak import main as soak_main

        return soak_main(args)
    try:
        params = Params.from_args(args)
        choice = backend_choice(args)
        if args.url:
            _check_loopback(args.url)
    except BenchError as exc:
        print(f"pocketbridge bench: {exc}", file=sys.stderr)
        return 2
    nofile = raise_nofile()  # inherited by the daemon and the workers
    # what else is running: the figures are only meaningful on an otherwise idle machine
    jif0 = machine_jiffies()
    time.sleep(0.5 if args.quick else 2.0)
    background = busy_cores(jif0, machine_jiffies())
    if background and background["busy"] > 0.2:
        print(
            f"[bench] warning: the machine is already busy ({background['busy']:.2f} cores) before the benchmark "
            "starts; the figures will be lower than on an idle machine",
            file=sys.stderr,
            flush=True,
        )
    summary: dict[str, Any] = {
        "pocketbridge": __version__,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "busy_cores_before_start": background and background["busy"]},
        "command": " ".join(["pocketbridge", *sys.argv[1:]]) if sys.argv else None,
        "target": args.url
        or (
            "daemon subprocess per scenario (python -m pocketbridge serve, fresh temp data dir)"
            if choice.instances == 1
            else f"{choice.instances} daemon subprocesses per scenario (python -m pocketbridge serve)"
        ),
        "backend": choice.storage,
        "bus": choice.bus,
        "instances": choice.instances,
        **({"backend_note": "declared with --backend/--bus for the --url server, not checked"} if args.url else {}),
        **(
            {
                "database": {
                    "server": _server_of(choice.admin_dsn),
                    "name": f"pocketbridge_bench_{os.getpid()}_<scenario>",
                    "lifecycle": "per scenario: CREATE DATABASE, pocketbridge migrate, DROP DATABASE ... WITH (FORCE)",
                },
            }
            if choice.storage == "postgres" and not args.url
            else {}
        ),
        **({"redis_url": choice.redis_url} if choice.bus == "redis" and not args.url else {}),
        "params": {**attrs.asdict(params), "quick": bool(args.quick)},
        "rlimit_nofile": nofile[0],
        "scenarios": {},
    }
    if not args.url:
        shape: dict[tuple[str, str], Any] = {("storage", "backend"): choice.storage, ("bus", "backend"): choice.bus}
        if choice.storage == "postgres":
            shape[("storage", "dsn")] = "(the benchmark's own database)"
        if choice.bus == "redis":
            shape[("bus", "url")] = choice.redis_url
        probe = DaemonProcess(
            config_file=args.config, devices=params.devices, log_level=args.daemon_log_level, shared=shape
        )
        try:
            summary["daemon"] = {
                **describe_config(probe.config),
                "env_overrides": {
                    k: v
                    for k, v in probe.overrides.items()
                    if "DATA_DIR" not in k
                    and "_FILE" not in k
                    and "PATH" not in k
                    and "LISTEN" not in k
                    and "DSN" not in k
                    and "INSTANCE_ID" not in k
                },
            }
        finally:
            probe.stop()
    try:
        ok = trio.run(_main, args, params, choice, summary)
    except KeyboardInterrupt:
        print("pocketbridge bench: interrupted", file=sys.stderr)
        return 130
    summary["targets"] = evaluate_targets(summary)
    print(render(summary), flush=True)
    text = json.dumps(summary, indent=2, sort_keys=False)
    print("\n" + text, flush=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if ok else 1
