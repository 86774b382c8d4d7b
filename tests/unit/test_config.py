from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from pocketbridge import config as cfgmod
from pocketbridge.config import (
    Config,
    describe_problems,
    load_config,
    parse_hostport,
    with_overrides,
)
from pocketbridge.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
MiB = 1024 * 1024


def problems_of(toml: str = "", tmp_path: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    path = None
    if tmp_path is not None:
        path = tmp_path / "pb.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    return info.value.problems


def load_text(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "pb.toml"
    path.write_text(toml)
    return load_config(path, env=env or {})


def test_defaults_match_spec() -> None:
    c = Config()
    assert (c.listen.ws, c.listen.http, c.listen.metrics) == ("127.0.0.1:3001", "127.0.0.1:3002", "")
    assert c.server.trusted_proxies == () and c.server.instance_id == ""
    assert (c.storage.backend, c.storage.pool_size, c.storage.statement_timeout, c.storage.op_timeout) == (
        "sqlite",
        10,
        5.0,
        10.0,
    )
    assert (c.storage.batch_size, c.storage.sqlite_synchronous, c.storage.min_free_bytes) == (256, "full", 256 * MiB)
    assert (c.bus.backend, c.bus.url) == ("memory", "redis://127.0.0.1:6379/0")
    assert attrs.asdict(c.ws) == {
        "max_message_bytes": 16 * MiB,
        "handshake_timeout": 30,
        "ping_interval": 30,
        "pong_timeout": 60,
        "send_queue_messages": 1000,
        "send_queue_bytes": 32 * MiB,
        "max_tracked_deliveries": 10_000,
        "close_timeout": 5,
        "upgrade_timeout": 10,
        "max_handshake_message_bytes": 64 * 1024,
        "max_fragments_per_message": 4096,
        "max_pending_connections": 1024,
    }
    assert (c.session.ttl, c.session.warning_before, c.events.max_payload_bytes) == (86_400, 300, 10 * MiB)
    assert attrs.astuple(c.limits) == (5, 50, 60, 30, 1000, 1000, 20, 300, 64, 1024 * MiB, 256 * MiB)
    assert attrs.astuple(c.replay) == (100, 1000, 8 * MiB, 10_000, 3600)
    assert attrs.astuple(c.pairing) == (300, 10, 5, 20, 60)
    assert attrs.astuple(c.retention) == (90, 90, 3600, 0)  # event_days, audit_days, purge_interval, inactive_user_days
    assert attrs.astuple(c.http) == (3600, 65536, (), 60, 30, 120, 10, 30, 3, 30)
    assert attrs.astuple(c.admin) == ("", 60, 10)
    assert (c.log.level, c.log.format, c.drain.window, c.drain.deadline) == ("info", "auto", 10, 30)
    assert (c.tracing.exporter, c.tracing.service_name) == ("none", "pocketbridge")


def test_load_without_file_is_defaults_with_resolved_data_dir(tmp_path: Path) -> None:
    c = load_config(None, env={"XDG_DATA_HOME": str(tmp_path)})
    assert c == attrs.evolve(Config(), server=attrs.evolve(Config().server, data_dir=str(tmp_path / "pocketbridge")))


def test_example_file_is_exactly_the_defaults() -> None:
    assert load_config(EXAMPLE, env={}) == load_config(None, env={})


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for sec, cls in cfgmod.SECTIONS.items():
        assert f"\n[{sec}]\n" in text
        for field in attrs.fields(cls):
            assert f"\n{field.name} = " in text, (sec, field.name)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"STATE_DIRECTORY": "/var/lib/pocketbridge:/var/lib/other"}, "/var/lib/pocketbridge"),
        ({"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}, "/xdg/pocketbridge"),
        ({"HOME": "/home/u"}, "/home/u/.local/share/pocketbridge"),
    ],
)
def test_data_dir_resolution(env: dict[str, str], expected: str) -> None:
    c = load_config(None, env=env)
    assert c.data_dir() == Path(expected)
    assert c.identity_key_path() == Path(expected) / "identity.key"
    assert c.sqlite_path() == Path(expected) / "pocketbridge.db"


