"""When S3 cannot be reached: cached data is served, the rest fails at once, and the mount comes
back by itself. S3 is made unreachable by stopping the real server process."""
from __future__ import annotations

import errno
import os
import time

import pytest

import helpers
from helpers import MiB

pytestmark = [pytest.mark.timeout(120), pytest.mark.expect_log("unreachable")]


def enetunreach_at_once(fn):
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.ENETUNREACH, e.value
    assert time.monotonic() - t < 2.0


def test_offline_serves_the_cache_and_fails_the_rest_at_once(mount, s3, bucket, moto_server):
    small = helpers.put_object(s3, bucket, "a.txt", b"cached small\n")
    big = helpers.put_random_object(s3, bucket, "big.bin", 3 * MiB + 7)
    helpers.put_object(s3, bucket, "sub/c.txt", b"c\n")
    helpers.put_object(s3, bucket, "uncached.txt", b"later\n")
    helpers.put_object(s3, bucket, "other/d.txt", b"d\n")
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])  # every open asks S3
    assert (m.path / "a.txt").read_bytes() == small.data
    assert helpers.md5_file(m.path / "big.bin") == helpers.md5_hex(big.data)
    assert (m.path / "sub" / "c.txt").read_bytes() == b"c\n"
    names = sorted(os.listdir(m.path))
    moto_server.stop()
    try:
        # cached files open and read, byte for byte
        assert (m.path / "a.txt").read_bytes() == small.data
        assert helpers.md5_file(m.path / "big.bin") == helpers.md5_hex(big.data)
        assert (m.path / "sub" / "c.txt").read_bytes() == b"c\n"
        # known directories list
        assert sorted(os.listdir(m.path)) == names
        assert os.listdir(m.path / "sub") == ["c.txt"]
        # the rest: "Network is unreachable", at once; never ENOENT for what may exist
        enetunreach_at_once(lambda: (m.path / "uncached.txt").read_bytes())
        enetunreach_at_once(lambda: os.listdir(m.path / "other"))
        enetunreach_at_once(lambda: os.stat(m.path / "never-heard-of"))
    finally:
        moto_server.start()
    # back online by itself, without a remount
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "uncached.txt") == b"later\n",
                     timeout=30,
                     message="the mount to come back online")



def test_mount_while_s3_is_down_serves_the_cache(mount, s3, bucket, moto_server):
    helpers.put_object(s3, bucket, "keep.txt", b"kept\n")
    helpers.put_object(s3, bucket, "new.txt", b"new\n")
    m = mount(bucket=bucket)
    assert (m.path / "keep.txt").read_bytes() == b"kept\n"
    m.unmount()
    moto_server.stop()
    try:
        m.remount()  # succeeds: there is a cache to serve
        assert (m.path / "keep.txt").read_bytes() == b"kept\n"
        assert os.listdir(m.path) == ["keep.txt"]  # what the cache knows
        enetunreach_at_once(lambda: (m.path / "new.txt").read_bytes())
    finally:
        moto_server.start()
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "new.txt") == b"new\n",
                     timeout=30,
                     message="the mount to come back online")


def test_mount_with_no_cache_and_no_s3_fails_clearly(mount, bucket, moto_server):
    moto_server.stop()
    try:
        m, r = mount.run(bucket=bucket)
        assert r.returncode == 1
        assert b"cannot reach S3" in r.stderr
        assert not m.is_mounted()
    finally:
        moto_server.start()


def test_names_seen_online_stay_known_offline(mount, s3, bucket, moto_server):
    """What S3 showed this mount (a directory looked up, a file stat'ed) is still there offline,
    though nothing below it was ever cached: stat and listings say so, reads and the listing of
    a directory never listed say unreachable."""
    helpers.put_object(s3, bucket, "sub/deep/x.txt", b"x\n")
    helpers.put_object(s3, bucket, "seen.txt", b"seen\n")
    helpers.put_object(s3, bucket, "cached.txt", b"cached\n")
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])  # the kernel asks every time
    assert os.path.isdir(m.path / "sub")
    assert os.stat(m.path / "seen.txt").st_size == 5
    assert (m.path / "cached.txt").read_bytes() == b"cached\n"
    moto_server.stop()
    try:
        assert os.path.isdir(m.path / "sub")
        assert os.stat(m.path / "seen.txt").st_size == 5
        assert sorted(os.listdir(m.path)) == ["cached.txt", "seen.txt", "sub"]
        enetunreach_at_once(lambda: (m.path / "seen.txt").read_bytes())
        # the lookup of sub listed it (one LIST, which held all of it): it lists as then
        assert os.listdir(m.path / "sub") == ["deep"]
        enetunreach_at_once(lambda: os.listdir(m.path / "sub" / "deep"))  # never listed
    finally:
        moto_server.start()
