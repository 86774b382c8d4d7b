"""The one configuration model: TOML file, then ``PB_<SECTION>_<KEY>`` environment overrides.

Every key is declared once, below, as an attrs field whose metadata holds a :class:`_Rule`. The rule is the
single source of truth for the key: it validates TOML values (as a per-field cattrs structure hook, so every bad
key is reported, not just the first), converts environment strings, guards direct construction (attrs
validator) and words the problem message. Durations are seconds (int or float). See ``config.example.toml``.
"""

from __future__ import annotations

import ipaddress
import json
import math
import operator
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
)
from cattrs.gen import make_dict_structure_fn, override

from pocketbridge.config_doc import HEADER, KEYS
from pocketbridge.errors import ConfigError

__all__ = [
    "AdminConfig",
    "BusConfig",
    "Config",
    "DrainConfig",
    "EventsConfig",
    "HttpConfig",
    "LimitsConfig",
    "ListenConfig",
    "LogConfig",
    "PairingConfig",
    "ReplayConfig",
    "RetentionConfig",
    "ServerConfig",
    "SessionConfig",
    "StorageConfig",
    "WsConfig",
    "describe_problems",
    "load_config",
    "parse_hostport",
    "with_overrides",
]

ENV_PREFIX = "PB_"
ENV_NOT_OVERRIDES = frozenset({"PB_CONFIG"})  # PB_* variables that are not PB_<SECTION>_<KEY> overrides
_SHOW_MAX = 60