def test_explicit_paths_and_addresses(tmp_path: Path) -> None:
    c = load_text(
        tmp_path,
        """
[server]
data_dir = "/srv/pb"
identity_key_file = "/etc/pb/id.key"
[storage]
path = "/fast/pb.db"
[listen]
ws = "[::1]:0"
http = "0.0.0.0:8080"
metrics = "127.0.0.1:9100"
""",
    )
    assert c.data_dir() == Path("/srv/pb")
    assert c.identity_key_path() == Path("/etc/pb/id.key")
    assert c.sqlite_path() == Path("/fast/pb.db")
    assert c.ws_address() == ("::1", 0)
    assert c.http_address() == ("0.0.0.0", 8080)
    assert c.metrics_address() == ("127.0.0.1", 9100)
    assert Config().metrics_address() is None


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[ws]\nmax_message_bytes = -1", "[ws] max_message_bytes = -1: must be an integer >= 1"),
        ("[ws]\nmax_message_bytes = 0", "[ws] max_message_bytes = 0: must be an integer >= 1"),
        ("[ws]\nmax_message_bytes = 1.5", "[ws] max_message_bytes = 1.5: must be an integer >= 1"),
        ("[ws]\nmax_message_bytes = '5'", "[ws] max_message_bytes = '5': must be an integer >= 1"),
        ("[limits]\nmax_devices_per_user = true", "[limits] max_devices_per_user = True: must be an integer >= 1"),
        ("[retention]\nevent_days = 0", "[retention] event_days = 0: must be an integer >= 1"),
        ("[ws]\nping_interval = 0", "[ws] ping_interval = 0: must be a number > 0"),
        ("[ws]\nping_interval = -0.5", "[ws] ping_interval = -0.5: must be a number > 0"),
        ("[ws]\nping_interval = nan", "[ws] ping_interval = nan: must be a number > 0"),
        ("[ws]\nping_interval = false", "[ws] ping_interval = False: must be a number > 0"),
        ("[session]\nttl = 599", "[session] ttl = 599: must be a number >= 600"),
        ("[storage]\nbackend = 'mysql'", "[storage] backend = 'mysql': must be one of 'sqlite', 'postgres'"),
        ("[log]\nlevel = 'verbose'", "[log] level = 'verbose': must be one of 'debug', 'info', 'warning', 'error'"),
        ("[listen]\nws = 'localhost'", "[listen] ws = 'localhost': must be 'host:port' with a port 0-65535"),
        ("[listen]\nhttp = 3002", "[listen] http = 3002: must be 'host:port'"),
        ("[listen]\nmetrics = ':99999'", "[listen] metrics = ':99999': must be empty or 'host:port'"),
        ("[server]\ntrusted_proxies = '10.0.0.1'", "[server] trusted_proxies = '10.0.0.1': must be a list of IP"),
        ("[server]\ntrusted_proxies = ['10.0.0.300']", "[server] trusted_proxies = ['10.0.0.300']: must be a list"),
        ("[http]\ncors_origins = ['https://a.example/']", "[http] cors_origins = ['https://a.example/']: must be"),
        ("[bus]\nurl = 'http://x'", "[bus] url = 'http://x': must be a redis://, rediss:// or unix:// URL"),
        ("[server]\ninstance_id = 'a b'", "[server] instance_id = 'a b': must be empty or 1-64 of"),
        ("ws = 5", "[ws] = 5: must be a table of keys"),
    ],
)
def test_bad_value_names_key_value_and_rule(tmp_path: Path, toml: str, expected: str) -> None:
    [problem] = problems_of(toml, tmp_path)
    assert problem.startswith(expected)


def test_long_values_are_truncated(tmp_path: Path) -> None:
    [problem] = problems_of(f"[bus]\nurl = '{'x' * 500}'", tmp_path)
    assert problem.startswith("[bus] url = 'xxxx") and "...: must be" in problem and len(problem) < 150


