"""The command line speaks for itself: every subcommand has a description, the top-level help points to the
PB_* variables and the docs, `version` and `key show` work, and check-config states its heading once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketbridge import __version__
from pocketbridge.cli import main
from pocketbridge.identity import write_new_identity

COMMANDS = [
    ["serve"], ["version"], ["keygen"], ["key"], ["key", "show"], ["migrate"], ["check-config"], ["config"],
    ["config", "init"], ["bench"], ["client"], ["client", "init"], ["client", "register"], ["client", "api"],
    ["client", "pair"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_subcommand_has_a_description(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    blocks = capsys.readouterr().out.split("\n\n")
    assert len(blocks) > 2 and blocks[1].strip() and not blocks[1].startswith(("options:", "positional")), blocks[:2]


def test_top_level_help_names_the_variables_and_the_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # as read, whatever the line wrapping
    assert "PB_<SECTION>_<KEY>" in out and "docs/operations.md" in out and "config init" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"pocketbridge {__version__}"


def test_key_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    identity = write_new_identity(tmp_path / "identity.key")
    assert main(["key", "show", str(tmp_path / "identity.key")]) == 0
    out = capsys.readouterr().out
    assert identity.public_hex in out and identity.fingerprint() in out and "PRIVATE" not in out
    assert main(["key", "show", str(tmp_path / "missing.key")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_config_heading_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[ws]\nmax_message_bytes = -1\nping_interval = "x"\n')
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("invalid configuration") == 1, err
    assert err.startswith("pocketbridge: invalid configuration (2 problems):")
