"""Reads through a real mount against the real moto_server: bytes, freshness, blocks, GETs."""
from __future__ import annotations

import concurrent.futures
import errno
import os
import time

import pytest

import helpers
from helpers import KiB, MiB

pytestmark = pytest.mark.timeout(120)


def gets_for(moto_server, mark, key):
    return moto_server.requests_since(mark, op="GetObject", key=key)


def read_all(path, chunk=1 * MiB) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while True:
            b = f.read(chunk)
            if not b:
                return b"".join(parts)
            parts.append(b)


@pytest.mark.parametrize("size", [0, 1, 100, 64 * KiB, 1 * MiB, 1 * MiB + 1, 3 * MiB + 12345])
def test_bytes_equal(mount, s3, bucket, size):
    obj = helpers.put_random_object(s3, bucket, f"data/{size}.bin", size, seed=size)
    m = mount(bucket=bucket)
    p = m.path / "data" / f"{size}.bin"
    assert os.stat(p).st_size == size
    assert read_all(p) == obj.data
    # odd offsets and lengths, across block boundaries
    for off, n in ((0, 7), (size // 3, 70001), (max(size - 5, 0), 100), (size + 10, 10)):
        assert helpers.read_range(p, off, n) == obj.data[off:off + n]


def test_multipart_object_bytes_equal(mount, s3, bucket):
    data = helpers.random_bytes(12 * MiB + 777, seed=11)
    obj = helpers.put_multipart_object(s3, bucket, "mp.bin", data, part_size=5 * MiB)
    assert obj.etag.strip('"').endswith("-3")
    m = mount(bucket=bucket)
    assert helpers.md5_file(m.path / "mp.bin") == helpers.md5_hex(obj.data)


def test_overwrite_seen_on_next_open(mount, s3, bucket, moto_server):
    """Same size, so only the ETag can tell: the very next open sees the new bytes."""
    old = helpers.put_random_object(s3, bucket, "v.bin", 2 * MiB, seed=1)
    m = mount(bucket=bucket)  # default metadata TTL
    p = m.path / "v.bin"
    assert read_all(p) == old.data
    new = helpers.put_random_object(s3, bucket, "v.bin", 2 * MiB, seed=2)
    assert new.data != old.data and len(new.data) == len(old.data)
    assert read_all(p) == new.data
    # a small object (fetched whole) too
    helpers.put_object(s3, bucket, "small.txt", b"version one\n")
    assert (m.path / "small.txt").read_bytes() == b"version one\n"
    helpers.put_object(s3, bucket, "small.txt", b"version two\n")
    assert (m.path / "small.txt").read_bytes() == b"version two\n"
    # and one whose size changed: the kernel must not keep the old size
    helpers.put_object(s3, bucket, "small.txt", b"version three is longer\n")
    assert (m.path / "small.txt").read_bytes() == b"version three is longer\n"


def test_deleted_object_gives_enoent_on_next_open(mount, s3, bucket):
    helpers.put_object(s3, bucket, "gone.txt", b"here\n")
    m = mount(bucket=bucket)
    assert (m.path / "gone.txt").read_bytes() == b"here\n"
    s3.delete_object(Bucket=bucket, Key="gone.txt")
    with pytest.raises(FileNotFoundError):
        (m.path / "gone.txt").read_bytes()


def test_unchanged_object_served_without_get(mount, s3, bucket, moto_server):
    big = helpers.put_random_object(s3, bucket, "big.bin", 3 * MiB, seed=3)
    small = helpers.put_object(s3, bucket, "small.txt", b"tiny\n")
    m = mount(bucket=bucket)
    assert read_all(m.path / "big.bin") == big.data
    assert (m.path / "small.txt").read_bytes() == small.data
    moto_server.wait_quiet()
    mark = moto_server.mark()
    for _ in range(3):
        assert read_all(m.path / "big.bin") == big.data
        assert (m.path / "small.txt").read_bytes() == small.data
    moto_server.wait_quiet()
    reqs = moto_server.requests_since(mark)
    assert not [r for r in reqs if r.op == "GetObject"], reqs
    # every open still asked S3 which version is current
    assert {r.op for r in reqs} <= {"HeadObject", "ListObjectsV2"}
    assert len([r for r in reqs if r.op == "HeadObject" and r.key == "big.bin"]) >= 1


def test_random_read_fetches_only_its_blocks(mount, s3, bucket, moto_server):
    size = 64 * MiB
    obj = helpers.put_random_object(s3, bucket, "huge.bin", size, seed=4)
    m = mount(bucket=bucket)
    off = 32 * MiB + 12345
    mark = moto_server.mark()
    fd = os.open(m.path / "huge.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * KiB, off) == obj.data[off:off + 4 * KiB]
    finally:
        os.close(fd)
    moto_server.wait_quiet()
    gets = gets_for(moto_server, mark, "huge.bin")
    assert gets, "the read fetched nothing"
    spans = [g.range_span(size) for g in gets]
    fetched = sum(e - s for s, e in spans)
    assert fetched <= 128 * KiB, spans
    assert all(s <= off and e >= off + 4 * KiB or (s >= off - 128 * KiB and e <= off + 256 * KiB)
               for s, e in spans), spans
    assert all(g.if_match for g in gets), "ranged GETs must be pinned with If-Match"


def test_sequential_read_uses_large_parallel_gets(mount, s3, bucket, moto_server):
    size = 24 * MiB
    obj = helpers.put_random_object(s3, bucket, "seq.bin", size, seed=5)
    m = mount(bucket=bucket)
    mark = moto_server.mark()
    assert helpers.md5_file(m.path / "seq.bin") == helpers.md5_hex(obj.data)
    moto_server.wait_quiet()
    spans = sorted(g.range_span(size) for g in gets_for(moto_server, mark, "seq.bin"))
    # every byte fetched exactly once, by GETs that grow past the block size
    assert spans[0][0] == 0 and spans[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), spans
    assert max(e - s for s, e in spans) >= 4 * MiB, [(s // KiB, (e - s) // KiB) for s, e in spans]
    assert len(spans) < size // (1 * MiB)


def test_concurrent_readers_share_gets(mount, s3, bucket, moto_server):
    size = 6 * MiB + 4321
    obj = helpers.put_random_object(s3, bucket, "shared.bin", size, seed=6)
    m = mount(bucket=bucket)
    mark = moto_server.mark()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: read_all(m.path / "shared.bin", 256 * KiB), range(8)))
    assert all(r == obj.data for r in results)
    moto_server.wait_quiet()
    spans = [g.range_span(size) for g in gets_for(moto_server, mark, "shared.bin")]
    assert sum(e - s for s, e in spans) == size, "each byte must be fetched once for all readers"


def test_concurrent_readers_of_different_files(mount, s3, bucket):
    objs = [helpers.put_random_object(s3, bucket, f"many/{i}.bin", 1 * MiB + i * 9999, seed=10 + i)
            for i in range(8)]
    m = mount(bucket=bucket)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda o: read_all(m.path / o.key), objs))
    assert got == [o.data for o in objs]


@pytest.mark.expect_log("changed while open")
def test_change_under_open_file_gives_eio(mount, s3, bucket):
    size = 16 * MiB
    old = helpers.put_random_object(s3, bucket, "moving.bin", size, seed=7)
    m = mount(bucket=bucket)
    fd = os.open(m.path / "moving.bin", os.O_RDONLY)
    try:
        assert os.pread(fd, 4 * KiB, 0) == old.data[:4 * KiB]
        helpers.put_random_object(s3, bucket, "moving.bin", size, seed=8)
        with pytest.raises(OSError) as e:
            os.pread(fd, 4 * KiB, 12 * MiB)
        assert e.value.errno == errno.EIO
        # what was already served stays consistent: the old version's bytes, never a mix
        assert os.pread(fd, 4 * KiB, 0) == old.data[:4 * KiB]
    finally:
        os.close(fd)


def test_open_before_change_follows_new_version_if_nothing_served(mount, s3, bucket):
    size = 4 * MiB
    helpers.put_random_object(s3, bucket, "late.bin", size, seed=9)
    m = mount(bucket=bucket)
    fd = os.open(m.path / "late.bin", os.O_RDONLY)
    try:
        new = helpers.put_random_object(s3, bucket, "late.bin", size, seed=10)
        assert os.pread(fd, 64 * KiB, 2 * MiB) == new.data[2 * MiB:2 * MiB + 64 * KiB]
    finally:
        os.close(fd)


@pytest.mark.expect_log("unreachable")
def test_unreachable_s3_gives_enetunreach_at_once(mount, s3, bucket, moto_server):
    helpers.put_object(s3, bucket, "far.txt", b"far away\n")
    m = mount(bucket=bucket)
    os.listdir(m.path)
    moto_server.stop()
    try:
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            (m.path / "far.txt").read_bytes()
        assert e.value.errno == errno.ENETUNREACH
        assert time.monotonic() - t < 5
    finally:
        moto_server.start()
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "far.txt") == b"far away\n",
                     timeout=30,
                     message="the mount to come back online by itself")


