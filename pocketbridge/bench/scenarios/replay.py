"""replay: one sender stores N events (windowed); a fresh device of the same user replays and acks them, page by
page, once per page size (the worker's ``replay`` command)."""

from __future__ import annotations

from typing import Any

from ..env import Env
from ..params import Params


async def run(env: Env, p: Params) -> dict[str, Any]:
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
