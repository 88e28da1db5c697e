"""The read-ahead budget's arithmetic (s3stashfs/budget.py): shares, grants, the cap.

Through a real mount: tests/test_parallel.py::test_many_sequential_readers_share_the_budget."""
from __future__ import annotations

from s3stashfs.budget import ACTIVE_FOR, MIN_SHARE, ReadAheadBudget, Reader
from s3stashfs.fetch import MAX_WINDOW

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_reader_alone_gets_the_whole_budget():
    b = ReadAheadBudget(64 * MiB, Clock())
    r = Reader()
    assert b.share(r) == 64 * MiB >= MAX_WINDOW  # the default budget: one reader, a full window
    assert b.grant(r, 40 * MiB) == 40 * MiB
    assert b.grant(r, 40 * MiB) == 24 * MiB  # no more than its share
    assert b.grant(r, 1) == 0
    assert (b.outstanding, b.peak, r.held) == (64 * MiB, 64 * MiB, 64 * MiB)
    b.give_back(r, 40 * MiB)
    assert (b.outstanding, b.peak, r.held) == (24 * MiB, 64 * MiB, 24 * MiB)


def test_active_readers_share_it_evenly_and_never_exceed_it():
    clock = Clock()
    b = ReadAheadBudget(64 * MiB, clock)
    first, *others = readers = [Reader() for _ in range(4)]
    assert b.grant(first, 64 * MiB) == 64 * MiB  # alone: all of it
    assert [b.share(r) for r in others] == [32 * MiB, 64 * MiB // 3, 16 * MiB]  # as they come
    for r in others:
        assert b.grant(r, 8 * MiB) == 0  # nothing is free until the first gives some back
    b.give_back(first, 64 * MiB)
    got = [b.grant(r, 64 * MiB) for r in readers]
    assert got == [16 * MiB] * 4  # each its share, once all four have asked
    assert b.outstanding == b.peak == 64 * MiB
    for r, n in zip(readers, got):
        b.give_back(r, n)
    assert b.outstanding == 0 and all(r.held == 0 for r in readers)


def test_idle_readers_stop_counting_and_the_share_has_a_floor():
    clock = Clock()
    b = ReadAheadBudget(8 * MiB, clock)
    readers = [Reader() for _ in range(100)]
    for r in readers:
        b.share(r)
    assert b.share(readers[0]) == MIN_SHARE  # 8 MiB / 100, raised to the floor...
    total = sum(b.grant(r, 8 * MiB) for r in readers)
    assert total == b.outstanding == 8 * MiB  # ...but the budget still caps the sum
    assert b.status() == {"limit": 8 * MiB, "outstanding": 8 * MiB, "peak": 8 * MiB,
                          "readers": 100}
    for r in readers:
        b.give_back(r, r.held)
    clock.now += ACTIVE_FOR + 0.1
    assert b.share(readers[0]) == 8 * MiB  # the others have not asked for a while
    assert b.status()["readers"] == 1


def test_a_reader_holding_bytes_keeps_counting():
    clock = Clock()
    b = ReadAheadBudget(8 * MiB, clock)
    slow, fast = Reader(), Reader()
    assert b.grant(slow, 2 * MiB) == 2 * MiB
    clock.now += ACTIVE_FOR + 0.1
    assert b.share(fast) == 4 * MiB  # slow's GET is still out: it still has a share
    b.give_back(slow, 5 * MiB)  # never more than it holds
    assert b.outstanding == 0 and slow.held == 0


def test_a_budget_smaller_than_the_floor():
    b = ReadAheadBudget(MiB // 2, Clock())
    r = Reader()
    assert b.share(r) == MiB // 2
    assert b.grant(r, MiB) == MiB // 2