def test_directory_read_in_order_prefetches_next_small_files(mount, s3, bucket, moto_server):
    objs = [helpers.put_random_object(s3, bucket, f"set/f{i:02d}", 4 * KiB, seed=100 + i)
            for i in range(20)]
    m = mount(bucket=bucket)
    names = os.listdir(m.path / "set")
    assert names == [f"f{i:02d}" for i in range(20)]
    mark = moto_server.mark()
    for o in objs[:3]:
        assert (m.path / o.key).read_bytes() == o.data
    moto_server.wait_quiet()
    fetched = {g.key for g in gets_for_any(moto_server, mark)}
    # the three read, and the next ones (up to 8 ahead of the last read), nothing further
    assert {o.key for o in objs[:3 + 8]} == fetched
    mark = moto_server.mark()
    for o in objs[3:11]:
        assert (m.path / o.key).read_bytes() == o.data
    moto_server.wait_quiet()
    assert not [r for r in moto_server.requests_since(mark) if r.key in {o.key for o in objs[3:10]}
                and r.op == "GetObject"]
    # a file read out of order starts nothing
    m2 = mount(bucket=bucket)
    os.listdir(m2.path / "set")
    mark = moto_server.mark()
    assert (m2.path / "set" / "f15").read_bytes() == objs[15].data
    moto_server.wait_quiet()
    assert {g.key for g in gets_for_any(moto_server, mark)} == {"set/f15"}


