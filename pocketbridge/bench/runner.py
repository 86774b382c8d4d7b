"""`pocketbridge bench`: orchestrates daemon, load-generator worker processes, scenarios and the report.

Each scenario (relay, handshakes, memory, replay) gets its own daemon subprocess unless --url is given, and its
own worker processes (``python -m pocketbridge.bench.worker``, see worker.py for the line protocol). Everything
started here is stopped in ``finally`` blocks; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
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
from .cli import SCENARIOS
from .daemon import DaemonProcess, describe_config
from .sysinfo import (
    busy_cores,
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
class Env:
    url: str
    pid: int | None
    workers: list[WorkerProc]
    daemon: DaemonProcess | None

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid else None

    def loop_cpu(self) -> float | None:
        return main_thread_cpu_seconds(self.pid) if self.pid else None

    def rss(self) -> int | None:
        return rss_kb(self.pid) if self.pid else None

    def check_alive(self) -> None:
        if self.daemon is not None and self.daemon.proc is not None and self.daemon.proc.poll() is not None:
            raise BenchError(f"the daemon died (exit {self.daemon.proc.returncode}):\n{self.daemon.log_tail()}")


@asynccontextmanager
async def scenario_env(args: argparse.Namespace, params: Params, workers: int, log_dir: Path) -> AsyncIterator[Env]:
    daemon: DaemonProcess | None = None
    procs: list[WorkerProc] = []
    try:
        if args.url:
            url, pid = args.url, args.server_pid
        else:
            daemon = DaemonProcess(config_file=args.config, devices=params.devices, log_level=args.daemon_log_level)
            await trio.to_thread.run_sync(daemon.start)
            url, pid = daemon.url, daemon.pid
        procs = [WorkerProc(i, log_dir) for i in range(workers)]
        for w in procs:
            await w.start()
        yield Env(url, pid, procs, daemon)
    finally:
        with trio.CancelScope(shield=True):
            for w in procs:
                await w.stop()
            if daemon is not None:
                await trio.to_thread.run_sync(daemon.stop)


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
        cpu0, loop0, jif0, t0 = env.cpu(), env.loop_cpu(), machine_jiffies(), time.time()
        replies = await call_all(workers, [cmd] * len(workers), timeout=p.duration + 2 * p.drain + 60)
        cpu1, loop1, jif1, t1 = env.cpu(), env.loop_cpu(), machine_jiffies(), time.time()
        summary = _relay_summary(mode, replies, cpu0, cpu1, p.duration)
        if loop0 is not None and loop1 is not None and "daemon" in summary and summary["active_s"] > 0:
            summary["daemon"]["main_thread_cpu_pct"] = round(100 * (loop1 - loop0) / summary["active_s"], 1)
        summary["machine_load"] = _machine_load(jif0, jif1, t1 - t0, cpu0, cpu1, replies)
        results.append(summary)
    await call_all(workers, [{"cmd": "relay_teardown", "timeout": 15}] * len(workers), timeout=30)
    return {
        "users": p.users,
        "devices": p.devices,
        "receivers_per_user": p.devices - 1,
        "processes": len(workers),
        "payload_bytes": p.payload_bytes,
        "duration_s": p.duration,
        "setup_s": max(r["setup_s"] for r in setup),
        "modes": results,
        "duplicates": sum(m["duplicates"] for m in results),
        "losses": sum(m["losses"] for m in results),
        "daemon_rss_kb_after": env.rss(),
    }


def _machine_load(
    jif0: Any, jif1: Any, wall: float, cpu0: float | None, cpu1: float | None, replies: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Cores busy on the whole machine over a step, and how much of it was the daemon and the workers."""
    load = busy_cores(jif0, jif1)
    if load is None or wall <= 0:
        return None
    ours = sum(r["cpu"]["user"] + r["cpu"]["sys"] for r in replies)
    if cpu0 is not None and cpu1 is not None:
        ours += cpu1 - cpu0
    ours_cores = round(ours / wall, 2)
    return {
        "machine_busy_cores": load["busy"],
        "softirq_cores": load["softirq"],
        "bench_processes_cores": ours_cores,
        "other_cores": round(max(0.0, load["busy"] - ours_cores - load["softirq"]), 2),
    }


