"""The scenarios of ``pocketbridge bench --scenario NAME``: how each is run and what it needs.

A scenario is an async ``run(env, params) -> dict`` (the JSON result; see report.py for its text) with the number of
load-generator processes it uses, optionally its own parameters (from the command line) and daemon settings on top
of the benchmark's. The names and which of them ``--scenario all`` runs are in cli.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ..env import Env
from ..params import Params
from . import delete_account, fragmented, handshakes, memory, relay, replay


@attrs.frozen
class Scenario:
    run: Callable[[Env, Any], Awaitable[dict[str, Any]]]
    workers: Callable[[Params], int] = lambda p: p.processes
    params: Callable[[argparse.Namespace], Any] | None = None  # its own parameters; None: Params
    settings: Callable[[Any], dict[tuple[str, str], Any]] | None = None  # daemon settings from its parameters
    own_daemon: bool = False  # it needs the daemon it starts (no --url)


SCENARIOS: dict[str, Scenario] = {
    "relay": Scenario(relay.run, workers=lambda p: min(p.processes, p.users)),
    "handshakes": Scenario(handshakes.run),
    "memory": Scenario(memory.run),
    "replay": Scenario(replay.run, workers=lambda p: 1),
    "delete-account": Scenario(
        delete_account.run,
        workers=lambda p: 0,
        params=delete_account.DeleteParams.from_args,
        settings=delete_account.settings,
        own_daemon=True,
    ),
    "fragmented": Scenario(
        fragmented.run,
        workers=lambda p: 0,
        params=fragmented.FragmentParams.from_args,
        settings=fragmented.settings,
        own_daemon=True,
    ),
}
