"""A session's events between reading and answering (§5.4): several may wait for their commit at once,
their answers go out in the order the events came.

Pure state, no I/O: the session pushes an entry per event it hands to the store (or per event it
answers at once, e.g. a rejection, while earlier ones still wait), and gives each entry its answer when
the store replies, in any order; :meth:`AckQueue.answer` returns the answers that are now due, oldest
first. Bounded: the session waits while :attr:`AckQueue.full`.
"""

from __future__ import annotations

from collections import deque

from .delivery import Disconnect, Send

Answer = Send | Disconnect


class Entry:
    __slots__ = ("answer", "since")

    def __init__(self, since: float, answer: Answer | None = None) -> None:
        self.since = since  # when the event was read (for the store's timeout)
        self.answer = answer


class AckQueue:
    __slots__ = ("_entries", "depth")

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.depth = depth
        self._entries: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.depth

    def push(self, now: float, answer: Answer | None = None) -> Entry:
        """The next event: unanswered (its commit is awaited), or already ``answer``-ed behind earlier
        unanswered ones (with none waiting, the caller answers at once instead)."""
        if self.full:
            raise OverflowError("more events than the queue's depth")
        entry = Entry(now, answer)
        self._entries.append(entry)
        return entry

    def answer(self, entry: Entry, answer: Answer) -> list[Answer]:
        """``entry``'s answer is known: the answers due now (those of the oldest entries that have one)."""
        entry.answer = answer
        due: list[Answer] = []
        entries = self._entries
        while entries and entries[0].answer is not None:
            ready = entries.popleft().answer
            assert ready is not None
            due.append(ready)
        return due

    def oldest(self) -> float | None:
        """When the oldest unanswered event was read; None if none waits (the head is never answered:
        answered heads are handed out at once)."""
        return self._entries[0].since if self._entries else None