_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_hostport(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:3001"``) into ``(host, port)``; port 0 means ephemeral."""
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"{value!r} is not 'host:port' with a port 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    elif not _HOST_RE.fullmatch(host):
        raise ValueError(f"{value!r}: bad host {host!r} (write IPv6 addresses as '[::1]:port')")
    return host, int(port)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


# --- rules ----------------------------------------------------------------------------------------------


@attrs.frozen
class _Rule:
    """What one key accepts: ``ok`` tests a (TOML-typed) value, ``parse`` turns an env string into one."""

    text: str  # completes "must be ..."
    ok: Callable[[Any], bool]
    parse: Callable[[str], Any] = str
    normalize: Callable[[Any], Any] = lambda v: v
    secret: bool = False

    def problem(self, where: str, value: Any) -> str:
        return f"{where} = {'<hidden>' if self.secret else _show(value)}: must be {self.text}"

    def structure(self, value: Any, _type: Any = None) -> Any:
        """cattrs hook: the checked, normalized value (raises ValueError; the caller words the problem)."""
        if not self.ok(value):
            raise ValueError(f"must be {self.text}")
        return self.normalize(value)

    def __call__(self, _instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        """attrs validator, for direct construction."""
        if not self.ok(value):
            raise ValueError(self.problem(attribute.name, value))

    def from_env(self, text: str) -> Any:
        """The typed value of an environment string (raises ValueError)."""
        return self.structure(self.parse(text))


def _key(rule: _Rule, default: Any) -> Any:
    return attrs.field(default=default, validator=rule, repr=not rule.secret, metadata={"rule": rule})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _int(default: int, minimum: int = 1) -> Any:
    return _key(_Rule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum, parse=int), default)


def _secs(default: float, minimum: float | None = None) -> Any:
    """A duration in seconds: > 0, or >= ``minimum``."""
    if minimum is None:
        rule = _Rule("a number > 0", lambda v: _is_num(v) and v > 0, parse=float)
    else:
        rule = _Rule(f"a number >= {minimum}", lambda v: _is_num(v) and v >= minimum, parse=float)
    return _key(rule, default)


def _choice(default: str, *options: str) -> Any:
    return _text(default, "one of " + ", ".join(map(repr, options)), options.__contains__)


def _text(default: str = "", text: str = "a string", ok: Callable[[str], bool] = lambda v: True, **kw: Any) -> Any:
    return _key(_Rule(text, lambda v: isinstance(v, str) and ok(v), **kw), default)


def _list(text: str, item_ok: Callable[[str], bool]) -> Any:
    def ok(v: Any) -> bool:
        return isinstance(v, list | tuple) and all(isinstance(i, str) and item_ok(i) for i in v)

    def parse(s: str) -> list[str]:
        return [item.strip() for item in s.split(",") if item.strip()]

    return _key(_Rule(text, ok, parse=parse, normalize=tuple), ())


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(text) from None


def _flag(default: bool) -> Any:  # no key is boolean yet; env accepts true/false/1/0/yes/no
    return _key(_Rule("true or false", lambda v: isinstance(v, bool), parse=_parse_bool), default)


def _succeeds(fn: Callable[[str], Any]) -> Callable[[str], bool]:
    def ok(v: str) -> bool:
        try:
            fn(v)
        except ValueError:
            return False
        return True

    return ok


_ADDRESS = "'host:port' with a port 0-65535 (IPv6 as '[::1]:3001')"
_is_hostport = _succeeds(parse_hostport)


def _address(default: str, optional: bool = False) -> Any:
    if optional:
        return _text(default, f"empty or {_ADDRESS}", lambda v: not v or _is_hostport(v))
    return _text(default, _ADDRESS, _is_hostport)


# --- sections -------------------------------------------------------------------------------------------

_MiB = 1024 * 1024


@attrs.frozen(kw_only=True)
class ListenConfig:
    ws: str = _address("127.0.0.1:3001")
    http: str = _address("127.0.0.1:3002")
    metrics: str = _address("", optional=True)


@attrs.frozen(kw_only=True)
class ServerConfig:
    data_dir: str = _text()
    identity_key_file: str = _text()
    trusted_proxies: tuple[str, ...] = _list(
        "a list of IP addresses or CIDRs", _succeeds(lambda v: ipaddress.ip_network(v, strict=False))
    )
    instance_id: str = _text(
        "", "empty or 1-64 of A-Z a-z 0-9 . _ -", lambda v: re.fullmatch(r"[A-Za-z0-9._-]{0,64}", v) is not None
    )


@attrs.frozen(kw_only=True)
class StorageConfig:
    backend: str = _choice("sqlite", "sqlite", "postgres")
    path: str = _text()
    dsn: str = _text()
    pool_size: int = _int(10)
    statement_timeout: float = _secs(5.0)
    op_timeout: float = _secs(10.0)
    batch_size: int = _int(256)
    batch_linger: float = _secs(0.002, minimum=0)
    sqlite_synchronous: str = _choice("full", "full", "normal")
    min_free_bytes: int = _int(256 * _MiB, minimum=0)


@attrs.frozen(kw_only=True)
class BusConfig:
    backend: str = _choice("memory", "memory", "redis")
    url: str = _text(
        "redis://127.0.0.1:6379/0",
        "a redis://, rediss:// or unix:// URL",
        lambda v: v.startswith(("redis://", "rediss://", "unix://")),
    )


@attrs.frozen(kw_only=True)
class WsConfig:
    max_message_bytes: int = _int(16 * _MiB)
    handshake_timeout: float = _secs(30)
    ping_interval: float = _secs(30)
    pong_timeout: float = _secs(60)
    send_queue_messages: int = _int(1000)
    send_queue_bytes: int = _int(32 * _MiB)
    max_tracked_deliveries: int = _int(10_000)
    close_timeout: float = _secs(5)
    upgrade_timeout: float = _secs(10)
    max_handshake_message_bytes: int = _int(64 * 1024)
    max_fragments_per_message: int = _int(4096)
    max_pending_connections: int = _int(1024)


@attrs.frozen(kw_only=True)
class SessionConfig:
    ttl: float = _secs(86_400, minimum=600)
    warning_before: float = _secs(300)


@attrs.frozen(kw_only=True)
class EventsConfig:
    max_payload_bytes: int = _int(10 * _MiB)


@attrs.frozen(kw_only=True)
class LimitsConfig:
    max_devices_per_user: int = _int(5)
    ws_connections_per_ip: int = _int(50)
    ws_connects_per_ip_per_minute: int = _int(60)
    handshakes_per_ip_per_minute: int = _int(30)
    events_per_user_per_minute: int = _int(1000)
    event_burst_per_user: int = _int(1000)
    scratchpad_per_connection_per_second: int = _int(20)
    clock_skew: float = _secs(300)
    ipv6_prefix: int = _key(_Rule("an integer 32-128", lambda v: _is_int(v) and 32 <= v <= 128, parse=int), 64)
    max_stored_bytes_per_user: int = _int(1024 * _MiB, minimum=0)
    stored_bytes_per_user_per_minute: int = _int(256 * _MiB, minimum=0)


@attrs.frozen(kw_only=True)
class ReplayConfig:
    default_page_size: int = _int(100)
    max_page_size: int = _int(1000)
    max_page_bytes: int = _int(8 * _MiB)
    full_resync_threshold: int = _int(10_000)
    token_max_age: float = _secs(3600)


@attrs.frozen(kw_only=True)
class PairingConfig:
    code_ttl: float = _secs(300)
    initiations_per_device_per_hour: int = _int(10)
    max_failures_per_connection: int = _int(5)
    max_failures_per_ip_per_hour: int = _int(20)
    max_failures_per_minute: int = _int(60)


@attrs.frozen(kw_only=True)
class RetentionConfig:
    event_days: int = _int(90)
    audit_days: int = _int(90)
    purge_interval: float = _secs(3600)
    inactive_user_days: int = _int(0, minimum=0)


@attrs.frozen(kw_only=True)
class HttpConfig:
    bearer_token_ttl: float = _secs(3600)
    max_body_bytes: int = _int(64 * 1024)
    cors_origins: tuple[str, ...] = _list(
        "a list of origins such as 'https://app.example.com' (no path), or '*'",
        lambda v: v == "*" or re.fullmatch(r"https?://[^/\s]+", v) is not None,
    )
    unauthenticated_per_ip_per_minute: int = _int(60)
    auth_failures_per_ip_per_minute: int = _int(30)
    requests_per_device_per_minute: int = _int(120)
    token_requests_per_device_per_minute: int = _int(10)
    device_mutations_per_user_per_minute: int = _int(30)
    account_deletions_per_user_per_hour: int = _int(3)
    keep_alive_timeout: float = _secs(30)


@attrs.frozen(kw_only=True)
class AdminConfig:
    api_key: str = _text("", "empty or at least 32 characters", lambda v: not v or len(v) >= 32, secret=True)
    requests_per_ip_per_minute: int = _int(60)
    auth_failures_per_ip_per_minute: int = _int(10)


@attrs.frozen(kw_only=True)
class LogConfig:
    level: str = _choice("info", "debug", "info", "warning", "error")
    format: str = _choice("auto", "auto", "json", "text")


@attrs.frozen(kw_only=True)
class DrainConfig:
    window: float = _secs(10)
    deadline: float = _secs(30)


@attrs.frozen(kw_only=True)
class TracingConfig:
    exporter: str = _choice("none", "none", "otlp", "console")
    endpoint: str = _text(
        "http://127.0.0.1:4318/v1/traces", "an http(s) URL", lambda v: re.fullmatch(r"https?://\S+", v) is not None
    )
    service_name: str = _text("pocketbridge", "1-64 characters", lambda v: 1 <= len(v) <= 64)


SECTIONS: dict[str, type] = {
    "listen": ListenConfig,
    "server": ServerConfig,
    "storage": StorageConfig,
    "bus": BusConfig,
    "ws": WsConfig,
    "session": SessionConfig,
    "events": EventsConfig,
    "limits": LimitsConfig,
    "replay": ReplayConfig,
    "pairing": PairingConfig,
    "retention": RetentionConfig,
    "http": HttpConfig,
    "admin": AdminConfig,
    "log": LogConfig,
    "drain": DrainConfig,
    "tracing": TracingConfig,
}


def _default_data_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):  # systemd StateDirectory=; may list several, colon-separated
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "pocketbridge"
    return Path(env.get("HOME") or Path.home()) / ".local" / "share" / "pocketbridge"


