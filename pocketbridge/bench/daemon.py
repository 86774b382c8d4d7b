"""The benchmark's daemons: ``pocketbridge serve`` subprocesses (started with :mod:`.launcher`, loopback only) with
the benchmark's settings, and what the daemons of a scenario share.

With ``--backend postgres`` / ``--bus redis`` the daemons of a scenario share a :class:`SharedBackend`: a fresh
PostgreSQL database of the benchmark's own (created, migrated with ``pocketbridge migrate``, dropped WITH (FORCE)
afterwards), the Redis URL and one identity key file (``pocketbridge keygen``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg
import psycopg.conninfo
import redis

from ..config import SECTIONS, Config, load_config
from .launcher import ProcessError, ServerProcess, clean_env, run_cli, spawn, wait_started

HOST = "127.0.0.1"
BIG = 1_000_000_000


def _known(section: str, key: str) -> bool:
    cls = SECTIONS.get(section)
    return cls is not None and any(a.name == key for a in attrs.fields(cls))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@attrs.frozen
class BackendChoice:
    """What the benchmark's daemons store in and talk over (from --backend, --bus, --dsn, --redis-url, --instances)."""

    storage: str = "sqlite"
    bus: str = "memory"
    admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    redis_url: str = "redis://127.0.0.1:6379/0"
    instances: int = 1

    def problems(self) -> list[str]:
        out = []
        if self.instances > 1 and (self.storage, self.bus) != ("postgres", "redis"):
            out.append(
                f"--instances {self.instances} needs --backend postgres --bus redis (instances share the database "
                f"and the bus; got --backend {self.storage} --bus {self.bus})"
            )
        if self.storage == "postgres":
            host = _dsn_host(self.admin_dsn)
            if host is not None and host not in LOOPBACK and not host.startswith("/"):
                out.append(
                    f"--dsn must point at a loopback PostgreSQL (127.0.0.1 or a local socket), got host {host!r}"
                )
        if self.bus == "redis":
            parts = urlsplit(self.redis_url)
            if parts.scheme not in ("redis", "unix") or (parts.scheme == "redis" and parts.hostname not in LOOPBACK):
                out.append(f"--redis-url must be a redis:// URL on a loopback address, got {self.redis_url!r}")
        return out


def _dsn_host(dsn: str) -> str | None:
    """The host (or hostaddr) of a libpq DSN or URL; None for the default (a local socket); '?' if unparsable."""
    try:

        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001  (any parse error: refuse the DSN)
        return "?"
    host = info.get("hostaddr") or info.get("host")
    return str(host) if host else None


def bench_overrides(
    data_dir: Path,
    *,
    devices: int,
    log_level: str,
    shared: dict[tuple[str, str], Any] | None = None,
) -> dict[str, str]:
    """The ``PB_<SECTION>_<KEY>`` variables of the benchmark daemon (keys the config doesn't know are left out)."""
    wanted: dict[tuple[str, str], Any] = {
        ("server", "data_dir"): data_dir,
        ("server", "identity_key_file"): data_dir / "identity.key",
        ("storage", "backend"): "sqlite",
        ("storage", "path"): data_dir / "pocketbridge.db",
        ("bus", "backend"): "memory",
        ("listen", "ws"): f"{HOST}:0",  # ephemeral ports, read from the banner
        ("listen", "http"): f"{HOST}:0",
        # the load generator is one user-agent on one address: lift the per-user and per-address limits
        ("limits", "events_per_user_per_minute"): BIG,
        ("limits", "event_burst_per_user"): BIG,
        ("limits", "ws_connections_per_ip"): BIG,
        ("limits", "ws_connects_per_ip_per_minute"): BIG,
        ("limits", "handshakes_per_ip_per_minute"): BIG,
        ("limits", "max_devices_per_user"): max(5, devices + 2),
        # the replay scenario measures replays of any --replay-events, not the full-resync answer (§6.5)
        ("replay", "full_resync_threshold"): BIG,
        ("drain", "window"): 0.5,
        ("drain", "deadline"): 3,
        ("log", "level"): log_level,
        **(shared or {}),
    }
    return {f"PB_{sec.upper()}_{key.upper()}": str(value) for (sec, key), value in wanted.items() if _known(sec, key)}


