"""A set of half-open integer intervals (block numbers present in a cache file)."""
from __future__ import annotations

import bisect
import struct


class RangeSet:
    """Sorted, disjoint, non-adjacent intervals [start, end).

    Kept as two parallel lists so membership is one bisect; adjacent intervals are merged, so a
    file read front to back is a single interval whatever its size.
    """

    __slots__ = ("_starts", "_ends")

    def __init__(self, intervals=()):
        self._starts: list[int] = []
        self._ends: list[int] = []
        for s, e in intervals:
            self.add(s, e)

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self._starts, x) - 1
        return i >= 0 and x < self._ends[i]

    def __iter__(self):
        return iter(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def count(self) -> int:
        """How many integers are in the set."""
        return sum(e - s for s, e in self)

    def covers(self, start: int, end: int) -> bool:
        if start >= end:
            return True
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        # every interval touching [start, end] merges into one
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def discard(self, start: int, end: int) -> None:
        """Remove [start, end) from the set."""
        if start >= end:
            return
        kept = []
        for s, e in self:
            if e <= start or s >= end:
                kept.append((s, e))
                continue
            if s < start:
                kept.append((s, start))
            if e > end:
                kept.append((end, e))
        self._starts = [s for s, _ in kept]
        self._ends = [e for _, e in kept]

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The gaps of [start, end) that the set does not cover, in order."""
        gaps = []
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        pos = start
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            if e <= pos:
                i += 1
                continue
            if s >= end:
                break
            if s > pos:
                gaps.append((pos, s))
            pos = max(pos, e)
            i += 1
        if pos < end:
            gaps.append((pos, end))
        return gaps

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()

    def copy(self) -> RangeSet:
        r = RangeSet()
        r._starts = list(self._starts)
        r._ends = list(self._ends)
        return r

    def to_bytes(self) -> bytes:
        flat = [x for pair in self for x in pair]
        return struct.pack(f"<{len(flat)}Q", *flat)

    @classmethod
    def from_bytes(cls, data: bytes | None) -> RangeSet:
        r = cls()
        if data:
            flat = struct.unpack(f"<{len(data) // 8}Q", data)
            r._starts = list(flat[0::2])
            r._ends = list(flat[1::2])
        return r
