"""The text report of ``pocketbridge bench``: a header (machine, server), one section per scenario that ran, the
daemon's warnings and errors, and the targets. Pure: from the JSON summary to text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def num(value: Any, digits: int = 1) -> str:
    """A number for the table: thousands separated, floats with ``digits`` decimals; None is n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def lat(d: dict[str, Any]) -> str:
    """p50/p95/p99 of a percentiles dict."""
    return "/".join("n/a" if d.get(k) is None else f"{d[k]:.1f}" for k in ("p50", "p95", "p99"))


def load_text(load: dict[str, Any]) -> str:
    databases = ""
    if "postgres_cores" in load:
        databases = f" + PostgreSQL {load['postgres_cores']:.2f} + Redis {load['redis_server_cores']:.2f}"
    return (
        f"machine: {load['machine_busy_cores']:.2f} cores busy = daemon+workers {load['bench_processes_cores']:.2f}"
        f"{databases} + softirq {load['softirq_cores']:.2f} + steal {load.get('steal_cores', 0.0):.2f}"
        f" + other processes {load['other_cores']:.2f}"
    )


def header(summary: dict[str, Any]) -> list[str]:
    m, d = summary["machine"], summary.get("daemon") or {}
    lines = [
        (
            f"PocketBridge {summary['pocketbridge']} benchmark — {m['cpu_model']}, {m['cores']} cores, "
            f"{num(m['ram_mib'])} MiB RAM, Python {m['python']}, kernel {m['kernel']}"
        ),
        f"server: {summary['target']}"
        + (
            f"; storage {d.get('storage_backend')}"
            + (f" (synchronous={d['sqlite_synchronous']})" if d.get("sqlite_synchronous") else "")
            + f", bus {d.get('bus_backend')}, log {d.get('log_level')}"
            if d
            else ""
        )
        + (
            f"; PostgreSQL database {summary['database']['name']} on {summary['database']['server']} "
            "(fresh per scenario, dropped after)"
            if summary.get("database")
            else ""
        ),
    ]
    if summary.get("instances", 1) > 1:
        lines.append(
            f"instances: {summary['instances']} daemons sharing that database, the Redis bus and one identity key"
        )
    return lines


# --- one section per scenario -------------------------------------------------------------------------------------
def relay(r: dict[str, Any]) -> list[str]:
    lines = [
        f"relay: {r['users']} users x {r['devices']} devices (1 sender, {r['receivers_per_user']} receivers "
        f"acking by device_seq), {r['processes']} generator processes, {r['payload_bytes']} B payloads, "
        f"{r['duration_s']:g} s per mode"
    ]
    if r.get("instances", 1) > 1:
        lines.append(f"  {r['instances']} instances: {r['placement']}; daemon CPU = sum over instances")
    lines.append(
        f"  {'mode':<14}{'sent':>8}{'acked/s':>10}{'all-dev/s':>11}{'ack p50/95/99 ms':>22}"
        f"{'deliv p50/95/99':>22}{'all-dev p50/95/99':>22}{'dup':>5}{'loss':>6}{'daemon':>8}  workers CPU"
    )
    for x in r["modes"]:
        lines += relay_mode(x)
    return lines


