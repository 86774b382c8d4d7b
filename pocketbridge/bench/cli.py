"""`pocketbridge bench` argument parsing (the load generator lives beside it)."""

from __future__ import annotations

import argparse
from typing import Any


def add_bench_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("bench", help="measure relay, handshakes, idle memory and replay")
    p.add_argument("--config", "-c", metavar="FILE", help="config for the daemon the benchmark starts")

    def run(args: argparse.Namespace) -> int:
        from .runner import main

        return main(args)

    p.set_defaults(func=run)
