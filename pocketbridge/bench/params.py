"""What the benchmark's scenarios take from the command line (sizes, durations, rates), and its error type."""

from __future__ import annotations

import argparse

import attrs


class BenchError(Exception):
    """A benchmark that cannot run or did not complete (printed; the exit status is 1, or 2 for bad arguments)."""


@attrs.define
class Params:
    """The relay, handshakes, memory and replay scenarios (the ones of ``--scenario all``)."""

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
        for name in (
            "users",
            "devices",
            "duration",
            "window",
            "processes",
            "payload_bytes",
            "drain",
            "handshakes",
            "concurrency",
            "idle",
            "replay_events",
        ):
            value = getattr(args, name, None)
            if value is not None:
                setattr(p, name, value)
        if args.rate:
            p.rates = list(args.rate)
        elif (getattr(args, "backend", None) or "sqlite") == "postgres":
            p.rates = [300.0]
        if p.devices < 2:
            raise BenchError("--devices must be at least 2 (one sender, at least one receiver)")
        if p.payload_bytes < 17:
            raise BenchError("--payload-bytes must be at least 17 (phase, counter and timestamp)")
        return p
