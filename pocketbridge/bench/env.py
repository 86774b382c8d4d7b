"""The environment of one scenario: its daemon instance(s) (sharing a fresh database, the bus and one key), its
load-generator processes, and CPU readings of them and of the machine."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from .daemon import BackendChoice, DaemonProcess, SharedBackend
from .params import BenchError, Params
from .stats import delta
from .sysinfo import (
    busy_cores,
    cpu_by_command,
    cpu_seconds,
    machine_jiffies,
    main_thread_cpu_seconds,
    rss_kb,
)
from .workers import WorkerProc

DATABASE_COMMANDS = ("postgres", "redis-server")  # their CPU is reported beside the daemons' when they are in use


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
    args: argparse.Namespace | None = None  # the command line (for daemons a scenario starts itself)

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

    @property
    def database_measure(self) -> str:
        """What :meth:`database_bytes` measures."""
        return "pg_database_size" if self.shared is not None and self.shared.dbname else "SQLite file + WAL"

    async def database_bytes(self) -> int | None:
        """The size of the first daemon's database: the SQLite file + WAL, or pg_database_size (None if unknown)."""
        if self.shared is not None and self.shared.dbname is not None:
            return await trio.to_thread.run_sync(self.shared.database_bytes)
        if not self.daemons or self.daemons[0].config.storage.backend != "sqlite":
            return None
        path = self.daemons[0].config.sqlite_path()
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{path}{suffix}").st_size
        return total

    def check_alive(self) -> None:
        for d in self.daemons:
            status = d.exit_status()
            if status is not None:
                raise BenchError(f"daemon instance {d.instance} died (exit {status}):\n{d.log_tail()}")


def daemon_cpu(s0: Sample, s1: Sample, seconds: float) -> dict[str, Any] | None:
    """The daemons' CPU between two samples: total, and per instance (whole process and event-loop thread)."""
    cpu = [delta(a, b) for a, b in zip(s0.cpu, s1.cpu, strict=True)]
    loop = [delta(a, b) for a, b in zip(s0.loop, s1.loop, strict=True)]
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


def machine_load(s0: Sample, s1: Sample, replies: list[dict[str, Any]]) -> dict[str, Any] | None:
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
        "steal_cores": load["steal"],
        "bench_processes_cores": ours_cores,
    }
    databases = 0.0
    if s0.databases is not None and s1.databases is not None:
        for name in DATABASE_COMMANDS:
            cores = max(0.0, (s1.databases[name] - s0.databases[name]) / wall)
            out[f"{name.replace('-', '_')}_cores"] = round(cores, 2)
            databases += cores
    out["other_cores"] = round(max(0.0, load["busy"] - ours_cores - load["softirq"] - load["steal"] - databases), 2)
    return out


async def start_daemon(
    args: argparse.Namespace,
    devices: int,
    *,
    settings: dict[tuple[str, str], Any] | None = None,
    instance: int = 1,
) -> DaemonProcess:
    """A started daemon with the benchmark's settings (and ``settings``); the caller stops it."""
    daemon = DaemonProcess(
        config_file=args.config,
        devices=devices,
        log_level=args.daemon_log_level,
        settings=settings,
        instance=instance,
    )
    try:
        await trio.to_thread.run_sync(daemon.start)
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(daemon.stop)
        raise
    return daemon


async def stop_daemon(daemon: DaemonProcess) -> None:
    await trio.to_thread.run_sync(daemon.stop)


@asynccontextmanager
async def scenario_env(
    args: argparse.Namespace,
    params: Params,
    choice: BackendChoice,
    workers: int,
    log_dir: Path,
    tag: str,
    *,
    settings: dict[tuple[str, str], Any] | None = None,
) -> AsyncIterator[Env]:
    """The daemon instance(s) (sharing a fresh database, the bus and one key; with ``settings`` on top of the
    benchmark's) and the worker processes of one scenario; everything is stopped, and the database dropped, on the
    way out."""
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
                        settings=settings,
                        instance=i + 1,
                    )
                )
                await trio.to_thread.run_sync(daemons[-1].start)
            urls, pids = [d.url for d in daemons], [d.pid for d in daemons]
        procs = [WorkerProc(i, log_dir) for i in range(workers)]
        for w in procs:
            await w.start()
        yield Env(urls, pids, procs, daemons, choice, shared, args)
    finally:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:  # each stop is bounded; all at once
                for w in procs:
                    nursery.start_soon(w.stop)
            async with trio.open_nursery() as nursery:
                for d in daemons:
                    nursery.start_soon(stop_daemon, d)
            if shared is not None:
                await trio.to_thread.run_sync(shared.teardown)
