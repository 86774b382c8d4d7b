"""``pocketbridge admin``: the admin API from the shell.

    export PB_ADMIN_API_KEY=...            # or --key-file FILE (mode 0600); never on the command line
    pocketbridge admin users
    pocketbridge admin devices [USER]
    pocketbridge admin revoke DEVICE [--reason TEXT]
    pocketbridge admin unrevoke DEVICE
    pocketbridge admin audit [--since 1h] [--action NAME]

The HTTP listener comes from ``--url``, else ``$PB_ADMIN_URL``, else the configured ``[listen] http``. Output
is a table for people, or the server's JSON with ``--json``. Standard library only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import stat
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from .config import load_config

DURATION = re.compile(r"([0-9]+)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AdminCliError(Exception):
    """One line for the person at the terminal; exit status 1."""


def _key(args: argparse.Namespace) -> str:
    if args.key_file:
        path = Path(args.key_file)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            key = path.read_text().strip()
        except OSError as exc:
            raise AdminCliError(f"cannot read the admin key file {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise AdminCliError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
        return key
    key = os.environ.get("PB_ADMIN_API_KEY", "")
    if not key:
        raise AdminCliError("no admin key: set PB_ADMIN_API_KEY or pass --key-file FILE (never the key itself)")
    return key


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    if os.environ.get("PB_ADMIN_URL"):
        return os.environ["PB_ADMIN_URL"]
    host, port = load_config(args.config or os.environ.get("PB_CONFIG") or None).http_address()
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://{host}:{port}"


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    base = urllib.parse.urlsplit(_base_url(args))
    if base.scheme not in ("http", "https") or not base.hostname:
        raise AdminCliError(f"--url must be an http:// or https:// URL (got {_base_url(args)})")
    conn_cls = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(base.hostname, base.port, timeout=args.timeout)
    headers = {"X-Admin-API-Key": _key(args), "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, base.path.rstrip("/") + path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except OSError as exc:
        raise AdminCliError(f"cannot reach {_base_url(args)}: {exc.strerror or exc} (is the daemon running?)") from None
    finally:
        conn.close()
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        raise AdminCliError(f"{method} {path}: HTTP {response.status}, not JSON") from None
    if response.status >= 400:
        code, error = payload.get("code", ""), payload.get("error", "")
        raise AdminCliError(f"{method} {path}: HTTP {response.status} {code}: {error}")
    return payload


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _out(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2) if args.json else text)


def cmd_users(args: argparse.Namespace) -> int:
    payload = _request(args, "GET", f"/admin/users?limit={args.limit}")
    rows = [[u["user_id"], str(u["devices"]), str(u["revoked_devices"]), str(u["stored_bytes"]),
             _when(u.get("last_activity"))] for u in payload["users"]]
    _out(args, payload, _table(rows, ["USER", "DEVICES", "REVOKED", "STORED BYTES", "LAST ACTIVITY"]))
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    path = f"/admin/users/{args.user}/devices" if args.user else f"/admin/devices?limit={args.limit}"
    payload = _request(args, "GET", path)
    rows = [[d["device_id"], d["user_id"][:16] + "…", d.get("device_name") or "-", d.get("device_type") or "-",
             "online" if d.get("is_online") else "", _when(d.get("last_seen")),
             f"revoked {_when(d['revoked_at'])}" if d.get("revoked_at") else ""] for d in payload["devices"]]
    _out(args, payload, _table(rows, ["DEVICE", "USER", "NAME", "TYPE", "", "LAST SEEN", "STATE"]))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"device_id": args.device}
    if args.reason:
        body["reason"] = args.reason
    payload = _request(args, "POST", "/admin/revoke-device", body)
    _out(args, payload, f"revoked {args.device}: its connections are closed on every instance")
    return 0


def cmd_unrevoke(args: argparse.Namespace) -> int:
    payload = _request(args, "POST", "/admin/unrevoke-device", {"device_id": args.device})
    _out(args, payload, f"unrevoked {args.device}: it may connect again")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)}
    if args.action:
        query["action"] = args.action
    if args.since:
        match = DURATION.fullmatch(args.since)
        if match is None:
            raise AdminCliError("--since takes a duration like 30m, 12h or 7d")
        query["since"] = str(int((time.time() - int(match[1]) * UNITS[match[2]]) * 1000))
    payload = _request(args, "GET", "/admin/audit?" + urllib.parse.urlencode(query))
    rows = [[_when(r["at"]), r["action"], r.get("actor") or "-", r.get("target") or "-", r.get("peer") or "-",
             r.get("detail") or ""] for r in payload["records"]]
    _out(args, payload, _table(rows, ["AT", "ACTION", "ACTOR", "TARGET", "PEER", "DETAIL"]))
    return 0


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except AdminCliError as exc:
            print(f"pocketbridge admin: {exc}", file=sys.stderr)
            return 1

    return run


def add_admin_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "admin", help="the admin API from the shell: users, devices, revoke, unrevoke, audit",
        description=(
            "Call the admin API of a running daemon. The key comes from $PB_ADMIN_API_KEY or --key-file (mode "
            "0600), never from the command line; the address from --url, $PB_ADMIN_URL or [listen] http."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", metavar="URL", help="HTTP listener, e.g. http://127.0.0.1:3002")
    common.add_argument("--key-file", metavar="FILE", help="file holding the admin key (mode 0600)")
    common.add_argument("--config", "-c", metavar="FILE", help="config file, for [listen] http")
    common.add_argument("--json", action="store_true", help="print the server's JSON")
    common.add_argument("--timeout", type=float, default=15.0, metavar="S", help="seconds (15)")
    asub = p.add_subparsers(dest="admin_command", required=True)

    q = asub.add_parser("users", parents=[common], help="list accounts",
                        description="List accounts: devices, revoked devices, stored bytes, last activity.")
    q.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    q.set_defaults(func=_guarded(cmd_users))
    q = asub.add_parser("devices", parents=[common], help="list devices (of one account)",
                        description="List the devices of USER (revoked ones included), or of every account.")
    q.add_argument("user", nargs="?", metavar="USER", help="a user id (64 hex digits)")
    q.add_argument("--limit", type=int, default=100, help="at most this many without USER (100)")
    q.set_defaults(func=_guarded(cmd_devices))
    q = asub.add_parser("revoke", parents=[common], help="revoke a device",
                        description="Revoke DEVICE: its connections close on every instance; it cannot connect.")
    q.add_argument("device", metavar="DEVICE", help="the full device id")
    q.add_argument("--reason", metavar="TEXT", help="recorded and sent to the device (200 characters at most)")
    q.set_defaults(func=_guarded(cmd_revoke))
    q = asub.add_parser("unrevoke", parents=[common], help="undo a revocation",
                        description="Let a revoked DEVICE connect again (refused if its account is full).")
    q.add_argument("device", metavar="DEVICE", help="the full device id")
    q.set_defaults(func=_guarded(cmd_unrevoke))
    q = asub.add_parser("audit", parents=[common], help="the audit trail, newest first",
                        description="Show the audit trail, newest first.")
    q.add_argument("--since", metavar="DURATION", help="only the last 30m, 12h, 7d …")
    q.add_argument("--action", metavar="NAME", help="only this action (e.g. device_revoked)")
    q.add_argument("--limit", type=int, default=100, help="at most this many (100, max 1000)")
    q.set_defaults(func=_guarded(cmd_audit))
