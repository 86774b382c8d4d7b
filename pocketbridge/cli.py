"""The ``pocketbridge`` command: serve, keygen, check-config, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .admin_cli import add_admin_parser
from .app import Daemon, freeze_startup_heap
from .backup import backup_sqlite, pg_dump_hint
from .bench.cli import add_bench_parser
from .client.cli import add_client_parser
from .config import Config, describe_problems, load_config, render_config
from .errors import ConfigError, IdentityError, PocketBridgeError, StartupError, find_error
from .identity import load_identity, write_new_identity
from .logs import setup_logging
from .protocol.handshake import ServerIdentity

log = logging.getLogger("pocketbridge")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("PB_CONFIG") or None)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    config_path = args.config or os.environ.get("PB_CONFIG") or None
    setup_logging(config.log.level, config.log.format)
    root = logging.getLogger()
    level = root.level
    if sys.stderr.isatty():  # on a terminal the banner comes first: start-up chatter is not shown before it
        root.setLevel(max(level, logging.WARNING))
    daemon = Daemon(config, config_path=config_path)

    started = False

    async def main() -> None:
        nonlocal started
        async with trio.open_nursery() as nursery:
            running = await nursery.start(lambda task_status: daemon.run(handle_signals=True, task_status=task_status))
            started = True
            freeze_startup_heap()
            key_note = "created" if running.identity_created else "loaded"
            print(
                f"PocketBridge {__version__}\n"
                f"  WebSocket URL:      {running.ws_url}\n"
                f"  HTTP API:           {running.http_url}  (health: {running.http_url}/health)\n"
                f"  configuration:      {config_path or 'built-in defaults and PB_* variables'}\n"
                f"  storage:            {_describe_storage(config)}\n"
                f"  bus:                {_describe_bus(config)}\n"
                f"  admin API:          {'on (/admin)' if config.admin.api_key else 'off (set [admin] api_key)'}\n"
                f"  data directory:     {config.data_dir()}\n"
                f"  server key ({key_note}): {config.identity_key_path()}\n"
                f"  server public key:  {running.identity.public_hex}\n"
                f"  key fingerprint:    {running.identity.fingerprint()}\n"
                "Press Ctrl+C to stop (twice to stop at once).",
                flush=True,
            )
            root.setLevel(level)

    try:
        trio.run(main)
    except (Exception, BaseExceptionGroup) as exc:
        if find_error(exc, KeyboardInterrupt) is not None:
            raise KeyboardInterrupt from None
        own = find_error(exc, PocketBridgeError)
        if own is not None:
            log.debug("start failure", exc_info=exc)
            raise own from None
        if started:
            raise  # a bug while serving: the traceback is what an engineer needs
        log.debug("start failure", exc_info=exc)  # the traceback at debug level only
        inner: BaseException = exc
        while isinstance(inner, BaseExceptionGroup):  # the first error itself, not trio's wrapping
            inner = inner.exceptions[0]
        raise StartupError(
            f"cannot start: {type(inner).__name__}: {inner} (run with PB_LOG_LEVEL=debug for details)"
        ) from None
    print("PocketBridge stopped", flush=True)
    return 0


def _describe_storage(config: Config) -> str:
    if config.storage.backend == "sqlite":
        return f"SQLite {config.sqlite_path()}"
    from psycopg.conninfo import conninfo_to_dict  # only where used: the embedded daemon never loads psycopg

    info = conninfo_to_dict(config.storage.dsn)  # never the password
    return f"PostgreSQL {info.get('host', 'local socket')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


def _describe_bus(config: Config) -> str:
    if config.bus.backend == "memory":
        return "in-process (one instance)"
    parts = urllib.parse.urlsplit(config.bus.url)
    return f"Redis {parts.hostname or parts.path}:{parts.port or 6379}"


def cmd_key_show(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else _load(args).identity_key_path()
    print(_describe_key(str(path), load_identity(path)))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.storage.backend != "sqlite":
        print(pg_dump_hint(config))
        return 0
    result = backup_sqlite(config.sqlite_path(), Path(args.out), force=args.force)
    print(
        f"wrote {result.path} (mode 0600, {result.bytes} bytes, integrity ok) in {result.seconds:.1f} s:"
        f" {result.users} users, {result.devices} devices, {result.events} events\n"
        f"the server identity key is not in it: keep a copy of {config.identity_key_path()} too"
    )
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    config = _load(args)
    if not config.storage.dsn:
        raise PocketBridgeError("set the target: [storage] dsn (PB_STORAGE_DSN), then run `pocketbridge migrate` first")
    from .transfer import transfer  # imports psycopg: only where used

    report = transfer(Path(args.from_sqlite), config.storage.dsn, force=args.force,
                      progress=lambda text: print(text, flush=True))
    total = ", ".join(f"{table} {count}" for table, count in report.counts.items())
    print(f"transfer {'resumed and ' if report.resumed else ''}finished and verified: {total}\n"
          f"  events checksum {report.events_checksum[:16]}…, devices checksum {report.devices_checksum[:16]}…\n"
          "next: give every instance the same server identity key ([server] identity_key_file) and start them"
          " with [storage] backend = \"postgres\"")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"pocketbridge {__version__}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.out) if args.out else _load(args).identity_key_path()
    print(_describe_key(f"wrote {path} (mode 0600)", write_new_identity(path)))
    return 0


def _describe_key(heading: str, identity: ServerIdentity) -> str:
    """What clients pin: never the private key."""
    return f"{heading}\n  public key:  {identity.public_hex}\n  fingerprint: {identity.fingerprint()}"


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"configuration OK (storage: {config.storage.backend}, bus: {config.bus.backend}, ws: {config.listen.ws})")
    return 0


def cmd_config_init(args: argparse.Namespace) -> int:
    text = render_config()
    if not args.out or args.out == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    if path.exists() and not args.force:
        raise PocketBridgeError(f"{path} exists; use --force to replace it")
    path.write_text(text)
    print(f"wrote {path}: every key with its default and what it does; edit it, then `pocketbridge check-config"
          f" --config {path}`")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.storage.backend != "postgres":
        print("nothing to migrate: [storage] backend is sqlite (the embedded store migrates itself at start)")
        return 0
    from .store.postgres import migrate  # PostgreSQL's driver loads only where it is used (an embedded daemon's memory)

    try:
        before, after = migrate(config.storage.dsn)
    except Exception as exc:  # psycopg errors: a clear line, never a traceback
        print(f"pocketbridge: migration failed: {type(exc).__name__}: {exc}".strip(), file=sys.stderr)
        return 1
    print(f"schema version {before} -> {after}" if before != after else f"schema is up to date (version {after})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pocketbridge",
        description="PocketBridge: a self-hosted relay for end-to-end-encrypted multi-device sync.",
        epilog=(
            "Configuration: a TOML file (--config FILE or $PB_CONFIG; `pocketbridge config init` writes one with every"
            " key), and any key as an environment variable PB_<SECTION>_<KEY>, e.g. PB_LISTEN_WS=0.0.0.0:3001."
            " Documentation: README.md, docs/operations.md (running it), docs/protocol.md (clients), docs/sdk.md."
        ),
    )
    parser.add_argument("--version", action="version", version=f"pocketbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--config", "-c", metavar="FILE",
                       help="TOML config file (default: $PB_CONFIG, else built-in defaults)")
        return p

    add("serve", "run the daemon (WebSocket and HTTP listeners) until SIGTERM or Ctrl+C").set_defaults(func=cmd_serve)
    sub.add_parser("version", help="print the version", description="Print the version.").set_defaults(
        func=cmd_version
    )
    key_cmd = sub.add_parser("key", help="the server identity key", description="The server identity key.")
    key_sub = key_cmd.add_subparsers(dest="key_command", required=True)
    p = key_sub.add_parser(
        "show", help="print an existing key's public key and fingerprint (never the private key)",
        description="Print the public key and fingerprint of a server identity key file, for clients to pin.",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="key file (default: [server] identity_key_file)")
    p.add_argument("--config", "-c", metavar="FILE", help="TOML config file (default: $PB_CONFIG)")
    p.set_defaults(func=cmd_key_show)
    p = add("keygen", "create the server identity key file (refuses to overwrite)")
    p.add_argument("--out", metavar="FILE", help="write here instead of [server] identity_key_file")
    p.set_defaults(func=cmd_keygen)
    p = add("backup", "copy the SQLite store consistently while the daemon runs (PostgreSQL: explains pg_dump)")
    p.add_argument("--out", metavar="FILE", required=True, help="where to write the copy (mode 0600)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=cmd_backup)
    p = add("transfer", "copy a stopped SQLite store into the PostgreSQL database of [storage] dsn (after migrate)")
    p.add_argument("--from-sqlite", metavar="PATH", required=True, help="the SQLite database file (pocketbridge.db)")
    p.add_argument("--force", action="store_true", help="merge into a database that already holds other data")
    p.set_defaults(func=cmd_transfer)
    add("migrate", "create or upgrade the PostgreSQL schema (safe to run on every start)").set_defaults(
        func=cmd_migrate
    )
    add("check-config", "validate the configuration and exit non-zero if it is invalid").set_defaults(
        func=cmd_check_config
    )
    config_cmd = sub.add_parser(
        "config", help="write a configuration file", description="Write a fully commented configuration file."
    )
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser(
        "init", help="write every key with its default and a comment (to stdout, or --out FILE)",
        description="Write a configuration file holding every key with its default value and a comment saying"
        " what it does. The file changes nothing as it is; edit what you need.",
    )
    p.add_argument("--out", metavar="FILE", help="write here (refuses to replace an existing file)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=cmd_config_init)

    add_bench_parser(sub)

    add_client_parser(sub)
    add_admin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            return int(args.func(args))
        except BaseExceptionGroup as group:
            own = find_error(group, PocketBridgeError)
            if own is None:
                raise
            raise own from None
    except ConfigError as exc:
        print(f"pocketbridge: {describe_problems(exc)}", file=sys.stderr)
        return 2
    except IdentityError as exc:
        print(f"pocketbridge: {exc}", file=sys.stderr)
        return 2
    except PocketBridgeError as exc:
        print(f"pocketbridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
