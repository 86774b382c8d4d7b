"""Device names (§3.6) shared by the handshake and the store: pure, importing nothing of either."""

from __future__ import annotations

import re
from collections.abc import Collection

MAX_DEVICE_NAME = 50
_NUMBERED_RE = re.compile(r"(.*) \(([0-9]+)\)", re.DOTALL)


def dedupe_device_name(name: str, taken: Collection[str]) -> str:
    """``name``, or the first free ``base (n)``, n ≥ 2, with ``base`` shortened to stay within 50 code points."""
    if name not in taken:
        return name
    numbered = _NUMBERED_RE.fullmatch(name)
    base = numbered.group(1) if numbered and int(numbered.group(2)) >= 2 else name
    n = 2
    while True:
        suffix = f" ({n})"
        candidate = base[: MAX_DEVICE_NAME - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1