def test_valid_values_are_accepted(tmp_path: Path) -> None:
    c = load_text(
        tmp_path,
        """
[server]
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "::1"]
[storage]
backend = "postgres"
dsn = "postgresql://pb@db/pb"
statement_timeout = 2
[http]
cors_origins = ["*", "https://app.example.com", "http://localhost:5173"]
[admin]
api_key = "k" # overridden below
[session]
ttl = 600
warning_before = 599.5
""",
        env={"PB_ADMIN_API_KEY": "x" * 32},
    )
    assert c.server.trusted_proxies == ("127.0.0.1", "10.0.0.0/8", "::1")
    assert (c.storage.backend, c.storage.statement_timeout) == ("postgres", 2)
    assert c.http.cors_origins == ("*", "https://app.example.com", "http://localhost:5173")
    assert c.admin.api_key == "x" * 32
    assert (c.session.ttl, c.session.warning_before) == (600, 599.5)


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    problems = problems_of(
        """
[wss]
x = 1
[ws]
max_message_bytes = 0
max_mesage_bytes = 5
ping_interval = "abc"
[storage]
backend = "mysql"
[session]
ttl = 1000
warning_before = 1000
""",
        tmp_path,
        env={"PB_LIMITS_CLOCK_SKEW": "-3"},
    )
    assert len(problems) == 7, problems
    text = "\n".join(problems)
    for fragment in [
        "[wss]: unknown section (known sections: listen, server, storage",
        "[ws] max_message_bytes = 0: must be an integer >= 1",
        "[ws] max_mesage_bytes: unknown key (known keys: max_message_bytes, handshake_timeout",
        "[ws] ping_interval = 'abc': must be a number > 0",
        "[storage] backend = 'mysql'",
        "[session] warning_before = 1000: must be less than [session] ttl (1000)",
        "PB_LIMITS_CLOCK_SKEW = '-3': must be a number > 0",
    ]:
        assert fragment in text
    assert describe_problems(ConfigError(problems)).startswith("invalid configuration (7 problems):\n  - ")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[session]\nwarning_before = 86400",
            "[session] warning_before = 86400: must be less than [session] ttl (86400)",
        ),
        (
            "[replay]\ndefault_page_size = 1001",
            "[replay] default_page_size = 1001: must be at most [replay] max_page_size (1000)",
        ),
        (
            "[events]\nmax_payload_bytes = 16777216",
            "[events] max_payload_bytes = 16777216: must be less than [ws] max_message_bytes (16777216)",
        ),
        ("[drain]\nwindow = 30", "[drain] window = 30: must be less than [drain] deadline (30)"),
        ("[storage]\nbackend = 'postgres'", "[storage] dsn = '': must be set when [storage] backend = 'postgres'"),
    ],
)
def test_cross_key_rules(tmp_path: Path, toml: str, expected: str) -> None:
    assert problems_of(toml, tmp_path) == [expected]


def test_api_key_too_short_is_not_echoed(tmp_path: Path) -> None:
    secret = "hunter2-hunter2"
    [problem] = problems_of(f"[admin]\napi_key = '{secret}'", tmp_path)
    assert problem == "[admin] api_key = <hidden>: must be empty or at least 32 characters"
    [problem] = problems_of(env={"PB_ADMIN_API_KEY": secret})
    assert problem == "PB_ADMIN_API_KEY = <hidden>: must be empty or at least 32 characters"
    c = load_config(None, env={"PB_ADMIN_API_KEY": "s" * 40})
    assert "s" * 40 not in repr(c)


