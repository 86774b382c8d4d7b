"""The one clock.

Durations use ``trio.current_time()``. Wall-clock milliseconds (what the wire carries) are derived
from the same trio clock plus an offset taken once, so tests that drive time with
``trio.testing.MockClock`` move wall time too. Outside a trio run it falls back to ``time.time()``.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """Wall-clock milliseconds anchored to the trio clock of the current run."""

    def __init__(self) -> None:
        self._offset: float | None = None

    def anchor(self) -> None:
        """Pin wall time to the current trio clock (call once inside ``trio.run``)."""
        self._offset = time.time() - trio.current_time()

    def now_ms(self) -> int:
        """Unix epoch milliseconds."""
        if self._offset is None:
            try:
                self.anchor()
            except RuntimeError:  # not inside trio.run
                return int(time.time() * 1000)
        assert self._offset is not None
        return int((trio.current_time() + self._offset) * 1000)

    @staticmethod
    def monotonic() -> float:
        """Seconds on the trio clock, for durations and deadlines."""
        return trio.current_time()
