"""`pocketbridge bench`: runs the chosen scenarios, each against its own daemon(s) and load generators, then prints
the report and the JSON summary.

Each scenario (scenarios/*.py; relay, handshakes, memory, replay are ``--scenario all``) gets its own daemon
subprocess (daemon.py, on launcher.py) unless --url is given, and its own worker processes (``python -m
pocketbridge.bench.worker``, see worker.py for the line protocol); see env.py. Everything started is stopped in
``finally`` blocks; every wait has a timeout. The soak test (soak.py) has its own flow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg.conninfo
import trio

from .. import __version__
from .choice import backend_choice
from .daemon import BackendChoice, DaemonProcess, describe_config
from .env import scenario_env
from .names import SCENARIOS, SOAK
from .params import BenchError, Params
from .report import render
from .scenarios import SCENARIOS as RUNNERS
from .soak import main as soak_main
from .sysinfo import busy_cores, machine_info, machine_jiffies, raise_nofile
from .targets import evaluate_targets


def _check_loopback(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise BenchError(f"--url must be a ws:// URL on a loopback address (127.0.0.1), got {url!r}")


def _problems(result: dict[str, Any]) -> list[str]:
    """Why a scenario's figures are not clean (the exit status is then 1): errors, duplicates, losses, and the
    checks a scenario reports as failed."""
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
    out += result.get("failed_checks", [])
    return out


def chosen_scenarios(args: argparse.Namespace) -> list[str]:
    return list(SCENARIOS) if args.scenario == "all" else [args.scenario]


def scenario_params(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The own parameters of the chosen scenarios that have some (BenchError if they do not fit)."""
    out = {}
    for name in names:
        scenario = RUNNERS[name]
        if scenario.own_daemon and args.url:
            raise BenchError(f"--scenario {name} measures the daemon it starts; --url is not supported")
        if scenario.params is not None:
            out[name] = scenario.params(args)
    return out


async def _main(
    args: argparse.Namespace,
    params: Params,
    choice: BackendChoice,
    summary: dict[str, Any],
    own: dict[str, Any] | None = None,
) -> bool:
    own = own or {}
    ok = True
    with tempfile.TemporaryDirectory(prefix="pb-bench-logs-") as logs:
        for name in chosen_scenarios(args):
            scenario = RUNNERS[name]
            these = own.get(name, params)
            settings = scenario.settings(these) if scenario.settings is not None else None
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                async with scenario_env(
                    args, params, choice, scenario.workers(params), Path(logs), name, settings=settings
                ) as env:
                    async with trio.open_nursery() as ticker:
                        ticker.start_soon(_still_running, name, t0)
                        result = await scenario.run(env, these)
                        ticker.cancel_scope.cancel()
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


async def _still_running(name: str, started: float, every: float = 15.0) -> None:
    """Progress during a long phase, on stderr (the table comes last, on stdout)."""
    while True:
        await trio.sleep(every)
        print(f"[bench] {name}: still running ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def _server_of(dsn: str) -> str:
    try:

        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001  (only a label)
        return "?"
    return f"{info.get('hostaddr') or info.get('host') or 'local socket'}:{info.get('port') or 5432}"


def main(args: argparse.Namespace) -> int:
    if args.scenario == SOAK:  # its own flow, report and exit status (bench/soak.py)

        return soak_main(args)
    try:
        params = Params.from_args(args)
        choice = backend_choice(args)
        if args.url:
            _check_loopback(args.url)
        own = scenario_params(args, chosen_scenarios(args))
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
        **({"scenario_params": {name: attrs.asdict(p) for name, p in own.items()}} if own else {}),
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
        ok = trio.run(_main, args, params, choice, summary, own)
    except KeyboardInterrupt:
        print("pocketbridge bench: interrupted", file=sys.stderr)
        return 130
    summary["targets"] = evaluate_targets(summary)
    if args.json:  # the whole summary, for tools; the terminal gets the table, last
        Path(args.json).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    print(render(summary), flush=True)
    return 0 if ok else 1
