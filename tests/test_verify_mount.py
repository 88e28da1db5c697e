"""Multipart objects verified end to end, through a real mount against moto: read completely,
each is verified against what S3 gives (its per-part or full-object checksum, or its multipart
ETag recomputed from the cached bytes), and says how in user.s3.cache; a cached byte that is
not S3's is dropped, recorded for status and fetched again; `cache verify` reports how each
object stands against S3 and checks again those not yet verified."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess

import pytest

import helpers
from conftest import S3STASHFS_BIN
from helpers import MiB

pytestmark = pytest.mark.timeout(180)

PART = 5 * MiB  # the smallest part S3 allows: small objects of several parts
SIZE = 2 * PART + 777  # three parts


def upload(s3, bucket, key, data, algo=None) -> str:
    return helpers.put_multipart_with_checksums(s3, bucket, key, data, PART, algo)


def read_all(path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        parts = []
        while chunk := f.read(MiB):
            parts.append(chunk)
    return b"".join(parts)


def cache_state(path) -> str:
    return os.getxattr(path, "user.s3.cache").decode()


def cli(env, *args):
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def cli_json(env, *args, code=0):
    r = cli(env, *args, "--json")
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def catalog(cache_dir):
    return sqlite3.connect(str(cache_dir / "catalog.sqlite3"), isolation_level=None)


@pytest.mark.parametrize("key, algo, how", [
    ("plain.bam", None, "multipart ETag"),
    ("crc32c.bam", "CRC32C", "per-part CRC32C"),
    ("crc32.bam", "CRC32", "per-part CRC32"),
    ("sha256.bam", "SHA256", "per-part SHA256"),
    ("crc64.bam", "CRC64NVME", "CRC64NVME"),
    ("plain.bam.bai", None, "multipart ETag"),  # an index: fetched whole, checked after
    ("crc64.bam.bai", "CRC64NVME", "CRC64NVME"),  # fetched whole, checked as it arrives
])
def test_multipart_object_read_through_the_mount_is_verified(mount, s3, bucket, key, algo, how):
    data = helpers.random_bytes(SIZE, seed=key)
    upload(s3, bucket, key, data, algo)
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    p = m.path / key
    assert cache_state(p) == "none"
    assert read_all(p) == data
    helpers.wait_for(lambda: cache_state(p) == f"complete, verified ({how})", timeout=30,
                     message=lambda: f"{key} verified by {how} (user.s3.cache: {cache_state(p)!r})")
    if key == "crc32c.bam":  # recorded in the catalog (one case is enough: remounts are slow)
        m.remount(extra_args=["--xattrs"])
        assert cache_state(p) == f"complete, verified ({how})"


def damage_cached_byte(cache_dir, key, offset) -> None:
    """Change one cached byte of ``key`` as if S3 had sent it wrong: its block sum is made to
    agree with it (the block checks cannot tell; only a check against S3 can)."""
    from s3stashfs.cache import BLOCK_SIZE, SUMS_SUFFIX, write_sums
    with catalog(cache_dir) as db:
        file, size = db.execute("SELECT file, size FROM objects WHERE key=?", (key,)).fetchone()
    path = cache_dir / file
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), offset)
        if os.path.exists(str(path) + SUMS_SUFFIX):
            sums = os.open(str(path) + SUMS_SUFFIX, os.O_RDWR)
            try:
                block = offset // BLOCK_SIZE
                write_sums(fd, sums, size, block, block + 1)
            finally:
                os.close(sums)
    finally:
        os.close(fd)


@pytest.mark.expect_log("do not match S3's multipart ETag")
def test_damaged_multipart_object_is_dropped_recorded_and_fetched_again(mount, s3, bucket):
    """A multipart object without checksums: a cached byte that is not S3's is found by the
    multipart ETag recomputed once the object is complete; the bytes are dropped, the error is
    in `status`, and the next read gets S3's bytes (not the kernel's copy of the bad ones)."""
    data = helpers.random_bytes(SIZE, seed="damaged")
    upload(s3, bucket, "reads.bam", data)
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    p = m.path / "reads.bam"
    assert helpers.read_range(p, 0, 100_000) == data[:100_000]
    assert cache_state(p).startswith("partial")
    m.unmount()
    damage_cached_byte(m.cache_dir, "reads.bam", 1000)

    m.remount(extra_args=["--xattrs"])
    read_all(p)  # the damaged block comes from the cache; the rest completes the object

    def dropped():
        errors = cli_json(m.env, "status", m.path)["errors"]
        return [e for e in errors if e["key"] == "reads.bam"]
    errors = helpers.wait_for(dropped, timeout=30, message="the mismatch recorded for status")
    assert "multipart ETag" in errors[0]["message"] and "dropped" in errors[0]["message"]
    assert read_all(p) == data  # fetched again
    helpers.wait_for(lambda: cache_state(p) == "complete, verified (multipart ETag)",
                     timeout=30, message="the refetched bytes verified")
    assert len(dropped()) == 1
    assert len([ln for ln in m.log_text().splitlines() if "do not match" in ln]) == 1


@pytest.mark.expect_log("do not match S3's multipart ETag|unreachable|offline")
def test_offline_bytes_dropped_by_the_object_check_give_eio(mount, s3, bucket, s3_proxy):
    """Bytes dropped by the check of the whole object (not by a block's own sum) are known to
    be bad: while S3 is unreachable, a read of them fails with EIO, not ENETUNREACH."""
    data = helpers.random_bytes(SIZE, seed="dropped-offline")
    upload(s3, bucket, "reads.bam", data)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--xattrs"])
    p = m.path / "reads.bam"
    assert helpers.read_range(p, 0, 100_000) == data[:100_000]
    m.unmount()
    damage_cached_byte(m.cache_dir, "reads.bam", 1000)
    m.remount(extra_args=["--xattrs"])
    read_all(p)
    helpers.wait_for(lambda: "do not match" in m.log_text(), timeout=30,
                     message="the mismatch found by the object's check")
    helpers.cut_off(m, s3_proxy)
    for off in (0, SIZE - 5000):
        with pytest.raises(OSError) as e:
            helpers.read_range(p, off, 4096)
        assert e.value.errno == errno.EIO, e.value
    helpers.reconnect(m, s3_proxy)
    assert read_all(p) == data


@pytest.mark.expect_log("unreachable|could not be reached")
def test_cache_verify_reports_and_rechecks_against_s3(mount, s3, bucket, moto_server):
    """`cache verify` says how each complete object is verified against S3, and checks the
    ones not yet verified (here: recorded by an older version) when S3 can be reached."""
    data = helpers.random_bytes(SIZE, seed="recheck")
    upload(s3, bucket, "old.bam", data)
    helpers.put_object(s3, bucket, "small.txt", b"single part\n")
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    assert read_all(m.path / "old.bam") == data
    assert (m.path / "small.txt").read_bytes() == b"single part\n"
    helpers.wait_for(lambda: cache_state(m.path / "old.bam").startswith("complete, verified"),
                     timeout=30, message="old.bam verified")
    got = cli_json(m.env, "cache", "verify", m.path)["against_s3"]
    assert got["verified"] == {"md5": 1, "multipart-etag": 1} and got["partial"] == 0
    m.unmount()
    with catalog(m.cache_dir) as db:  # as an older s3stashfs left it: complete, unchecked
        db.execute("UPDATE objects SET verified=0, verified_by=NULL WHERE key='old.bam'")

    env = {**m.env, "S3STASHFS_ENDPOINT_URL": moto_server.url}
    moto_server.stop()
    try:
        r = cli_json(env, "cache", "verify", "--cache-dir", m.cache_dir)
        assert r["s3_error"] and r["s3_checked"] == 0
        assert r["against_s3"]["not_yet_verified"] == [{"bucket": bucket, "key": "old.bam"}]
        text = cli(env, "cache", "verify", "--cache-dir", m.cache_dir).stdout
        assert "not yet verified: " + f"{bucket}/old.bam" in text
        assert "could not check against S3" in text
    finally:
        moto_server.start()
    r = cli_json(env, "cache", "verify", "--cache-dir", m.cache_dir)
    assert r["s3_checked"] == 1 and r["s3_error"] is None
    assert r["against_s3"]["verified"] == {"md5": 1, "multipart-etag": 1}
    text = cli(env, "cache", "verify", "--cache-dir", m.cache_dir).stdout
    assert "against S3: 2 verified (1 MD5, 1 multipart ETag)" in text
    m.remount(extra_args=["--xattrs"])
    assert cache_state(m.path / "old.bam") == "complete, verified (multipart ETag)"