def test_env_overrides_are_typed(tmp_path: Path) -> None:
    c = load_text(
        tmp_path,
        "[ws]\nmax_message_bytes = 2000\n",
        env={
            "PB_WS_MAX_MESSAGE_BYTES": "1000",
            "PB_EVENTS_MAX_PAYLOAD_BYTES": "999",
            "PB_LIMITS_MAX_DEVICES_PER_USER": "3",
            "PB_WS_PING_INTERVAL": "2.5",
            "PB_STORAGE_BACKEND": "postgres",
            "PB_STORAGE_DSN": "postgresql:///pb",
            "PB_SERVER_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.1,",
            "PB_HTTP_CORS_ORIGINS": "",
            "PB_CONFIG": "/etc/pocketbridge.toml",
            "HOME": "/home/u",
            "OTHER_VAR": "x",
        },
    )
    assert (c.ws.max_message_bytes, c.events.max_payload_bytes, c.limits.max_devices_per_user) == (1000, 999, 3)
    assert c.ws.ping_interval == 2.5
    assert (c.storage.backend, c.storage.dsn) == ("postgres", "postgresql:///pb")
    assert c.server.trusted_proxies == ("127.0.0.1", "10.0.0.1")
    assert c.http.cors_origins == ()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"PB_WS_PING_INTERVAL": "abc"}, "PB_WS_PING_INTERVAL = 'abc': must be a number > 0"),
        ({"PB_WS_PING_INTERVAL": "inf"}, "PB_WS_PING_INTERVAL = 'inf': must be a number > 0"),
        ({"PB_WS_MAX_MESSAGE_BYTES": "1.5"}, "PB_WS_MAX_MESSAGE_BYTES = '1.5': must be an integer >= 1"),
        ({"PB_WS_MAX_MESSAGE_BYTES": "-1"}, "PB_WS_MAX_MESSAGE_BYTES = '-1': must be an integer >= 1"),
        ({"PB_STORAGE_BACKEND": "mysql"}, "PB_STORAGE_BACKEND = 'mysql': must be one of 'sqlite', 'postgres'"),
        ({"PB_SERVER_TRUSTED_PROXIES": "1.2.3.4,nope"}, "PB_SERVER_TRUSTED_PROXIES = '1.2.3.4,nope': must be a list"),
        ({"PB_WS_MAX_MESAGE_BYTES": "1"}, "PB_WS_MAX_MESAGE_BYTES: unknown key [ws] max_mesage_bytes (known keys: "),
        ({"PB_WSS_PING_INTERVAL": "1"}, "PB_WSS_PING_INTERVAL: unknown section [wss] (known sections: listen, "),
        ({"PB_DEBUG": "1"}, "PB_DEBUG: unknown section [debug]"),
    ],
)
def test_env_errors(env: dict[str, str], expected: str) -> None:
    [problem] = problems_of(env=env)
    assert problem.startswith(expected)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), (" no ", False)],
)
def test_bool_env_values(text: str, value: bool) -> None:
    # No key is boolean yet; the rule is ready for the first one.
    assert cfgmod._flag(False).metadata["rule"].from_env(text) is value


def test_bool_env_rejects_other_words() -> None:
    rule = cfgmod._flag(False).metadata["rule"]
    with pytest.raises(ValueError):
        rule.from_env("maybe")
    with pytest.raises(ValueError):
        rule.structure(1)


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    [problem] = pytest.raises(ConfigError, load_config, missing, {}).value.problems
    assert problem.startswith(f"{missing}: cannot read config file: ")
    bad = tmp_path / "bad.toml"
    bad.write_text("[ws]\nmax_message_bytes = = 3\n")
    [problem] = pytest.raises(ConfigError, load_config, bad, {}).value.problems
    assert problem.startswith(f"{bad}: invalid TOML: ") and "line 2" in problem


def test_with_overrides_revalidates() -> None:
    base = load_config(None, env={})
    c = with_overrides(base, ws={"handshake_timeout": 1}, listen={"ws": "127.0.0.1:0"})
    assert (c.ws.handshake_timeout, c.ws_address(), c.ws.ping_interval) == (1, ("127.0.0.1", 0), 30)
    assert c.server == base.server
    assert with_overrides(base, server={"trusted_proxies": ["::1"]}).server.trusted_proxies == ("::1",)
    with pytest.raises(ConfigError) as info:
        with_overrides(base, ws={"handshake_timeout": 0, "nope": 1}, bogus={"a": 1})
    assert len(info.value.problems) == 3


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        cfgmod.WsConfig(max_message_bytes=0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:3001", ("127.0.0.1", 3001)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:3001", ("::1", 3001)),
        ("[::]:80", ("::", 80)),
        ("pb-1.example.com:443", ("pb-1.example.com", 443)),
    ],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "localhost",
        ":3001",
        "host:",
        "host:65536",
        "host:-1",
        "host:+1",
        "host: 80",
        "host:８０",
        "::1:3001",
        "[::1]",
        "[nope]:80",
        "[::1:80",
        "a b:80",
        "host:80:90",
    ],
)
def test_parse_hostport_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(value)


def test_example_file_is_the_generated_config() -> None:
    """config.example.toml is exactly what `pocketbridge config init` writes (generated from the model)."""
    from pocketbridge.config import render_config

    regenerate = "pocketbridge config init --out config.example.toml --force"
    assert EXAMPLE.read_text() == render_config(), regenerate


def test_config_init_writes_a_valid_file(tmp_path: Path) -> None:
    from pocketbridge.cli import main

    out = tmp_path / "pocketbridge.toml"
    assert main(["config", "init", "--out", str(out)]) == 0
    assert load_config(out, env={}) == load_config(None, env={})
    assert main(["config", "init", "--out", str(out)]) == 1  # never replaces a file unasked
    assert main(["config", "init", "--out", str(out), "--force"]) == 0
