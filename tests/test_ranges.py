"""Unit tests of RangeSet, the record of which blocks a cache file holds."""
import random

from s3stashfs.cache.ranges import RangeSet


def test_add_merges_adjacent_and_overlapping():
    r = RangeSet()
    r.add(10, 20)
    r.add(20, 30)
    r.add(5, 12)
    r.add(40, 50)
    assert list(r) == [(5, 30), (40, 50)]
    r.add(29, 41)
    assert list(r) == [(5, 50)]


def test_membership_covers_and_missing():
    r = RangeSet([(0, 4), (8, 10)])
    assert 0 in r and 3 in r and 4 not in r and 9 in r and 10 not in r
    assert r.covers(1, 4) and not r.covers(3, 9)
    assert r.missing(0, 12) == [(4, 8), (10, 12)]
    assert r.missing(2, 3) == []
    assert RangeSet().missing(3, 7) == [(3, 7)]


def test_serialisation_round_trip():
    r = RangeSet([(1, 3), (7, 1 << 40)])
    assert RangeSet.from_bytes(r.to_bytes()) == r
    assert RangeSet.from_bytes(None) == RangeSet()


def test_matches_a_plain_set_under_random_operations():
    rng = random.Random(7)
    r, ref = RangeSet(), set()
    for _ in range(500):
        a = rng.randrange(200)
        b = a + rng.randrange(1, 15)
        r.add(a, b)
        ref.update(range(a, b))
        lo = rng.randrange(200)
        hi = lo + rng.randrange(1, 40)
        gaps = {x for s, e in r.missing(lo, hi) for x in range(s, e)}
        assert gaps == set(range(lo, hi)) - ref
        assert r.covers(lo, hi) == (not gaps)
    assert r.count() == len(ref)
    starts_ends = list(r)
    assert all(e < s2 for (_, e), (s2, _) in zip(starts_ends, starts_ends[1:]))
