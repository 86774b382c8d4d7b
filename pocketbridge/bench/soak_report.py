"""The text report of the soak test (``pocketbridge bench --scenario soak``): samples over time, slopes, activity
and the verdict. Pure: from the JSON summary to text."""

from __future__ import annotations

from typing import Any


def _mib(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f}"


def _kib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 1024:,.0f}"


def _n(v: Any) -> str:
    return "n/a" if v is None else f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _scaled(value: float | None, factor: float, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value * factor:,.{digits}f}"


def _rows(samples: list[dict[str, Any]], most: int = 25) -> list[dict[str, Any]]:
    if len(samples) <= most:
        return samples
    picks = sorted({round(i * (len(samples) - 1) / (most - 1)) for i in range(most)})
    return [samples[i] for i in picks]


def render(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    d = summary.get("daemon") or {}
    lines = [
        f"PocketBridge {summary['pocketbridge']} soak — {m['cpu_model']}, {m['cores']} cores, {_n(m['ram_mib'])} MiB "
        f"RAM, Python {m['python']}, kernel {m['kernel']}; machine busy {_n(m.get('busy_cores_before_start'))} "
        "cores before the start",
        f"server: {summary['target']}; storage {d.get('storage_backend')}, bus {d.get('bus_backend')}, "
        f"log {d.get('log_level')}",
    ]
    r = summary.get("soak") or {}
    if "error" in r:
        lines.append(f"soak: FAILED: {r['error']}")
        return "\n".join(lines)
    p = summary["params"]
    lines.append(
        f"load {p['duration']:g} s: {p['churn_lanes']} churn lanes x {p['churn_rate']:g}/s, {p['event_users']} event "
        f"users at {p['event_rate']:g} events/s in {p['session_s']:g}-s sessions, {p['replay_users']} replay users "
        f"({p['replay_batch']} events per round), a pairing every {p['pairing_interval']:g} s over "
        f"{p['pairing_accounts']} accounts; samples every {p['interval']:g} s"
    )
    b = r["baseline"]
    pool_text = (
        f" ({_n(b['fds_adjusted'])} without pooled PostgreSQL connections)"
        if d.get("storage_backend") == "postgres"
        else ""
    )
    lines.append(
        f"idle baseline (after a warm-up round): {_n(b['fds'])} fds{pool_text}, {_n(b['tasks'])} trio tasks, RSS "
        f"{_mib(b['rss_kb'])} MiB, database {_kib(b['db_bytes'])} KiB"
    )
    lines.append("")
    lines.append(
        f"  {'t (s)':>7}{'RSS MiB':>9}{'fds':>6}{'tasks':>7}{'conns':>7}{'DB KiB':>9}{'CPU %':>7}"
        f"{'connects':>10}{'events':>9}{'replays':>9}{'pairings':>10}{'errors':>8}"
    )
    for s in _rows(r["samples"]):
        lines.append(
            f"  {s['t']:>7.1f}{_mib(s['rss_kb']):>9}{_n(s['fds']):>6}{_n(s['tasks']):>7}"
            f"{_n(s['connections_open']):>7}{_kib(s['db_bytes']):>9}{_pct(s['daemon_cpu_pct']):>7}"
            f"{s['connects']:>10,}{s['events']:>9,}{s['replays']:>9,}{s['pairings']:>10,}{s['errors']:>8,}"
        )
    lines.append("")
    # label, unit, scale and decimals of the values, scale of the slope, slope unit
    names = {
        "rss_kb": ("RSS", " MiB", 1 / 1024, 1, 1, " kB"),
        "fds": ("fds", "", 1, 0, 1, ""),
        "tasks": ("trio tasks", "", 1, 0, 1, ""),
        "db_bytes": ("database", " KiB", 1 / 1024, 0, 1 / 1024, " KiB"),
    }
    lines.append("  least-squares slope per minute over the load (and over its second half):")
    for key, (label, unit, scale, digits, slope_scale, slope_unit) in names.items():
        x = r["series"][key]
        lines.append(
            f"  {label:<11} start {_scaled(x['start'], scale, digits)}{unit}, "
            f"end {_scaled(x['end'], scale, digits)}{unit}, max {_scaled(x['max'], scale, digits)}{unit}; "
            f"slope {_scaled(x['slope_per_min'], slope_scale, 2)}{slope_unit}/min "
            f"(second half {_scaled(x['slope_per_min_second_half'], slope_scale, 2)}{slope_unit}/min)"
        )
    c = r["counts"]
    lines.append("")
    lines.append(
        f"activity: {c.get('connects', 0):,} handshakes; churn cycles {c.get('churn_full', 0):,} full, "
        f"{c.get('churn_aborted', 0):,} aborted in the handshake, {c.get('churn_reset', 0):,} TCP reset, "
        f"{c.get('churn_replaced', 0):,} replaced by a second connection; "
        f"{c.get('events_sent', 0):,} events sent, {c.get('events_received', 0):,} received live "
        f"({c.get('event_losses', 0)} lost, {c.get('event_duplicates', 0)} duplicates); {c.get('replays', 0):,} "
        f"replays of {c.get('replayed_events', 0):,} events ({c.get('replay_events_stored', 0):,} stored for them) in "
        f"{c.get('replay_pages', 0):,} pages "
        f"({c.get('replay_losses', 0)} lost, {c.get('replay_redelivered', 0)} redelivered); "
        f"{c.get('pairings', 0):,} pairings, {c.get('revocations', 0):,} revocations"
    )
    e = r["errors"]
    if e["count"]:
        lines.append(f"errors: {e['count']} ({', '.join(f'{k} {v}' for k, v in e['by_activity'].items())})")
        lines += [f"  {text}" for text in e["first"][:5]]
    log = r.get("daemon_log") or {}
    if (log.get("warning") or 0) + (log.get("error") or 0):
        lines.append(f"daemon log: {log['warning']} warnings, {log['error']} errors")
        lines += [f"  {entry}" for entry in log.get("first", [])[:3]]
    f = r["final"]
    v = r["verdict"]
    lines.append("")
    pooled = d.get("storage_backend") == "postgres"
    fds_text = (
        f"{_n(f['fds'])} fds, {_n(f['fds_adjusted'])} without the {_n(f['store_pool_size'])} pooled PostgreSQL "
        f"connections (limit {_n(r['limits']['fds'])})"
        if pooled
        else f"{_n(f['fds'])} fds (limit {_n(r['limits']['fds'])})"
    )
    lines.append(
        f"after the load ({r['settle_s']:g} s to settle): {fds_text}, {_n(f['tasks'])} trio tasks (limit "
        f"{_n(r['limits']['tasks'])}), {_n(f['connections_open'])} connections open, RSS {_mib(f['rss_kb'])} MiB"
    )
    if v["ok"]:
        verdict_text = "no leak: fds and trio tasks back to the idle baseline; every activity ran without errors"
    else:
        verdict_text = "; ".join(
            ([f"LEAK: {'; '.join(v['leaks'])}"] if v["leaks"] else []) + v["problems"]
        )
    lines.append(f"verdict: {verdict_text}")
    return "\n".join(lines)