def relay_mode(x: dict[str, Any]) -> list[str]:
    daemon_cpu = f"{num(x['daemon']['cpu_pct'], 0)}%" if x.get("daemon") else "n/a"
    wcpu = " ".join(f"{num(w['cpu_pct'], 0)}%" for w in x["workers"])
    lines = [
        f"  {x['label']:<14}{x['sent']:>8,}{num(x['events_per_s_acked']):>10}"
        f"{num(x['events_per_s_delivered_all']):>11}{lat(x['ack_latency_ms']):>22}"
        f"{lat(x['delivery_latency_ms']):>22}{lat(x['delivery_all_latency_ms']):>22}"
        f"{x['duplicates']:>5}{x['losses']:>6}{daemon_cpu:>8}  {wcpu}"
    ]
    load = x.get("machine_load")
    per_instance = (x.get("daemon") or {}).get("instances")
    if per_instance:
        lines.append(
            "    daemon CPU per instance: "
            + ", ".join(
                f"#{i['instance']} {num(i['cpu_pct'], 0)}% (event loop {num(i['main_thread_cpu_pct'], 0)}%)"
                for i in per_instance
            )
            + "; delivery p50/95/99 ms by receiver instance: "
            + ", ".join(f"#{i['instance']} {lat(i)}" for i in x.get("delivery_latency_ms_by_receiver_instance", []))
        )
    pg = x.get("postgres")
    if pg:
        lines.append(
            f"    PostgreSQL (benchmark database): {num(pg.get('commits_per_s'))} commits/s, "
            f"{pg['rows_inserted']:,} rows inserted, {pg['rows_updated']:,} updated, "
            f"{pg['rollbacks']} rollbacks, {pg['deadlocks']} deadlocks"
        )
    if load:
        loop = (x.get("daemon") or {}).get("main_thread_cpu_pct")
        threads = "threads" if per_instance else "thread"
        loop_text = f"daemon event-loop {threads} {num(loop, 0)}%; " if loop is not None else ""
        lines.append(f"    {loop_text}{load_text(load)}")
    if x["unacked"] or x["errors"]:
        lines.append(f"    unacked {x['unacked']}; errors: {'; '.join(x['errors'][:3]) or 'none'}")
    return lines


def handshakes(h: dict[str, Any]) -> list[str]:
    daemon_cpu = f", daemon CPU {num(h['daemon']['cpu_pct'], 0)}%" if h.get("daemon") else ""
    lines = [
        f"handshakes: {h['completed']:,}/{h['count']:,} (concurrency {h['concurrency']}) in {h['seconds']:.2f} s "
        f"= {num(h['handshakes_per_s'])}/s; latency p50 {num(h['latency_ms']['p50'])} ms, "
        f"p99 {num(h['latency_ms']['p99'])} ms; failures {h['failed']}{daemon_cpu}; "
        f"workers CPU {' '.join(num(w['cpu_pct'], 0) + '%' for w in h['workers'])}"
    ]
    if h.get("machine_load"):
        lines.append(f"  {load_text(h['machine_load'])}")
    if h["failures"]:
        lines.append(f"  failures: {'; '.join(h['failures'][:3])}")
    return lines


def memory(mm: dict[str, Any]) -> list[str]:
    lines = [
        f"memory: {mm['opened']:,}/{mm['connections']:,} idle handshaken connections (opened in "
        f"{mm['open_s']:.1f} s); daemon RSS {num(mm['rss_kb_before'])} kB -> {num(mm['rss_kb_with_connections'])} kB "
        f"(after close {num(mm['rss_kb_after_close'])} kB) = {num(mm['kb_per_connection'])} kB per connection"
    ]
    if mm.get("note"):
        lines.append(f"  {mm['note']}")
    return lines


def replay(rp: dict[str, Any]) -> list[str]:
    lines = [
        f"replay: stored {rp['stored']:,} events in {rp['store_s']:.2f} s ({num(rp['store_events_per_s'])}/s, "
        f"one sender, windowed); a fresh device of the same user replays and acks them:"
    ]
    for x in rp["runs"]:
        cpu = f"client CPU {num(x['client_cpu_pct'], 0)}%"
        if x.get("daemon_cpu_pct") is not None:
            cpu += f", daemon CPU {num(x['daemon_cpu_pct'], 0)}%"
        if x.get("full_resync"):
            lines.append(f"  page size {x['page_size']:>5}: full_resync_required instead of a replay; {cpu}")
            continue
        lines.append(
            f"  page size {x['page_size']:>5}: {x['received']:,} events in {x['pages']} pages, "
            f"{x['seconds']:.3f} s = {num(x['events_per_s'])} events/s; dup {x['duplicates']}, "
            f"loss {x['losses']}; {cpu}"
        )
    return lines


PINGS_HEAD = "another user's app pings, back to back"


def _ms(d: dict[str, Any], key: str) -> str:
    value = d.get(key)
    return "n/a" if value is None else f"{value:.1f}"


