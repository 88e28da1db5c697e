"""One memory budget for the read-ahead of all open files.

Each sequential reader asks for a read-ahead window that doubles up to MAX_WINDOW (fetch.py).
Without a common limit, 100 readers would ask for 100 windows at once, and each ranged GET
of that read-ahead holds a buffer while its bytes come in. The budget caps the read-ahead
bytes requested from S3 and not yet arrived, across all files: a reader alone gets its whole
window; when several read at once, each gets at most an equal share of the budget (readers
count as active for ACTIVE_FOR seconds after they last asked), and nobody gets more than
what is left. The bytes a read needs now are never held back: only what is fetched ahead is.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

ACTIVE_FOR = 1.0  # seconds a reader counts towards the share after it last asked for read-ahead
MIN_SHARE = 1 << 20  # the share never falls below this (the budget still caps the total)


class Reader:
    """What the budget keeps in each sequential reader: the read-ahead bytes it holds."""

    __slots__ = ("held",)

    def __init__(self):
        self.held = 0


class ReadAheadBudget:
    """Owns the count of read-ahead bytes outstanding: granted to fetches, and not yet landed.

    Invariant: ``outstanding`` never exceeds ``limit``: ``grant`` hands out no more than is
    free, and every byte granted is given back once (``give_back``: by the fetch as its blocks
    land, the rest when it ends). ``peak`` is the most ever
    outstanding (``status --json`` shows it, and the tests check it against the limit)."""

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit = limit
        self.outstanding = 0
        self.peak = 0
        self._clock = clock
        self._active: dict[Reader, float] = {}  # reader -> when it last asked
        self._pruned_at = float("-inf")

    def share(self, reader: Reader) -> int:
        """The most read-ahead ``reader`` may hold now: the budget, divided evenly between the
        readers that asked within ACTIVE_FOR seconds (this one included)."""
        now = self._clock()
        self._active[reader] = now
        self._prune(now)
        return max(min(MIN_SHARE, self.limit), self.limit // len(self._active))

    def _prune(self, now: float) -> None:
        """Forget the readers idle for ACTIVE_FOR that hold nothing; a few times a second at
        most, not at every read of every reader."""
        if now - self._pruned_at < ACTIVE_FOR / 4:
            return
        self._pruned_at = now
        for r, at in list(self._active.items()):
            if now - at > ACTIVE_FOR and r.held == 0:
                del self._active[r]

    def grant(self, reader: Reader, want: int) -> int:
        """Up to ``want`` bytes of read-ahead for ``reader``: no more than its share minus what
        it holds, nor than what is free. The caller gives them back with ``give_back``."""
        n = max(0, min(want, self.share(reader) - reader.held, self.limit - self.outstanding))
        if n:
            reader.held += n
            self.outstanding += n
            self.peak = max(self.peak, self.outstanding)
        return n

    def give_back(self, reader: Reader, n: int) -> None:
        n = min(n, reader.held)
        reader.held -= n
        self.outstanding -= n

    def status(self) -> dict:
        self._prune(self._clock())
        return {"limit": self.limit, "outstanding": self.outstanding, "peak": self.peak,
                "readers": len(self._active)}
