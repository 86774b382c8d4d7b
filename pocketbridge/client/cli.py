"""`pocketbridge client`: a device identity on disk, one-shot registration, and PB1-signed API requests.

    pocketbridge client init --name "Laptop"                  # creates ~/.config/pocketbridge/device.json
    pocketbridge client register --url ws://127.0.0.1:3001/ws # handshake once; pins the server key
    pocketbridge client api GET /api/devices                  # signed request, JSON on stdout
    pocketbridge client pair                                  # show a code for a new device (on a known one)
    pocketbridge client pair 123456 --file new.json           # join that account (on the new device)

The identity file is JSON, mode 0600: ``seed`` (the device's Ed25519 private seed, hex), ``device_id``, and
optionally ``device_name``, ``device_type``, ``server_key`` (the server identity key pinned at the first
successful ``register``) and ``ws_url`` / ``base_url`` (the server's addresses, remembered by ``register`` so
later commands need no URL). The seed is never printed. ``$PB_CLIENT_URL`` is the WebSocket URL when the
command line and the file give none. HTTP uses only the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import ssl
import stat
import sys
import tempfile
import time
import urllib.parse
from http import HTTPStatus
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionRejected, HandshakeError

from .. import __version__
from ..protocol.auth import sign_pb1
from . import ClientError, DeviceKey, HandshakeRefused, ServerKeyMismatch, connect, new_device_id

DEVICE_TYPES = ("mobile", "desktop", "web")
DEFAULT_WS_URL = "ws://127.0.0.1:3001/ws"
DEFAULT_BASE_URL = "http://127.0.0.1:3002"
FILE_VERSION = 1

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", re.IGNORECASE)
_TARGET = re.compile(r"/[\x21-\x7e]*")  # printable ASCII, no spaces: sent and signed byte for byte


class ClientCliError(Exception):
    """A failure explained in one line; printed as ``pocketbridge client: <text>``, exit status 1."""


# --- the identity file -------------------------------------------------------------------------------------
def default_identity_path(env: dict[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/pocketbridge/device.json``, else ``~/.config/pocketbridge/device.json``."""
    env = dict(os.environ) if env is None else env
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "pocketbridge" / "device.json"


def _path(args: argparse.Namespace) -> Path:
    return Path(args.file).expanduser() if args.file else default_identity_path()