class SharedBackend:
    """What a scenario's daemons share: its own PostgreSQL database, the Redis URL, one identity key file.

    setup() creates (and migrates) the database, checks Redis and writes the key; teardown() drops the database
    WITH (FORCE) and removes the key. Both block (run them in a thread); teardown is safe to call twice.
    """

    def __init__(self, choice: BackendChoice, *, config_file: str | None, tag: str) -> None:
        self.choice = choice
        self.config_file = config_file
        self.dir = Path(tempfile.mkdtemp(prefix="pb-bench-shared-"))
        self.key_file = self.dir / "identity.key"
        self.dbname = f"pocketbridge_bench_{os.getpid()}_{tag}" if choice.storage == "postgres" else None
        self.dsn: str | None = None
        self._created = False
        self.env = {k: v for k, v in os.environ.items() if k != "PB_CONFIG"}
        self.migrate_output = ""

    def overrides(self) -> dict[tuple[str, str], Any]:
        out: dict[tuple[str, str], Any] = {("storage", "backend"): self.choice.storage}
        if self.choice.storage == "postgres":
            assert self.dsn is not None, "setup() first"
            out[("storage", "dsn")] = self.dsn
            out[("server", "identity_key_file")] = self.key_file
        out[("bus", "backend")] = self.choice.bus
        if self.choice.bus == "redis":
            out[("bus", "url")] = self.choice.redis_url
        if self.choice.instances > 1:
            out[("server", "identity_key_file")] = self.key_file
        return out

    def setup(self) -> None:
        if self.choice.bus == "redis":
            self._check_redis()
        if self.dbname is not None:

            try:
                with psycopg.connect(self.choice.admin_dsn, autocommit=True, connect_timeout=5) as admin:
                    admin.execute(f'CREATE DATABASE "{self.dbname}"')
                    self._created = True
            except psycopg.Error as exc:
                raise RuntimeError(
                    f"cannot create the benchmark database {self.dbname} on the --dsn server: "
                    f"{type(exc).__name__}: {str(exc).strip()}"
                ) from None
            self.dsn = psycopg.conninfo.make_conninfo(self.choice.admin_dsn, dbname=self.dbname)
            cmd = ["migrate"] + (["--config", self.config_file] if self.config_file else [])
            env = {**self.env, "PB_STORAGE_BACKEND": "postgres", "PB_STORAGE_DSN": self.dsn}
            self.migrate_output = run_cli(cmd, env, 120, "pocketbridge migrate")
        if self.dbname is not None or self.choice.instances > 1:
            run_cli(["keygen", "--out", str(self.key_file)], self.env, 60, "pocketbridge keygen")

    def _check_redis(self) -> None:
        try:
            client = redis.Redis.from_url(self.choice.redis_url, socket_timeout=3, socket_connect_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            raise RuntimeError(f"Redis is not reachable at --redis-url: {type(exc).__name__}: {exc}") from None

    def pg_stats(self) -> dict[str, float] | None:
        """This database's counters from pg_stat_database (commits, rollbacks, deadlocks, rows), or None."""
        if not self._created:
            return None

        try:
            with psycopg.connect(self.choice.admin_dsn, autocommit=True, connect_timeout=3) as admin:
                row = admin.execute(
                    "SELECT xact_commit, xact_rollback, deadlocks, tup_inserted, tup_updated"
                    " FROM pg_stat_database WHERE datname = %s",
                    (self.dbname,),
                ).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        keys = ("commits", "rollbacks", "deadlocks", "rows_inserted", "rows_updated")
        return {k: float(v or 0) for k, v in zip(keys, row, strict=True)}

    def database_bytes(self) -> int | None:
        """pg_database_size of this database, or None."""
        if not self._created:
            return None

        try:
            with psycopg.connect(self.choice.admin_dsn, autocommit=True, connect_timeout=5) as admin:
                row = admin.execute("SELECT pg_database_size(%s)", (self.dbname,)).fetchone()
        except psycopg.Error:
            return None
        return int(row[0]) if row else None

    def teardown(self) -> None:
        created, self._created = self._created, False
        try:
            if created:
                with psycopg.connect(self.choice.admin_dsn, autocommit=True, connect_timeout=10) as admin:
                    admin.execute("SET statement_timeout = '60s'")
                    admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def describe_config(config: Config) -> dict[str, Any]:
    """The daemon settings that matter for the figures."""
    s, lim, ws = config.storage, config.limits, config.ws
    out: dict[str, Any] = {
        "storage_backend": s.backend,
        "bus_backend": config.bus.backend,
        "storage_batch_size": s.batch_size,
        "log_level": config.log.level,
        "ws_send_queue_messages": ws.send_queue_messages,
        "ws_max_tracked_deliveries": ws.max_tracked_deliveries,
        "events_per_user_per_minute": lim.events_per_user_per_minute,
        "event_burst_per_user": lim.event_burst_per_user,
        "replay_max_page_size": config.replay.max_page_size,
    }
    if s.backend == "sqlite":
        out["sqlite_synchronous"] = s.sqlite_synchronous
    else:
        out["storage_pool_size"] = s.pool_size
    return out


class DaemonProcess:
    """``python -m pocketbridge serve`` with a fresh data dir on ephemeral loopback ports; always stop() it.

    The environment is this process's (minus ``PB_CONFIG`` and systemd's variables) plus the benchmark's
    ``PB_*`` overrides; ``config`` is what the daemon will load (checked here, before it starts).
    """

    def __init__(
        self,
        *,
        config_file: str | None,
        devices: int,
        log_level: str,
        keep_dir: bool = False,
        shared: dict[tuple[str, str], Any] | None = None,
        settings: dict[tuple[str, str], Any] | None = None,
        instance: int = 1,
    ) -> None:
        """``shared``: what the daemons of a scenario share (:meth:`SharedBackend.overrides`); ``settings``: a
        scenario's own (section, key) settings, on top of the benchmark's."""
        self.config_file = config_file
        self.devices = devices
        self.log_level = log_level
        self.keep_dir = keep_dir
        self.instance = instance
        self.dir = Path(tempfile.mkdtemp(prefix=f"pb-bench-{instance}-"))
        extra = dict(shared or {})
        if shared:  # readable instance ids in the shared database (instances, devices.instance_id)
            extra.setdefault(("server", "instance_id"), f"bench-{os.getpid()}-{instance}")
        extra.update(settings or {})
        self.overrides = bench_overrides(self.dir / "data", devices=devices, log_level=log_level, shared=extra)
        self.env = clean_env(self.overrides, base={}, inherit_pb=True)
        self.config = load_config(config_file, env=self.env)  # raises ConfigError early, with every problem
        self.server: ServerProcess | None = None

    @property
    def url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.ws_url

    @property
    def http_url(self) -> str:
        assert self.server is not None, "start() first"
        return self.server.http_url

    @property
    def ws_port(self) -> int:
        return int(urlsplit(self.url).port or 0)

    @property
    def http_port(self) -> int:
        return int(urlsplit(self.http_url).port or 0)

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server else None

    def exit_status(self) -> int | None:
        """The exit status if the process has ended, else None."""
        return self.server.proc.poll() if self.server else None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait for its banner (RuntimeError with its output if it exits or is silent)."""
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        args = ["--config", self.config_file] if self.config_file else []
        self.server = spawn("daemon", self.dir, self.env, args=args, base={}, inherit_pb=True)
        try:
            wait_started([self.server], timeout)
        except ProcessError as exc:
            raise RuntimeError(f"the daemon did not start: {exc}") from None

    def log_summary(self, samples: int = 5) -> dict[str, Any]:
        """Warnings and errors the daemon logged so far (JSON lines, or text with the level as a word)."""
        if self.server is None:
            return {"warning": None, "error": None, "first": []}
        return self.server.log_summary(samples)

    def log_tail(self, lines: int = 30) -> str:
        return self.server.describe(lines) if self.server else "(not started)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; then remove the data dir. Safe to call twice."""
        server, self.server = self.server, None
        if server is not None:
            server.stop(timeout)
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