def delete_account(x: dict[str, Any]) -> list[str]:
    store, ping, deleted = x["store"], x["pings"], x["deleted"]
    lines = [
        f"delete-account: {x['events_stored']:,} events of {x['event_mib']:g} MiB in one account "
        f"({store['mib']:,.0f} MiB stored in {store['seconds']:.1f} s, {num(store['mib_per_s'])} MiB/s); "
        f"DELETE /api/user answered {x['status']} in {x['delete_s']:.2f} s "
        f"(deleted: {num(deleted.get('events'))} events, {num(deleted.get('devices'))} devices)",
        f"  {PINGS_HEAD:<48}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for label, key in (("before the deletion", "before"), ("during the deletion", "during")):
        d = ping[key]
        lines.append(f"    {label:<46}{d['count']:>7,}{_ms(d, 'p50'):>9}{_ms(d, 'p99'):>9}{_ms(d, 'max'):>9}")
    db = x.get("database_mib")
    if db is not None:
        lines.append(f"  database ({db['measure']}): {num(db['before'])} MiB before, {num(db['after'])} MiB after")
    rss = x.get("daemon_rss_kb")
    if rss:
        lines.append(f"  daemon RSS: {num(rss['before'])} kB before, at most {num(rss['max_during'])} kB during")
    return lines


def fragmented(x: dict[str, Any]) -> list[str]:
    lines = [
        f"fragmented: a {x['message_mib']:g} MiB text message (an app ping) in continuation frames over one "
        f"established connection, each fragment size on a fresh daemon allowing {x['max_fragments']:,} fragments "
        f"per message; RSS sampled every {x['sample_interval_s']:g} s",
        f"  {'fragment':>10}{'frames':>11}{'wire MiB':>10}{'seconds':>9}{'MiB/s':>8}{'RSS growth':>13}"
        f"{'growth/byte':>13}{'peak growth':>13}  answered",
    ]
    for run in x["runs"]:
        growth, peak = num(run["rss_growth_kb"] / 1024) + " MiB", num(run["peak_growth_kb"] / 1024) + " MiB"
        lines.append(
            f"  {run['label']:>10}{run['frames']:>11,}{run['wire_bytes'] / 2**20:>10.1f}{run['seconds']:>9.2f}"
            f"{num(run['mib_per_s']):>8}{growth:>13}{num(run['growth_per_byte'], 2):>13}{peak:>13}  "
            f"{'pong' if run['delivered'] else 'NO PONG'}"
        )
    lines.append(
        "  RSS growth: once the daemon had read every fragment (the message not finished yet), over the idle "
        "connection's; peak: the largest sample, finishing and parsing the message included"
    )
    d = x.get("default_cap")
    if d:
        lines.append(
            f"  at the default max_fragments_per_message ({d['max_fragments']:,}): {d['open_after_frames']:,} frames "
            f"of a message read (RSS {d['rss_growth_kb']:+,} kB), frame {d['frames_sent']:,} answered with a "
            f"{d['close_code']} close {d['close_reason']!r}"
        )
    return lines


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "relay": relay,
    "handshakes": handshakes,
    "memory": memory,
    "replay": replay,
    "delete-account": delete_account,
    "fragmented": fragmented,
}


def render(summary: dict[str, Any]) -> str:
    lines = header(summary)
    sc = summary["scenarios"]
    for name, section in SECTIONS.items():
        if name in sc:
            lines.append("")
            result = sc[name]
            lines += [f"{name}: FAILED: {result['error']}"] if "error" in result else section(result)
    noisy = [
        (name, x)
        for name, result in sc.items()
        for x in result.get("daemon_log") or []
        if (x.get("warning") or 0) + (x.get("error") or 0)
    ]
    if noisy:
        lines += ["", "daemon logs (warnings and errors while measuring):"]
        for name, x in noisy:
            lines.append(f"  {name}, instance {x['instance']}: {x['warning']} warnings, {x['error']} errors")
            lines += [f"    {entry}" for entry in x["first"][:3]]
    if summary.get("targets"):
        lines += ["", "targets:"]
        width = max(62, *(len(t["target"]) for t in summary["targets"]))
        for t in summary["targets"]:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            note = f" ({t['note']})" if t.get("note") else ""
            lines.append(f"  {t['target']:<{width}} {num(t['value']):>10}  (goal {t['goal']}): {verdict}{note}")
    return "\n".join(lines)