@attrs.frozen(kw_only=True)
class Config:
    """The whole, validated configuration. Build it with :func:`load_config` or :func:`with_overrides`."""

    listen: ListenConfig = attrs.Factory(ListenConfig)
    server: ServerConfig = attrs.Factory(ServerConfig)
    storage: StorageConfig = attrs.Factory(StorageConfig)
    bus: BusConfig = attrs.Factory(BusConfig)
    ws: WsConfig = attrs.Factory(WsConfig)
    session: SessionConfig = attrs.Factory(SessionConfig)
    events: EventsConfig = attrs.Factory(EventsConfig)
    limits: LimitsConfig = attrs.Factory(LimitsConfig)
    replay: ReplayConfig = attrs.Factory(ReplayConfig)
    pairing: PairingConfig = attrs.Factory(PairingConfig)
    retention: RetentionConfig = attrs.Factory(RetentionConfig)
    http: HttpConfig = attrs.Factory(HttpConfig)
    admin: AdminConfig = attrs.Factory(AdminConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    drain: DrainConfig = attrs.Factory(DrainConfig)
    tracing: TracingConfig = attrs.Factory(TracingConfig)

    def data_dir(self) -> Path:
        """``[server] data_dir``; load_config fills an empty one from the environment (see the example file)."""
        return Path(self.server.data_dir or _default_data_dir(os.environ)).expanduser()

    def identity_key_path(self) -> Path:
        return (
            Path(self.server.identity_key_file).expanduser()
            if self.server.identity_key_file
            else self.data_dir() / "identity.key"
        )

    def sqlite_path(self) -> Path:
        return Path(self.storage.path).expanduser() if self.storage.path else self.data_dir() / "pocketbridge.db"

    def ws_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen.ws)

    def http_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen.http)

    def metrics_address(self) -> tuple[str, int] | None:
        """None: metrics are served on the HTTP listener, to loopback peers only."""
        return parse_hostport(self.listen.metrics) if self.listen.metrics else None