def gets_for_any(moto_server, mark):
    return moto_server.requests_since(mark, op="GetObject")


def test_whole_fetch_asks_for_and_checks_s3_checksum(mount, s3, bucket, moto_server):
    data = helpers.random_bytes(200 * KiB, seed=12)
    s3.put_object(Bucket=bucket, Key="summed.bin", Body=data, ChecksumAlgorithm="CRC32")
    head = s3.head_object(Bucket=bucket, Key="summed.bin", ChecksumMode="ENABLED")
    assert head.get("ChecksumCRC32"), "moto should store the CRC32"
    m = mount(bucket=bucket)
    mark = moto_server.mark()
    assert (m.path / "summed.bin").read_bytes() == data
    gets = moto_server.requests_since(mark, op="GetObject", key="summed.bin")
    assert len(gets) == 1 and gets[0].range is None
    assert {k.lower(): v for k, v in gets[0].headers.items()}.get("x-amz-checksum-mode") == "ENABLED"
    assert gets[0].if_match


@pytest.mark.expect_log("unreachable")
def test_lookup_while_unreachable_is_enetunreach_not_enoent(mount, s3, bucket, moto_server):
    helpers.put_object(s3, bucket, "d/x.txt", b"x")
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    moto_server.stop()
    try:
        for p in (m.path / "d", m.path / "d" / "x.txt", m.path / "never-seen"):
            with pytest.raises(OSError) as e:
                os.stat(p)
            assert e.value.errno == errno.ENETUNREACH, p
    finally:
        moto_server.start()
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "d" / "x.txt") == b"x",
                     timeout=30,
                     message="the mount to come back online by itself")

