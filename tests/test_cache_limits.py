"""Cache size limits, eviction, a full cache disk, and the maintenance API (usage, prune,
clear, verify, pins) through real mounts on moto, and on cache directories left by them."""
from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import trio

import helpers
from s3stashfs.cache import BLOCK_SIZE, Cache
from s3stashfs.cache.catalog import Row
from s3stashfs.cache.ranges import RangeSet
from s3stashfs.config import Space

MiB = 1 << 20
LIMITS = ("--cache-min-free", "0")  # the test machine's disk must not decide what is evicted


def held(cache_dir: Path, bucket: str) -> dict[str, int]:
    """key -> bytes the catalog says the cache holds, read beside a running mount."""
    db = sqlite3.connect(f"file:{cache_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT key, held FROM objects WHERE bucket=?", (bucket,)))
    finally:
        db.close()


def gets(moto_server, mark, key: str) -> int:
    return len(moto_server.requests_since(mark, op="GetObject", key=key))


def open_cache(m) -> Cache:
    """The Cache of an unmounted mount's directory, as the `cache` commands open it."""
    assert not m.is_mounted()
    return Cache(m.cache_dir, m.endpoint_url.rstrip("/"))


def close(cache: Cache) -> None:
    trio.run(cache.close)


def test_eviction_under_a_small_cap_keeps_dirty_pinned_open_and_goes_by_last_access(
        mount, bucket, s3, moto_server, tmp_path):
    size = 3 * MiB // 2
    data = {k: helpers.put_random_object(s3, bucket, k, size, seed=k).data
            for k in ("old1.bin", "old2.bin", "pinned.bin", "open.bin", "new.bin")}
    data["reads.bam.bai"] = helpers.put_random_object(s3, bucket, "reads.bam.bai", MiB // 2,
                                                      seed=9).data
    cache_dir = tmp_path / "cache"
    m = mount(bucket=bucket, cache_dir=cache_dir, extra_args=LIMITS)
    m.unmount()
    c = open_cache(m)
    c.set_pinned(bucket, "pinned.bin", True)  # before it was ever cached: kept by key
    close(c)
    # cap: dirty + pinned + open + index + one more file; the rest must go
    m.remount(extra_args=(*LIMITS, "--cache-max-size", str(4 * size + MiB // 2)))
    (m.path / ".draft.swp").write_bytes(b"d" * size)  # local-only: dirty for good
    for k in ("reads.bam.bai", "pinned.bin", "old1.bin", "old2.bin"):
        assert (m.path / k).read_bytes() == data[k]
    with open(m.path / "open.bin", "rb") as f:
        assert f.read() == data["open.bin"]
        assert (m.path / "new.bin").read_bytes() == data["new.bin"]
        want = {"old1.bin": 0, "old2.bin": 0, "open.bin": size, "pinned.bin": size,
                "new.bin": size, ".draft.swp": size, "reads.bam.bai": MiB // 2}
        helpers.wait_for(lambda: held(cache_dir, bucket) == want, timeout=20,
                         message="the two least recently read files to be evicted, no other")
        # (reads.bam.bai was read first, but indexes go last)
    m.unmount()  # the kernel would serve what it read from its page cache
    m.remount()
    mark = moto_server.mark()
    for k in ("reads.bam.bai", "pinned.bin", "open.bin", "new.bin"):
        assert (m.path / k).read_bytes() == data[k]
    assert (m.path / ".draft.swp").read_bytes() == b"d" * size
    moto_server.wait_quiet()
    assert moto_server.requests_since(mark, op="GetObject") == []
    for k in ("old1.bin", "old2.bin"):  # evicted: fetched again, correct
        assert (m.path / k).read_bytes() == data[k]
        assert gets(moto_server, mark, k) >= 1


@pytest.mark.expect_log("over its limits")
def test_when_nothing_can_be_evicted_the_mount_goes_on_and_warns_once(mount, bucket, s3):
    size = 3 * MiB // 2
    objs = [helpers.put_random_object(s3, bucket, f"f{i}.bin", size, seed=i) for i in range(3)]
    m = mount(bucket=bucket, extra_args=(*LIMITS, "--cache-max-size", "1M"))
    files = [open(m.path / f"f{i}.bin", "rb") for i in range(3)]
    try:
        for o, f in zip(objs, files):
            assert f.read() == o.data
        helpers.wait_for(lambda: "over its limits" in m.log_text(), timeout=20)
        for o, f in zip(objs, files):  # still served
            f.seek(0)
            assert f.read() == o.data
    finally:
        for f in files:
            f.close()
    helpers.wait_for(lambda: sum(held(m.cache_dir, bucket).values()) <= MiB, timeout=20,
                     message="the files to be evicted once closed")
    assert m.log_text().count("over its limits") == 1


def _fake_cache(tmp_path: Path, rows: list[tuple[str, int, float]], **kw) -> Cache:
    """A cache holding whole objects (key, size, last_access), files and rows."""
    c = Cache(tmp_path / "cache", "http://fake", **kw)
    for key, size, when in rows:
        n = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        row = Row(id=None, origin="http://fake", bucket="b", key=key, etag="e" + key, size=size,
                  mtime_ns=0, metadata=None, file=f"data/00/{key}", block_size=BLOCK_SIZE,
                  ranges=RangeSet([(0, n)]).to_bytes(), complete=True, last_access=when)
        c.catalog.put(row)
        (c.dir / "data" / "00").mkdir(exist_ok=True)
        (c.dir / row.file).write_bytes(b"x" * size)
    return c


def test_min_free_evicts_oldest_first_and_indexes_last(tmp_path):
    c = _fake_cache(tmp_path, [("a.bam.bai", MiB, 1.0), ("b", MiB, 2.0), ("c", MiB, 3.0),
                               ("d", MiB, 4.0)], min_free=Space(percent=10))
    free = {"bytes": 100 * MiB - 3 * MiB // 2}  # 1.5 MiB short of 10% of 1000 MiB
    c.disk_space = lambda: (free["bytes"], 1000 * MiB)
    try:
        assert trio.run(c.make_room) == 2 * MiB
        assert [k for k in "bcd" if (c.dir / f"data/00/{k}").exists()] == ["d"]
        assert (c.dir / "data/00/a.bam.bai").exists()
        assert c.usage()["bytes"] == 2 * MiB
        free["bytes"] = 99 * MiB - 1  # 1 MiB + 1 short: d goes, then at last the index
        assert trio.run(c.make_room) == 2 * MiB
        assert not any((c.dir / "data/00").iterdir())
        assert c.usage()["bytes"] == 0
    finally:
        close(c)


def test_eviction_goes_by_batches_oldest_first_and_raises_plain_errors(tmp_path, monkeypatch):
    """Eviction drops a few objects per catalog query, lets requests in between, and unlinks
    earlier batches meanwhile: 30 objects, 20 over the limit, the 20 oldest go and the files are
    gone when make_room returns; an error unlinking reaches the caller as itself, not as the
    nursery's exception group."""
    from s3stashfs.cache import space
    rows = [(f"k{i:02d}", 1000, float(i)) for i in range(30)]
    c = _fake_cache(tmp_path, rows, max_size=10 * 1000)
    c.disk_space = lambda: (1 << 40, 1 << 41)
    try:
        assert space.EVICT_BATCH < 20
        assert trio.run(c.make_room) == 20 * 1000
        left = sorted(p.name for p in (c.dir / "data" / "00").iterdir())
        assert left == [f"k{i:02d}" for i in range(20, 30)]
        assert c.usage()["bytes"] == 10 * 1000

        def refuse(paths):
            raise PermissionError(errno.EACCES, "refused", paths[0])
        monkeypatch.setattr(space, "unlink_all", refuse)
        c.max_size = 5 * 1000
        with pytest.raises(PermissionError):
            trio.run(c.make_room)
    finally:
        close(c)


def test_size_setting_parser(tmp_path):
    from s3stashfs import config
    from s3stashfs.errors import ConfigError
    env = {"HOME": str(tmp_path)}
    s = config.load({}, env)
    assert s.cache_max_size is None and s.cache_min_free == Space(percent=5)
    s = config.load({"cache_max_size": "1.5T", "cache_min_free": "2G"}, env)
    assert s.cache_max_size == 3 << 39 and s.cache_min_free == Space(bytes=2 << 30)
    for v, want in (("500M", 500 << 20), ("20GiB", 20 << 30), ("4096", 4096), ("none", None),
                    ("0", None)):
        assert config.load({"cache_max_size": v}, env).cache_max_size == want
    assert config.load({"cache_min_free": "12.5%"}, env).cache_min_free == Space(percent=12.5)
    for key, v in (("cache_max_size", "lots"), ("cache_max_size", "-1G"), ("cache_max_size", "1.5"),
                   ("cache_min_free", "150%"), ("cache_min_free", "5 percent")):
        with pytest.raises(ConfigError) as e:
            config.load({key: v}, env)
        assert "--" + key.replace("_", "-") in str(e.value) and "\n" not in str(e.value)


def test_bad_size_flag_exits_2(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([str(Path(os.sys.executable).parent / "s3stashfs"), "mount", str(mnt),
                        "--cache-max-size", "big"], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "--cache-max-size" in r.stderr and "500M" in r.stderr


@pytest.fixture
def tiny_tmpfs(tmp_path):
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def wait_recorded(m, bucket: str, sizes: dict[str, int]) -> None:
    helpers.wait_for(lambda: all(held(m.cache_dir, bucket).get(k) == v for k, v in sizes.items()),
                     timeout=20, message=f"{sorted(sizes)} to be recorded in the catalog")


@pytest.mark.expect_log("disk is full", "over its limits")
def test_full_cache_disk_gives_enospc_on_that_read_and_corrupts_nothing(
        mount, bucket, s3, moto_server, tiny_tmpfs):
    size = 3 * MiB // 2
    keep = helpers.put_random_object(s3, bucket, "keep.bin", size, seed=1)
    other = helpers.put_random_object(s3, bucket, "other.bin", size, seed=2)
    big = helpers.put_random_object(s3, bucket, "big.bin", 24 * MiB, seed=3)
    cache_dir = tiny_tmpfs / "cache"
    m = mount(bucket=bucket, cache_dir=cache_dir, extra_args=LIMITS)
    m.unmount()
    c = open_cache(m)
    c.set_pinned(bucket, "keep.bin", True)
    close(c)
    m.remount()
    assert (m.path / "keep.bin").read_bytes() == keep.data
    assert (m.path / "other.bin").read_bytes() == other.data
    wait_recorded(m, bucket, {"keep.bin": size, "other.bin": size})
    with pytest.raises(OSError) as e:
        (m.path / "big.bin").read_bytes()
    assert e.value.errno == errno.ENOSPC
    moto_server.wait_quiet()
    mark = moto_server.mark()
    assert (m.path / "keep.bin").read_bytes() == keep.data  # pinned: still cached
    assert gets(moto_server, mark, "keep.bin") == 0
    m.unmount()  # the kernel forgets what it read; the cache is closed cleanly
    m.remount()
    mark = moto_server.mark()
    assert (m.path / "keep.bin").read_bytes() == keep.data
    assert gets(moto_server, mark, "keep.bin") == 0
    assert (m.path / "other.bin").read_bytes() == other.data  # evicted to make room: fetched
    with open(m.path / "big.bin", "rb") as f:  # what fit before the disk filled is correct
        assert f.read(2 * MiB) == big.data[:2 * MiB]


@pytest.mark.expect_log("disk full", "disk is full", "over its limits")
def test_writes_on_a_full_cache_disk_give_enospc(mount, bucket, tiny_tmpfs):
    m = mount(bucket=bucket, cache_dir=tiny_tmpfs / "cache", extra_args=LIMITS)
    with pytest.raises(OSError) as e:
        with open(m.path / ".fill.swp", "wb") as f:  # local-only: never uploaded
            for _ in range(32):
                f.write(b"w" * MiB)
                f.flush()
    assert e.value.errno == errno.ENOSPC
    os.unlink(m.path / ".fill.swp")
    st = os.statvfs(tiny_tmpfs)  # the space comes back once the mount closes the file
    helpers.wait_for(lambda: os.statvfs(tiny_tmpfs).f_bavail > st.f_blocks // 2, timeout=10)
    (m.path / ".small.swp").write_bytes(b"fits again")
    assert (m.path / ".small.swp").read_bytes() == b"fits again"


def test_usage_prune_clear_on_an_unmounted_cache(mount, bucket, s3):
    size = 3 * MiB // 2
    objs = {k: helpers.put_random_object(s3, bucket, k, size, seed=k) for k in ("a", "b", "c")}
    m = mount(bucket=bucket)
    (m.path / ".d.swp").write_bytes(b"d" * 1000)  # local-only: dirty
    for k in ("a", "b"):
        assert (m.path / k).read_bytes() == objs[k].data
    helpers.wait_for(lambda: held(m.cache_dir, bucket).get("b") == size, timeout=10)
    middle = time.time()
    assert (m.path / "c").read_bytes() == objs["c"].data
    m.unmount()
    c = open_cache(m)
    try:
        u = c.usage()
        assert u["bytes"] == 3 * size + 1000 and u["objects"] == 4
        assert (u["dirty_objects"], u["dirty_bytes"]) == (1, 1000)
        assert (u["pinned_objects"], u["pinned_bytes"]) == (0, 0)
        assert u["max_size"] is None and u["disk_total"] > 0 and 0 <= u["disk_free"]
        c.set_pinned(bucket, "b", True)
        assert c.usage()["pinned_bytes"] == size
        assert c.prune(middle) == {"objects": 1, "bytes": size, "kept_dirty": 1,
                                   "kept_pinned": 1, "kept_open": 0}
        assert c.clear() == {"objects": 1, "bytes": size, "kept_dirty": 1, "kept_pinned": 1,
                             "kept_open": 0}
        assert c.clear(include_pinned=True)["objects"] == 1
        u = c.usage()
        assert (u["bytes"], u["objects"], u["dirty_bytes"]) == (1000, 1, 1000)
    finally:
        close(c)
    m.remount()
    assert (m.path / ".d.swp").read_bytes() == b"d" * 1000
    for k in ("a", "b", "c"):
        assert (m.path / k).read_bytes() == objs[k].data


def test_verify_drops_a_corrupt_block_and_the_next_read_fetches_it_again(
        mount, bucket, s3, moto_server):
    big = helpers.put_random_object(s3, bucket, "big.bam", 8 * MiB, seed=5)
    small = helpers.put_random_object(s3, bucket, "small.txt", 100_000, seed=6)
    m = mount(bucket=bucket)
    off = 3 * MiB + 1000
    assert helpers.read_range(m.path / "big.bam", off, 5000) == big.data[off:off + 5000]
    assert (m.path / "small.txt").read_bytes() == small.data
    m.unmount()
    c = open_cache(m)
    try:
        clean = trio.run(c.verify)
        assert clean["bad_blocks"] == 0 and clean["objects"] == 2 and clean["bytes"] > 100_000
        for key, where in (("big.bam", off + 10), ("small.txt", 500)):
            path = c.dir / c.catalog.get(c.origin, bucket, key).file
            with open(path, "r+b") as f:
                f.seek(where)
                byte = f.read(1)
                f.seek(where)
                f.write(bytes([byte[0] ^ 0xFF]))
        seen = []
        r = trio.run(c.verify, lambda n, b: seen.append(n))
        assert seen == [1, 2]
        assert r["bad_blocks"] == 1 + 1  # one block of each (small.txt is summed too)
        assert sorted((o["key"], o["bad_bytes"]) for o in r["bad_objects"]) == [
            ("big.bam", BLOCK_SIZE), ("small.txt", BLOCK_SIZE)]
        assert trio.run(c.verify)["bad_blocks"] == 0  # dropped: nothing bad left
    finally:
        close(c)
    m.remount()
    mark = moto_server.mark()
    assert helpers.read_range(m.path / "big.bam", off, 5000) == big.data[off:off + 5000]
    assert (m.path / "small.txt").read_bytes() == small.data
    moto_server.wait_quiet()
    assert gets(moto_server, mark, "big.bam") >= 1 and gets(moto_server, mark, "small.txt") == 1
