"""There is one PostgreSQL schema: /schema.sql. The packaged copy the daemon migrates with
(``pocketbridge/store/postgres_schema.sql``, a symlink in the source tree) must say exactly the same."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_postgres_schema_is_schema_sql() -> None:
    packaged = resources.files("pocketbridge.store").joinpath("postgres_schema.sql").read_bytes()
    assert packaged == (ROOT / "schema.sql").read_bytes()


def test_the_pl_pgsql_append_names_its_python_twin() -> None:
    """pb_append_event and rules.append_event decide alike (the contract tests run both): each says so."""
    assert "rules.append_event" in (ROOT / "schema.sql").read_text()
    assert "pb_append_event" in (ROOT / "pocketbridge" / "store" / "rules.py").read_text()
