"""docs/test-coverage.md stays true: every section of docs/protocol.md has a row, and every test it names exists.

A row is ``| §<n> | <title> | <tests> |``. The sections are the numbered headings of protocol.md (``## 4. …``,
``### 5.6 …``); a row may also name a numbered item of a top-level section (``1. **Ordering.** …`` under
``## 1.`` is §1.4). Its title must be the heading's text (or the item's bold words), so a renamed section shows
up here. Tests are written ``tests/<path>.py::<function>`` in backticks; a parametrized test is named without its
``[…]`` part. A test exists when its file defines a function (``def`` or ``async def``, at any level) of that name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "docs" / "protocol.md"
TABLE = ROOT / "docs" / "test-coverage.md"

HEADING = re.compile(r"^(#{2,3}) (\d+(?:\.\d+)?)\.? (.+?)\s*$")
ITEM = re.compile(r"^(\d+)\. \*\*(.+?)\*\*")
ROW = re.compile(r"^\|\s*§(\d+(?:\.\d+)?)\s*\|(.*?)\|(.*)\|\s*$")
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(?:\[[^`]*\])?`")


def protocol_sections(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(headings, items): section number -> title. Items are the numbered bold list items of ``##`` sections."""
    headings: dict[str, str] = {}
    items: dict[str, str] = {}
    current: str | None = None  # the ## section whose own text we are in (None under a ### heading)
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        heading = HEADING.match(line)
        if heading:
            level, number, title = heading.groups()
            headings[number] = title
            current = number if level == "##" else None
            continue
        item = ITEM.match(line)
        if item and current is not None:
            items[f"{current}.{item.group(1)}"] = item.group(2).rstrip(".:")
    return headings, items


def table_rows(text: str) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """section -> (title, [(file, function)]); a section listed twice is an error."""
    rows: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    for line in text.splitlines():
        row = ROW.match(line)
        if row is None:
            continue
        number, title, tests = row.groups()
        assert number not in rows, f"§{number} has two rows"
        rows[number] = (title.strip(), TEST_REF.findall(tests))
    return rows


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def problems(protocol: str, table: str, root: Path) -> list[str]:
    """Everything wrong with ``table`` for ``protocol`` (test files are looked up under ``root``)."""
    headings, items = protocol_sections(protocol)
    rows = table_rows(table)
    found: list[str] = []
    found += [f"§{n} {title!r} has no row" for n, title in headings.items() if n not in rows]
    functions: dict[str, set[str] | None] = {}
    for number, (title, tests) in rows.items():
        expected = headings.get(number, items.get(number))
        if expected is None:
            found.append(f"§{number}: no such section in protocol.md")
        elif title != expected:
            found.append(f"§{number}: title {title!r}, but protocol.md says {expected!r}")
        if not tests:
            found.append(f"§{number}: no test listed")
        for file, function in tests:
            if file not in functions:
                path = root / file
                functions[file] = defined_functions(path) if path.is_file() else None
            defined = functions[file]
            if defined is None:
                found.append(f"§{number}: {file} does not exist")
            elif function not in defined:
                found.append(f"§{number}: {file}::{function} does not exist")
    return found


# --- the real table ------------------------------------------------------------------------------------
def test_every_protocol_section_has_a_row_and_every_listed_test_exists() -> None:
    found = problems(PROTOCOL.read_text(encoding="utf-8"), TABLE.read_text(encoding="utf-8"), ROOT)
    assert not found, "docs/test-coverage.md is out of date:\n" + "\n".join(found)


def test_the_table_lists_many_tests() -> None:
    rows = table_rows(TABLE.read_text(encoding="utf-8"))
    headings, _ = protocol_sections(PROTOCOL.read_text(encoding="utf-8"))
    assert len(headings) >= 35  # the parser found protocol.md's sections (not an empty match)
    assert sum(len(tests) for _, tests in rows.values()) >= 2 * len(rows)


# --- the checker itself ----------------------------------------------------------------------------------
PROTOCOL_SAMPLE = """# Title
## 1. Transport
1. **Endpoint.** text
2. **Unknown types** after the handshake
```
## 9. not a heading inside a code block
```
## 2. Keys
### 2.1 `client_hello` (client → server)
1. **Recipients:** an item under a ### heading is not a section
"""


@pytest.fixture
def sample_root(tmp_path: Path) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('a', [1])\nasync def test_a(a):\n    pass\n\n"
        "class TestB:\n    def test_b(self):\n        pass\n"
    )
    return tmp_path


def test_sections_are_headings_and_top_level_items() -> None:
    headings, items = protocol_sections(PROTOCOL_SAMPLE)
    assert headings == {"1": "Transport", "2": "Keys", "2.1": "`client_hello` (client → server)"}
    assert items == {"1.1": "Endpoint", "1.2": "Unknown types"}


def test_a_complete_table_has_no_problems(sample_root: Path) -> None:
    table = """| Section | Title | Tests |
|---|---|---|
| §1 | Transport | `tests/test_x.py::test_a`, `tests/test_x.py::test_a[1]` |
| §1.2 | Unknown types | `tests/test_x.py::test_b` |
| §2 | Keys | `tests/test_x.py::test_b` |
| §2.1 | `client_hello` (client → server) | `tests/test_x.py::test_a` |
"""
    assert problems(PROTOCOL_SAMPLE, table, sample_root) == []


def test_missing_rows_missing_tests_and_stale_titles_are_reported(sample_root: Path) -> None:
    table = """| §1 | Transport | `tests/test_x.py::test_gone` |
| §2 | Key | `tests/test_nope.py::test_a` |
| §3 | Other | `tests/test_x.py::test_a` |
| §1.3 | Nothing | `tests/test_x.py::test_a` |
| §1.1 | Endpoint | none yet |
"""
    assert sorted(problems(PROTOCOL_SAMPLE, table, sample_root)) == sorted([
        "§2.1 '`client_hello` (client → server)' has no row",
        "§1: tests/test_x.py::test_gone does not exist",
        "§2: title 'Key', but protocol.md says 'Keys'",
        "§2: tests/test_nope.py does not exist",
        "§3: no such section in protocol.md",
        "§1.3: no such section in protocol.md",
        "§1.1: no test listed",
    ])


def test_a_section_listed_twice_is_refused() -> None:
    with pytest.raises(AssertionError, match="two rows"):
        table_rows("| §1 | A | `tests/a.py::test_a` |\n| §1 | A | `tests/a.py::test_b` |\n")