# --- loading --------------------------------------------------------------------------------------------


def _rules(cls: type) -> dict[str, _Rule]:
    return {a.name: a.metadata["rule"] for a in attrs.fields(cls)}


_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
for _cls in SECTIONS.values():
    _overrides: dict[str, Any] = {key: override(struct_hook=rule.structure) for key, rule in _rules(_cls).items()}
    _converter.register_structure_hook(
        _cls,
        make_dict_structure_fn(_cls, _converter, **_overrides),
    )

# Cross-key rules: (section, key) must be <op> (other section, other key).
_RELATIONS = (
    ("session", "warning_before", operator.lt, "session", "ttl"),
    ("events", "max_payload_bytes", operator.lt, "ws", "max_message_bytes"),
    ("replay", "default_page_size", operator.le, "replay", "max_page_size"),
    ("drain", "window", operator.lt, "drain", "deadline"),
    ("replay", "max_page_bytes", operator.le, "ws", "send_queue_bytes"),  # a replay page must fit the queue
)
RELAYED_EVENT_OVERHEAD = 64 * 1024  # envelope and metadata of one relayed event, beyond its base64 payload


def relayed_event_bytes(max_payload_bytes: int) -> int:
    """The largest encoded event the server may have to queue for one receiver."""
    return -(-max_payload_bytes // 3) * 4 + RELAYED_EVENT_OVERHEAD
_OP_TEXT = {operator.lt: "less than", operator.le: "at most"}


def _known(what: str, names: Any) -> str:
    return f"(known {what}: {', '.join(names)})"


def _apply_env(env: Mapping[str, str], raw: dict[str, Any], problems: list[str]) -> None:
    """Merge ``PB_<SECTION>_<KEY>`` variables into ``raw``, converted by the key's rule."""
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_OVERRIDES:
            continue
        sec, _, key = name[len(ENV_PREFIX) :].lower().partition("_")
        if sec not in SECTIONS:
            problems.append(f"{name}: unknown section [{sec}] {_known('sections', SECTIONS)}")
            continue
        rules = _rules(SECTIONS[sec])
        if key not in rules:
            problems.append(f"{name}: unknown key [{sec}] {key} {_known('keys', rules)}")
            continue
        try:
            value = rules[key].from_env(text)
        except ValueError:
            problems.append(rules[key].problem(name, text))
            continue
        table = raw.setdefault(sec, {})
        if isinstance(table, dict):
            table[key] = value


def _explain(sec: str, table: Mapping[str, Any], err: ClassValidationError) -> list[str]:
    rules = _rules(SECTIONS[sec])
    problems = []
    for exc in err.exceptions:
        if isinstance(exc, ForbiddenExtraKeysError):
            problems += [f"[{sec}] {key}: unknown key {_known('keys', rules)}" for key in sorted(exc.extra_fields)]
        else:
            key = next(n.name for n in getattr(exc, "__notes__", ()) if isinstance(n, AttributeValidationNote))
            problems.append(rules[key].problem(f"[{sec}] {key}", table[key]))
    return problems


def _build(raw: Mapping[str, Any], problems: list[str]) -> Config:
    """Validate ``raw`` (section → table) completely; raise ConfigError with every problem found."""
    problems += [f"[{sec}]: unknown section {_known('sections', SECTIONS)}" for sec in sorted(raw.keys() - SECTIONS)]
    sections: dict[str, Any] = {}
    for sec, cls in SECTIONS.items():
        table = raw.get(sec, {})
        if not isinstance(table, Mapping):
            problems.append(f"[{sec}] = {_show(table)}: must be a table of keys")
            continue
        try:
            sections[sec] = _converter.structure(table, cls)
        except ClassValidationError as err:
            problems += _explain(sec, table, err)
    for sec, key, op, other_sec, other_key in _RELATIONS:
        if sec in sections and other_sec in sections:
            value, other = getattr(sections[sec], key), getattr(sections[other_sec], other_key)
            if not op(value, other):
                problems.append(
                    f"[{sec}] {key} = {value!r}: must be {_OP_TEXT[op]} [{other_sec}] {other_key} ({other!r})"
                )
    ws, events = sections.get("ws"), sections.get("events")
    if ws and events and ws.send_queue_bytes < relayed_event_bytes(events.max_payload_bytes):
        problems.append(
            f"[ws] send_queue_bytes = {ws.send_queue_bytes}: must hold one relayed event of [events]"
            f" max_payload_bytes ({events.max_payload_bytes}), at least {relayed_event_bytes(events.max_payload_bytes)}"
        )
    storage = sections.get("storage")
    if storage and storage.backend == "postgres" and not storage.dsn:
        problems.append("[storage] dsn = '': must be set when [storage] backend = 'postgres'")
    if problems:
        raise ConfigError(problems)
    return Config(**sections)


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``path`` (None: defaults only), apply ``PB_<SECTION>_<KEY>`` overrides from ``env`` (None: os.environ).

    An empty ``[server] data_dir`` is resolved here, from ``env``: $STATE_DIRECTORY, else
    $XDG_DATA_HOME/pocketbridge, else ~/.local/share/pocketbridge. Raises ConfigError listing every problem.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError([f"{os.fspath(path)}: cannot read config file: {e.strerror or e}"]) from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError([f"{os.fspath(path)}: invalid TOML: {e}"]) from e
    problems: list[str] = []
    _apply_env(env, raw, problems)
    config = _build(raw, problems)
    if not config.server.data_dir:
        server = attrs.evolve(config.server, data_dir=str(_default_data_dir(env)))
        config = attrs.evolve(config, server=server)
    return config


def with_overrides(config: Config, **sections: Mapping[str, Any]) -> Config:
    """``config`` with some keys replaced, re-validated, e.g. ``with_overrides(cfg, ws={"ping_interval": 1})``."""
    raw = attrs.asdict(config)
    for sec, values in sections.items():
        table = raw.get(sec)
        raw[sec] = {**table, **values} if isinstance(table, dict) else dict(values)
    return _build(raw, [])


def describe_problems(err: ConfigError) -> str:
    """The problems of ``err`` as a multi-line message for the CLI."""
    count = len(err.problems)
    head = f"invalid configuration ({count} problem{'' if count == 1 else 's'}):"
    return "\n".join([head, *(f"  - {problem}" for problem in err.problems)])


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def render_config(config: Config | None = None) -> str:
    """A fully commented configuration file: every key of the model with its comment and its value in
    ``config`` (the defaults when None). ``pocketbridge config init`` writes it; config.example.toml is it."""
    config = config if config is not None else Config()
    out = [HEADER.rstrip("\n"), ""]
    for section, cls in SECTIONS.items():
        out.append(f"[{section}]")
        values = getattr(config, section)
        for field in attrs.fields(cls):
            doc = KEYS.get(section, {}).get(field.name)
            if doc is None:
                raise KeyError(f"[{section}] {field.name} has no comment in pocketbridge/config_doc.py")
            out += [f"# {line}".rstrip() for line in doc.splitlines()]
            out.append(f"{field.name} = {_toml_value(getattr(values, field.name))}")
        out.append("")
    return "\n".join(out)
