"""`pocketbridge bench` argument parsing (the load generator lives beside it)."""

from __future__ import annotations

import argparse
from typing import Any

from .names import DEFAULT_DSN, DEFAULT_REDIS_URL, MORE, SCENARIOS, SOAK


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_bench_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "bench",
        help="measure relay, handshakes, idle memory, replay, account deletion, fragmented messages; soak for leaks",
        description=(
            "Load-test a PocketBridge daemon over loopback. Without --url, each scenario starts its own daemon "
            "(python -m pocketbridge serve) with a fresh temporary data dir, free 127.0.0.1 ports and the per-user "
            "and per-address limits lifted, and stops it afterwards. Prints a table, then a JSON summary."
        ),
    )
    p.add_argument("--config", "-c", metavar="FILE", help="config for the daemon the benchmark starts")
    p.add_argument("--url", metavar="WS_URL", help="benchmark this running server (loopback) instead of starting one")
    p.add_argument("--server-pid", type=int, metavar="PID", help="with --url: the server's PID, for RSS and CPU")
    p.add_argument(
        "--scenario",
        choices=(*SCENARIOS, "all", *MORE, SOAK),
        default="all",
        help="what to measure (default: all = relay, handshakes, memory, replay). delete-account: store an account "
        "of --account-mib MiB, delete it (DELETE /api/user) and time it, with another user's ping round trips "
        "meanwhile. fragmented: stream a --message-mib MiB message as --fragment-bytes continuation frames over one "
        "connection, sampling the daemon's RSS, and show the 1009 close at the default fragment limit. soak: churn, "
        "events, replays and pairings for --duration seconds against one daemon, sampling its RSS, fds, trio tasks "
        "and database size; exits 1 if fds or tasks do not return to the idle baseline",
    )
    p.add_argument(
        "--backend",
        choices=("sqlite", "postgres"),
        help="storage of the daemons the benchmark starts (default sqlite; overrides the config file). postgres: a "
        "fresh database is created on the --dsn server for each scenario, migrated, and dropped afterwards",
    )
    p.add_argument("--bus", choices=("memory", "redis"), help="bus between instances (default memory)")
    p.add_argument(
        "--dsn",
        metavar="DSN",
        help=f"with --backend postgres: a loopback PostgreSQL server the benchmark may create and drop its own "
        f"databases on (default {DEFAULT_DSN}; that database itself is only used to connect)",
    )
    p.add_argument(
        "--redis-url", metavar="URL", help=f"with --bus redis: a loopback Redis server (default {DEFAULT_REDIS_URL})"
    )
    p.add_argument(
        "--instances",
        type=_positive(int),
        metavar="N",
        help="daemons sharing the database, the Redis bus and one identity key (default 1; > 1 needs --backend "
        "postgres --bus redis). Relay: each user's sender on instance 1, its receivers alternately on 1..N",
    )
    p.add_argument("--quick", action="store_true", help="a small, fast run (smoke test)")
    p.add_argument(
        "--duration",
        type=_positive(float),
        metavar="S",
        help="seconds per relay mode (default 10; quick 2); soak: seconds of load (default 600; quick 30)",
    )
    p.add_argument(
        "--sample-interval",
        type=_positive(float),
        metavar="S",
        help="soak: seconds between samples of the daemon (default duration/60, between 0.5 and 5)",
    )
    p.add_argument(
        "--settle",
        type=_positive(float),
        metavar="S",
        help="soak: max seconds to wait, after the load, for fds and tasks to return to the baseline (default 60)",
    )
    p.add_argument(
        "--rate",
        type=_positive(float),
        nargs="+",
        metavar="R",
        help="open-loop total event rates per second (default: 150 and 500; 300 with --backend postgres)",
    )
    p.add_argument("--window", type=_positive(int), metavar="W", help="closed loop: in-flight events per sender (32)")
    p.add_argument("--users", type=_positive(int), metavar="U", help="relay users (default 20; quick 3)")
    p.add_argument("--devices", type=int, metavar="D", help="devices per relay user, >= 2 (default 3)")
    p.add_argument("--processes", type=_positive(int), metavar="N", help="load-generator processes (default 2)")
    p.add_argument("--payload-bytes", type=int, metavar="B", help="event payload size, >= 17 (default 256)")
    p.add_argument("--drain", type=_positive(float), metavar="S", help="max wait for stragglers after sending (10)")
    p.add_argument("--handshakes", type=_positive(int), metavar="N", help="handshakes (default 500; quick 50)")
    p.add_argument("--concurrency", type=_positive(int), metavar="C", help="concurrent handshakes (default 100)")
    p.add_argument("--idle", type=_positive(int), metavar="N", help="idle connections (default 1000; quick 50)")
    p.add_argument("--replay-events", type=_positive(int), metavar="N", help="events to replay (5000; quick 500)")
    p.add_argument(
        "--account-mib", type=_positive(float), metavar="M", help="delete-account: MiB of events (500; quick 20)"
    )
    p.add_argument(
        "--event-mib", type=_positive(float), metavar="M", help="delete-account: MiB per event, <= 10 (10; quick 2)"
    )
    p.add_argument(
        "--message-mib", type=_positive(float), metavar="M", help="fragmented: message size in MiB, <= 16 (16; quick 1)"
    )
    p.add_argument(
        "--fragment-bytes",
        type=_positive(int),
        nargs="+",
        metavar="B",
        help="fragmented: payload bytes per continuation frame, one run each (default 4096 and 64; quick 64)",
    )
    p.add_argument("--daemon-log-level", default="warning", choices=("debug", "info", "warning", "error"))
    p.add_argument("--json", metavar="FILE", help="also write the JSON summary here")

    def run(args: argparse.Namespace) -> int:
        from .runner import main  # the runner imports psycopg and redis: not for `pocketbridge serve`

        return main(args)

    p.set_defaults(func=run)
