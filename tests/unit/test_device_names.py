"""Device names (protocol.md §3.6, §10.3): bidirectional controls are removed at the handshake and refused by the
REST rename; one character rule serves both. Other format characters (ZWJ in emoji sequences) are kept, and so
are quotes and ``&`` (clients escape names when they display them)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.protocol.handshake import device_name_has_invalid_chars, sanitize_device_name

BIDI_CONTROLS = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"  # one emoji: four people joined by ZWJ
FLAG = "\U0001f3f3\ufe0f\u200d\U0001f308"  # ZWJ and a variation selector


def test_the_bidi_controls_are_exactly_the_twelve_of_the_spec() -> None:
    assert len(BIDI_CONTROLS) == 12
    assert all(unicodedata.bidirectional(chr(c)) in ("LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI",
                                                     "PDI", "L", "R", "AL") for c in BIDI_CONTROLS)
    assert all(unicodedata.category(chr(c)) == "Cf" for c in BIDI_CONTROLS)


@pytest.mark.parametrize("code", BIDI_CONTROLS, ids=lambda c: f"U+{c:04X}")
def test_each_bidi_control_is_removed_at_the_handshake(code: int) -> None:
    ch = chr(code)
    assert sanitize_device_name(f"invoice{ch}fdp.exe") == "invoicefdp.exe"
    assert sanitize_device_name(f"{ch}Laptop{ch}") == "Laptop"
    assert sanitize_device_name(ch * 3) is None  # nothing left: no name


@pytest.mark.parametrize("code", BIDI_CONTROLS, ids=lambda c: f"U+{c:04X}")
def test_each_bidi_control_is_an_invalid_character_for_rename(code: int) -> None:
    assert device_name_has_invalid_chars(f"Laptop{chr(code)}")


def test_removal_happens_before_truncation() -> None:
    # 49 letters and many controls: the controls must not push the last letters out of the 50 code points
    name = "".join(f"{'a' if i % 2 else 'b'}\u202e" for i in range(49)) + "c"
    assert sanitize_device_name(name) == "".join("a" if i % 2 else "b" for i in range(49)) + "c"


@pytest.mark.parametrize(
    "name",
    [
        FAMILY,
        f"Dad's phone {FAMILY}",
        FLAG,
        "Tom's \"work\" laptop & tablet",
        "\u05d8\u05dc\u05e4\u05d5\u05df",  # Hebrew letters: right-to-left text itself is fine
        "\u0647\u0627\u062a\u0641",  # Arabic letters
        "Phone \u200b\u2060\ufeff",  # other Cf characters are not bidi controls
    ],
)
def test_legitimate_names_survive_both_paths(name: str) -> None:
    assert sanitize_device_name(name) == name.strip()
    assert not device_name_has_invalid_chars(name)


@pytest.mark.parametrize("ch", ["\x00", "\x1f", "\x7f", "\x85", "\ud800", "<", ">"])
def test_the_other_invalid_characters_are_unchanged(ch: str) -> None:
    assert sanitize_device_name(f"A{ch}B") == "AB"
    assert device_name_has_invalid_chars(f"A{ch}B")


def _reference_sanitize(name: str) -> str | None:
    kept = "".join(
        ch for ch in name
        if ch not in "<>" and unicodedata.category(ch) not in ("Cc", "Cs") and ord(ch) not in BIDI_CONTROLS
    )
    return kept.strip()[:50].strip() or None


NAMES = st.lists(
    st.one_of(st.characters(exclude_categories=[]),
              st.sampled_from([chr(c) for c in BIDI_CONTROLS] + ["\u200d", "<", ">", " "])),
    max_size=80,
).map("".join)


@given(NAMES)
def test_the_two_paths_agree(name: str) -> None:
    """The handshake keeps exactly what the rename would accept (and removes the rest)."""
    assert sanitize_device_name(name) == _reference_sanitize(name)
    cleaned = sanitize_device_name(name)
    if cleaned is not None:
        assert not device_name_has_invalid_chars(cleaned)
    assert device_name_has_invalid_chars(name) == (name != "".join(
        ch for ch in name if ch not in "<>" and unicodedata.category(ch) not in ("Cc", "Cs")
        and ord(ch) not in BIDI_CONTROLS))
