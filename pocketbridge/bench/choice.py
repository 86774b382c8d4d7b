"""Which backends the bench's daemons use, from its command line (shared by the runner and the soak)."""

from __future__ import annotations

import argparse

from .daemon import BackendChoice
from .names import DEFAULT_DSN, DEFAULT_REDIS_URL
from .params import BenchError


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