def _write(path: Path, data: dict[str, Any], *, exclusive: bool) -> None:
    """Write ``data`` as JSON with mode 0600. ``exclusive``: fail if ``path`` exists; otherwise replace it
    atomically (a temporary file in the same directory, then rename), so a crash never leaves half a file."""
    text = json.dumps(data, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if exclusive:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            tmp = None
        else:
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            tmp = Path(tmp_name)
    except FileExistsError:
        raise ClientCliError(f"{path} already exists; use --force to replace it (the old identity is lost)") from None
    except OSError as exc:
        raise ClientCliError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if tmp is not None:
            os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise ClientCliError(f"cannot write {path}: {exc.strerror}") from None


def load_identity(path: Path) -> dict[str, Any]:
    """The identity file's contents, checked; a one-line ClientCliError if it is missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ClientCliError(
            f"no device identity at {path}; create one with `pocketbridge client init` (or pass --file)"
        ) from None
    except OSError as exc:
        raise ClientCliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError:
        raise ClientCliError(f"{path} is not a device identity file (not JSON)") from None
    if not isinstance(data, dict):
        raise ClientCliError(f"{path} is not a device identity file (not a JSON object)")
    if not (isinstance(data.get("seed"), str) and _HEX64.fullmatch(data["seed"])):
        raise ClientCliError(f"{path}: 'seed' must be 64 hex characters")
    if not (isinstance(data.get("device_id"), str) and _UUID4.fullmatch(data["device_id"])):
        raise ClientCliError(f"{path}: 'device_id' must be a UUID v4")
    pinned = data.get("server_key")
    if pinned is not None and not (isinstance(pinned, str) and _HEX64.fullmatch(pinned)):
        raise ClientCliError(f"{path}: 'server_key' must be 64 hex characters (or absent)")
    if stat.S_IMODE(mode) & 0o077:
        print(
            f"pocketbridge client: warning: {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}",
            file=sys.stderr,
        )
    return data


def _key(data: dict[str, Any]) -> Any:

    return DeviceKey.from_seed(bytes.fromhex(data["seed"]))


def fingerprint(public_hex: str) -> str:
    """The server key fingerprint as ``pocketbridge serve`` prints it (first 16 bytes of SHA-256, grouped)."""
    digest = hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))


# --- init --------------------------------------------------------------------------------------------------
def ws_url_for(args: argparse.Namespace, data: dict[str, Any] | None = None) -> str:
    """--url, else the file's remembered URL, else $PB_CLIENT_URL, else the default."""
    url = getattr(args, "url", None) or (data or {}).get("ws_url") or os.environ.get("PB_CLIENT_URL") or DEFAULT_WS_URL
    if not url.startswith(("ws://", "wss://")):
        raise ClientCliError(f"the WebSocket URL must be ws:// or wss://, e.g. {DEFAULT_WS_URL} (got {url})")
    return str(url)


def base_url_from_ws(ws_url: str) -> str:
    """The HTTP API origin that goes with a WebSocket URL: the same origin (one origin behind a reverse
    proxy), except the default two-listener layout, where the API is on port 3002 beside 3001."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    netloc = parts.netloc
    if parts.port == 3001:
        netloc = netloc[: netloc.rfind(":")] + ":3002"
    return f"{scheme}://{netloc}"


def cmd_init(args: argparse.Namespace) -> int:

    path = _path(args)
    key = DeviceKey.generate()
    data: dict[str, Any] = {"version": FILE_VERSION, "seed": key.seed.hex(), "device_id": new_device_id()}
    name = (args.name or "").strip()
    if name:
        data["device_name"] = name
    if args.type:
        data["device_type"] = args.type
    _write(path, data, exclusive=not args.force)
    print(
        f"created {path} (mode 0600; keep it private, it holds this device's private key)\n"
        f"  device id:  {data['device_id']}\n"
        f"  user id:    {key.public_hex}\n"
        f"next: pocketbridge client register --url {ws_url_for(args)}"
        + ("" if not args.file else f" --file {args.file}")
    )
    return 0


# --- register ----------------------------------------------------------------------------------------------
def _leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _describe_ws_failure(url: str, exc: BaseException) -> str:


    if isinstance(exc, HandshakeRefused):
        reason = f"{exc.code} {exc.reason}" if exc.reason else str(exc.code)
        return f"the server at {url} refused this device: {reason}"
    if isinstance(exc, ServerKeyMismatch):
        return f"{url}: {exc}"
    if isinstance(exc, trio.TooSlowError):
        return f"{url} did not complete the handshake in time"
    if isinstance(exc, ConnectionRejected):
        return f"{url} rejected the WebSocket upgrade with HTTP {exc.status_code} (is the path /ws?)"
    if isinstance(exc, HandshakeError):
        if isinstance(exc.__cause__, OSError):  # trio-websocket wraps a failed TCP connect
            exc = exc.__cause__
            if isinstance(exc.__cause__, BaseExceptionGroup):  # trio: one error per address tried
                inner = _leaf(exc.__cause__)
                exc = inner if isinstance(inner, OSError) and inner.strerror else exc
        else:
            return f"WebSocket handshake with {url} failed"
    if isinstance(exc, OSError):
        why = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else exc.strerror
        why = why or str(exc) or type(exc).__name__
        return f"cannot reach {url}: {why} (is `pocketbridge serve` running, and is --url right?)"
    if isinstance(exc, (ValueError, KeyError, TypeError)):
        return f"{url} does not speak the PocketBridge protocol"
    return f"connection to {url} failed: {type(exc).__name__}"


def cmd_register(args: argparse.Namespace) -> int:


    path = _path(args)
    data = load_identity(path)
    url = ws_url_for(args, data)
    key = _key(data)
    device_id = data["device_id"]
    pinned = data.get("server_key")

    async def handshake() -> tuple[str, str]:
        async with connect(
            url,
            key,
            device_id,
            pin=pinned,
            device_name=data.get("device_name") or None,
            device_type=data.get("device_type") or None,
            handshake_timeout=args.timeout,
        ) as client:
            return client.server_key.lower(), client.user_id

    async def bounded() -> tuple[str, str]:
        with trio.fail_after(args.timeout):  # also bounds the TCP/TLS connect and the upgrade
            return await handshake()

    try:
        server_key, user_id = trio.run(bounded)
    except (ClientError, HandshakeError, OSError, trio.TooSlowError, ValueError, KeyError, TypeError,
            BaseExceptionGroup) as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            raise leaf from None
        if isinstance(leaf, ServerKeyMismatch) and pinned is not None and "pinned" in str(leaf):
            raise ClientCliError(
                f"refusing {url}: its identity key is not the one pinned in {path} "
                f"({pinned[:16]}…). This may be a different server or an impostor. If its operator really "
                f"replaced the key, delete the \"server_key\" line from {path} and run register again"
            ) from None
        raise ClientCliError(_describe_ws_failure(url, leaf)) from None

    note = "pinned now" if pinned is None else "matches the pinned key"
    base_url = args.base_url or data.get("base_url") or base_url_from_ws(url)
    remembered = {**data, "server_key": server_key, "ws_url": url, "base_url": base_url}
    if remembered != data:
        _write(path, remembered, exclusive=False)
    lines = [f"registered with {url}", f"  user id:          {user_id}", f"  device id:        {device_id}"]
    if user_id != key.public_hex:
        lines.append(f"  device key:       {key.public_hex}  (paired into the account above)")
    lines += [
        f"  server key:       {server_key[:16]}…  ({note})",
        f"  key fingerprint:  {fingerprint(server_key)}",
        f"  remembered:       {url} and {base_url} (for later commands)",
    ]
    print("\n".join(lines))
    return 0


# --- pair --------------------------------------------------------------------------------------------------
def cmd_pair(args: argparse.Namespace) -> int:


    path = _path(args)
    data = load_identity(path)
    url = ws_url_for(args, data)
    key = _key(data)
    code = args.code
    if code is not None and not re.fullmatch(r"[0-9]{6}", code):
        raise ClientCliError("a pairing code is 6 digits")
    lines: list[str] = []

    async def pair() -> int:
        async with connect(url, key, data["device_id"], pin=data.get("server_key"),
                           device_name=data.get("device_name") or None, device_type=data.get("device_type") or None,
                           handshake_timeout=args.timeout, reply_timeout=args.timeout) as client:
            if code is not None:
                with trio.fail_after(args.timeout):
                    reply = await client.complete_pairing(code)
                if reply["type"] != "pairing_completed":
                    raise ClientCliError(f"pairing failed: {reply['payload'].get('error', 'refused')}")
                lines.append(f"paired: this device now belongs to user {client.user_id}")
                return 0
            with trio.fail_after(args.timeout):
                reply = await client.initiate_pairing()
            if reply["type"] != "pairing_initiated":
                raise ClientCliError(f"no pairing code: {reply['payload'].get('error', 'refused')}")
            payload = reply["payload"]
            seconds = max(1, int(payload["expiresIn"]) // 1000)
            print(f"pairing code: {payload['code']}  (valid for {seconds} s)\n"
                  f"on the new device: pocketbridge client pair {payload['code']}", flush=True)
            with trio.move_on_after(seconds):
                paired = await client.next_notice("device_paired")
                name = paired["payload"].get("device_name") or "a device"
                lines.append(f"{name} ({paired['payload'].get('device_id', '?')}) joined this account")
                return 0
            raise ClientCliError("the code expired unused")

    try:
        status = trio.run(pair)
    except ClientCliError:
        raise
    except (ClientError, OSError, trio.TooSlowError, BaseExceptionGroup) as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, KeyboardInterrupt):
            raise leaf from None
        if isinstance(leaf, ClientCliError):
            raise leaf from None
        raise ClientCliError(_describe_ws_failure(url, leaf)) from None
    print("\n".join(lines))
    return status


# --- api ---------------------------------------------------------------------------------------------------
def _body(data_arg: str | None) -> bytes:
    """The request body: compact UTF-8 JSON of ``--data`` (text, ``@file`` or ``@-`` for stdin)."""
    if data_arg is None:
        return b""
    text = data_arg
    if data_arg.startswith("@"):
        name = data_arg[1:]
        try:
            text = sys.stdin.read() if name == "-" else Path(name).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ClientCliError(f"cannot read --data file {name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ClientCliError(f"--data file {name} is not UTF-8") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ClientCliError(f"--data is not valid JSON: {exc}") from None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


class _Http:
    """One keep-alive connection to ``base_url``; requests are PB1-signed over exactly what is sent."""

    def __init__(self, base_url: str, data: dict[str, Any], timeout: float) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ClientCliError(f"--base-url must be an http:// or https:// URL, e.g. {DEFAULT_BASE_URL}")
        if parts.query or parts.fragment:
            raise ClientCliError("--base-url must not have a query or fragment")
        self.base_url = base_url
        self.prefix = parts.path.rstrip("/")
        self.device_id: str = data["device_id"]
        self.seed = bytes.fromhex(data["seed"])
        try:
            port = parts.port
        except ValueError:
            raise ClientCliError(f"--base-url has a bad port: {base_url}") from None
        if parts.scheme == "https":
            self.conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, port, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            self.conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)

    def request(self, method: str, target: str, body: bytes, *, bearer: str | None = None) -> tuple[Any, bytes]:
        target = self.prefix + target
        headers = {"Accept": "application/json", "User-Agent": f"pocketbridge-client/{__version__}"}
        if body:
            headers["Content-Type"] = "application/json"
        if bearer is not None:
            headers["Authorization"] = f"Bearer {bearer}"
        else:
            timestamp = str(int(time.time() * 1000))
            headers["X-PB-Device-ID"] = self.device_id
            headers["X-PB-Timestamp"] = timestamp
            headers["X-PB-Signature"] = sign_pb1(self.seed, method, target, timestamp, self.device_id, body)
        try:
            self.conn.request(method, target, body=body if body or method not in ("GET", "HEAD") else None,
                              headers=headers)
            response = self.conn.getresponse()
            return response, response.read()
        except ssl.SSLError as exc:
            raise ClientCliError(f"TLS failure talking to {self.base_url}: {exc.reason or exc}") from None
        except TimeoutError:
            raise ClientCliError(f"{self.base_url} did not answer in time") from None
        except (http.client.HTTPException, ConnectionError) as exc:
            if isinstance(exc, ConnectionRefusedError):
                raise ClientCliError(
                    f"cannot reach {self.base_url}: connection refused "
                    "(is `pocketbridge serve` running, and is --base-url right?)"
                ) from None
            raise ClientCliError(f"{self.base_url} closed the connection ({type(exc).__name__})") from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise ClientCliError(f"cannot reach {self.base_url}: {why} (is --base-url right?)") from None

    def close(self) -> None:
        self.conn.close()


def _print_response(response: Any, raw: bytes) -> None:
    version = {10: "HTTP/1.0", 11: "HTTP/1.1"}.get(response.version, "HTTP")
    reason = response.reason
    if not reason:
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
    status = f"{version} {response.status} {reason}".rstrip()
    retry_after = response.getheader("Retry-After")
    if retry_after:
        status += f" (Retry-After: {retry_after})"
    print(status, file=sys.stderr, flush=True)
    if not raw:
        return
    try:
        text = json.dumps(json.loads(raw), indent=2, ensure_ascii=False)
    except ValueError:
        text = raw.decode("utf-8", "replace").rstrip("\n")
    print(text, flush=True)


def _hint(status: int, raw: bytes, data: dict[str, Any]) -> None:
    """One line on stderr for the 401s a human can fix on this side."""
    if status != 401:
        return
    try:
        code = json.loads(raw).get("code")
    except (ValueError, AttributeError):
        code = None
    if code == "TIMESTAMP_OUT_OF_RANGE":
        print("hint: this machine's clock is off by more than the server allows; sync it (NTP)", file=sys.stderr)
    elif code == "INVALID_SIGNATURE" and not data.get("server_key"):
        print("hint: this device may not be registered yet; run `pocketbridge client register` first", file=sys.stderr)
    elif code == "INVALID_SIGNATURE":
        print(
            "hint: the device is unknown to this server, or a proxy changed the request path (see "
            "docs/reverse-proxy.md)",
            file=sys.stderr,
        )


def cmd_api(args: argparse.Namespace) -> int:
    method = args.method.upper()
    if not re.fullmatch(r"[A-Z]+", method):
        raise ClientCliError(f"{args.method!r} is not an HTTP method")
    target = args.path
    if target.startswith(("http://", "https://")):
        raise ClientCliError("give the path only (e.g. /api/devices); the server goes in --base-url")
    target = target.removesuffix("?")  # a bare '?' is never sent (§10.2): the server would not see it either
    if not _TARGET.fullmatch(target):
        raise ClientCliError(
            "the path must start with '/' and contain only printable ASCII without spaces (percent-encode the rest)"
        )
    body = _body(args.data)
    data = load_identity(_path(args))
    client = _Http(args.base_url or data.get("base_url") or DEFAULT_BASE_URL, data, args.timeout)
    try:
        token = None
        if args.bearer:
            response, raw = client.request("POST", "/api/auth/token", b"")
            if response.status != 200:
                print("getting a bearer token failed:", file=sys.stderr)
                _print_response(response, raw)
                _hint(response.status, raw, data)
                return 1
            try:
                token = json.loads(raw)["token"]
            except (ValueError, KeyError, TypeError):
                raise ClientCliError("POST /api/auth/token did not return a token") from None
        response, raw = client.request(method, target, body, bearer=token)
    finally:
        client.close()
    _print_response(response, raw)
    _hint(response.status, raw, data)
    return 0 if 200 <= response.status < 300 else 1


# --- argparse ----------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _guarded(func: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except ClientCliError as exc:
            print(f"pocketbridge client: {exc}", file=sys.stderr)
            return 1

    return run


def add_client_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "client",
        help="a device identity for humans: init, register, signed API requests",
        description=(
            "Act as a device from the command line: create an identity file, register it with a server over "
            "WebSocket (pinning the server key), and make PB1-signed requests to the HTTP API."
        ),
    )
    csub = p.add_subparsers(dest="client_command", required=True, metavar="{init,register,api,pair}")
    file_help = "device identity file (default: $XDG_CONFIG_HOME/pocketbridge/device.json or ~/.config/…)"
    url_help = f"WebSocket URL (default: the remembered one, else $PB_CLIENT_URL, else {DEFAULT_WS_URL})"

    q = csub.add_parser("init", help="create a device identity file (mode 0600)",
                        description="Create a new device key and id. Prints the device id and user id, never the key.")
    q.add_argument("--file", metavar="PATH", help=file_help)
    q.add_argument("--name", metavar="NAME", help="device name sent at registration")
    q.add_argument("--type", choices=DEVICE_TYPES, help="device type sent at registration")
    q.add_argument("--force", action="store_true", help="replace an existing file (its identity is lost)")
    q.set_defaults(func=_guarded(cmd_init))

    q = csub.add_parser("register", help="handshake once so the device exists on the server; pins the server key",
                        description=(
                            "Connect over WebSocket and complete the handshake once. The server identity key is "
                            "pinned into the identity file on first use; a changed key is refused afterwards."
                        ))
    q.add_argument("--url", metavar="WS_URL", help=url_help)
    q.add_argument("--base-url", metavar="URL",
                   help="HTTP API origin to remember (default: derived from the WebSocket URL)")
    q.add_argument("--file", metavar="PATH", help=file_help)
    q.add_argument("--timeout", type=_positive_float, default=15.0, metavar="S", help="give up after S seconds (15)")
    q.set_defaults(func=_guarded(cmd_register))

    q = csub.add_parser(
        "pair", help="pair devices: show a code (known device), or join with one (new device)",
        description=(
            "Without CODE, on a device of the account: ask for a 6-digit pairing code, print it, and wait until "
            "a new device has used it (or it expires). With CODE, on the new device: join the account that "
            "issued it; the new device keeps its own key and gets the account's events."
        ),
    )
    q.add_argument("code", nargs="?", metavar="CODE", help="the 6-digit code shown on the other device")
    q.add_argument("--url", metavar="WS_URL", help=url_help)
    q.add_argument("--file", metavar="PATH", help=file_help)
    q.add_argument("--timeout", type=_positive_float, default=15.0, metavar="S",
                   help="bound on each server reply in seconds (15)")
    q.set_defaults(func=_guarded(cmd_pair))

    q = csub.add_parser(
        "api",
        help="make a PB1-signed HTTP API request",
        description=(
            "Send METHOD PATH to the HTTP API, signed by this device (PB1), or with --bearer using a fresh "
            "token. The status line goes to stderr, the (pretty-printed) body to stdout. Exit status 0 for "
            "2xx, else 1. Example: api POST /api/devices/<id>/rename --data '{\"device_name\":\"Work laptop\"}'"
        ),
    )
    q.add_argument("method", metavar="METHOD", help="GET, POST, DELETE …")
    q.add_argument("path", metavar="PATH", help="path and query, sent and signed exactly as given, e.g. /api/devices")
    q.add_argument("--data", metavar="JSON", help="JSON body, or @FILE, or @- for stdin; sent compact")
    q.add_argument(
        "--base-url", metavar="URL",
        help=f"HTTP API origin (default: the one `register` remembered, else {DEFAULT_BASE_URL})",
    )
    q.add_argument("--file", metavar="PATH", help=file_help)
    q.add_argument("--bearer", action="store_true", help="get a token (POST /api/auth/token) and use it instead of PB1")
    q.add_argument("--timeout", type=_positive_float, default=15.0, metavar="S", help="socket timeout in seconds (15)")
    q.set_defaults(func=_guarded(cmd_api))