def _relay_summary(
    mode: dict[str, Any], replies: list[dict[str, Any]], cpu0: float | None, cpu1: float | None, duration: float
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
    if cpu0 is not None and cpu1 is not None:
        out["daemon"] = {
            "cpu_s": round(cpu1 - cpu0, 2),
            "cpu_pct": round(100 * (cpu1 - cpu0) / active, 1) if active > 0 else None,
        }
    return out


async def run_handshakes(env: Env, p: Params) -> dict[str, Any]:
    workers = env.workers
    counts = split(p.handshakes, len(workers))
    conc = [max(1, c) for c in split(p.concurrency, len(workers))]
    start_at = time.time() + 1.0 + p.handshakes / 2000  # key generation happens before
    cpu0, loop0, jif0, t0 = env.cpu(), env.loop_cpu(), machine_jiffies(), time.time()
    replies = await call_all(
        workers,
        [
            {"cmd": "handshakes", "url": env.url, "count": n, "concurrency": c, "start_at": start_at, "timeout": 30}
            for n, c in zip(counts, conc, strict=True)
        ],
        timeout=120 + p.handshakes / 10,
    )
    cpu1, loop1, jif1, t1 = env.cpu(), env.loop_cpu(), machine_jiffies(), time.time()
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
        "machine_load": _machine_load(jif0, jif1, t1 - t0, cpu0, cpu1, replies),
    }
    if cpu0 is not None and cpu1 is not None:
        out["daemon"] = {
            "cpu_s": round(cpu1 - cpu0, 2),
            "cpu_pct": round(100 * (cpu1 - cpu0) / wall, 1) if wall else None,
        }
        if loop0 is not None and loop1 is not None and wall:
            out["daemon"]["main_thread_cpu_pct"] = round(100 * (loop1 - loop0) / wall, 1)
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
        "note": None if env.pid else "daemon PID unknown (use --server-pid with --url): RSS is N/A",
        "duplicates": 0,
        "losses": sum(r["failed"] for r in replies),
    }


async def run_replay(env: Env, p: Params) -> dict[str, Any]:
    reply = await env.workers[0].call(
        {
            "cmd": "replay",
            "url": env.url,
            "events": p.replay_events,
            "window": p.replay_window,
            "page_sizes": p.replay_page_sizes,
            "timeout": 60 + p.replay_events / 100,
            "daemon_pid": env.pid,
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
    return (
        f"machine: {load['machine_busy_cores']:.2f} cores busy = daemon+workers {load['bench_processes_cores']:.2f}"
        f" + softirq {load['softirq_cores']:.2f} + other processes {load['other_cores']:.2f}"
    )


def evaluate_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    sc = summary["scenarios"]
    rows: list[dict[str, Any]] = []

    def add(name: str, value: Any, target: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        rows.append(
            {"target": name, "value": value, "goal": f"{'>=' if higher_is_better else '<='} {target:g}", "met": met}
        )

    relay = sc.get("relay") or {}
    for m in relay.get("modes", []):
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
        ),
    ]
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
                if load:
                    loop = (x.get("daemon") or {}).get("main_thread_cpu_pct")
                    loop_text = f"daemon event-loop thread {_f(loop, 0)}%; " if loop is not None else ""
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
    if summary.get("targets"):
        lines += ["", "targets:"]
        for t in summary["targets"]:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            lines.append(f"  {t['target']:<62} {_f(t['value']):>10}  (goal {t['goal']}): {verdict}")
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


async def _main(args: argparse.Namespace, params: Params, summary: dict[str, Any]) -> bool:
    chosen = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    ok = True
    with tempfile.TemporaryDirectory(prefix="pb-bench-logs-") as logs:
        for name in chosen:
            workers = {"relay": min(params.processes, params.users), "replay": 1}.get(name, params.processes)
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                async with scenario_env(args, params, workers, Path(logs)) as env:
                    result = await RUNNERS[name](env, params)
                    result["daemon_pid"] = env.pid
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


def main(args: argparse.Namespace) -> int:
    try:
        params = Params.from_args(args)
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
        "target": args.url or "daemon subprocess per scenario (python -m pocketbridge serve, fresh temp data dir)",
        "params": {**attrs.asdict(params), "quick": bool(args.quick)},
        "rlimit_nofile": nofile[0],
        "scenarios": {},
    }
    if not args.url:
        probe = DaemonProcess(config_file=args.config, devices=params.devices, log_level=args.daemon_log_level)
        try:
            summary["daemon"] = {
                **describe_config(probe.config),
                "env_overrides": {
                    k: v
                    for k, v in probe.overrides.items()
                    if "DATA_DIR" not in k and "_FILE" not in k and "PATH" not in k and "LISTEN" not in k
                },
            }
        finally:
            probe.stop()
    try:
        ok = trio.run(_main, args, params, summary)
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
