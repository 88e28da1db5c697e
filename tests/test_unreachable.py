"""S3 unreachable in ways other than a stopped server: connections reset, or accepted and never
answered (a hung server), made by the loopback proxy in front of moto (tests/proxy.py). The
mount goes offline within seconds, serves its cache, fails the rest at once, and comes back by
itself; a download that stalls midway fails instead of hanging; throttling is not "offline"."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest

import helpers
from helpers import MiB

pytestmark = [pytest.mark.timeout(120), pytest.mark.expect_log("unreachable")]

CONNECT_TIMEOUT = 2.0  # store.Timeouts defaults: connecting, and an on-demand probe, wait this long
META_TIMEOUT = 5.0  # ...a HEAD or LIST this long for an answer
DATA_TIMEOUT = 10.0  # ...and a download this long between two pieces of its body


def fails_enetunreach(fn) -> float:
    """Call ``fn``: it must fail with ENETUNREACH. Returns how long it took."""
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.ENETUNREACH, e.value
    return time.monotonic() - t


@pytest.mark.parametrize("mode,bound,at_once", [
    # refused at once: two quick retries, then offline; an on-demand probe is refused at once
    ("reset", 2.0, 2.0),
    # no answer: one metadata timeout, no retry; then a request may wait for an on-demand
    # probe, which gives up after the connect timeout
    ("blackhole", META_TIMEOUT + 2.0, CONNECT_TIMEOUT + 1.0),
])
def test_unreachable_server_goes_offline_within_seconds_and_back(mode, bound, at_once, mount, s3,
                                                                  bucket, s3_proxy):
    small = helpers.put_object(s3, bucket, "a.txt", b"cached small\n")
    big = helpers.put_random_object(s3, bucket, "big.bin", 3 * MiB + 7)
    helpers.put_object(s3, bucket, "sub/c.txt", b"c\n")
    helpers.put_object(s3, bucket, "other/d.txt", b"d\n")
    for i in range(6):
        helpers.put_object(s3, bucket, f"u{i}.txt", f"uncached {i}\n".encode())
    # --metadata-ttl 0: every open asks S3 (a HEAD), so the first read after the switch
    # meets the dead server at once instead of trusting a fresh listing
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--metadata-ttl", "0"])
    assert (m.path / "a.txt").read_bytes() == small.data
    assert helpers.md5_file(m.path / "big.bin") == big.md5
    assert (m.path / "sub" / "c.txt").read_bytes() == b"c\n"
    names = sorted(os.listdir(m.path))

    s3_proxy.set_mode(mode)
    # the first read that needs S3 finds it unreachable, within the bound: the mount is offline
    took = fails_enetunreach(lambda: (m.path / "u0.txt").read_bytes())
    assert took < bound, f"{mode}: offline only after {took:.1f} s"
    offline_at = time.monotonic()
    # stays offline while S3 does not answer (for a hung server: after a probe has timed out,
    # 0.5 s + META_TIMEOUT after going offline), and everything needing S3 fails at once (or
    # after the on-demand probe it waits for)
    i = 1
    while True:
        assert fails_enetunreach(lambda: (m.path / f"u{i % 6}.txt").read_bytes()) < at_once
        assert fails_enetunreach(lambda: os.listdir(m.path / "other")) < at_once
        assert fails_enetunreach(lambda: os.stat(m.path / "never-heard-of")) < at_once
        # cached files read byte for byte; known directories list
        assert (m.path / "a.txt").read_bytes() == small.data
        assert helpers.md5_file(m.path / "big.bin") == big.md5
        assert sorted(os.listdir(m.path)) == names
        assert os.listdir(m.path / "sub") == ["c.txt"]
        assert (m.path / "sub" / "c.txt").read_bytes() == b"c\n"
        i += 1
        if mode != "blackhole" or time.monotonic() - offline_at > META_TIMEOUT + 1.5:
            break

    s3_proxy.set_mode("pass")
    # back online by itself, without a remount
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "u3.txt") == b"uncached 3\n",
                     timeout=30, message="the mount to come back online")
    assert os.listdir(m.path / "other") == ["d.txt"]


def test_a_download_that_stalls_midway_fails_within_the_data_timeout(mount, s3, bucket, s3_proxy):
    """The server goes silent in the middle of a download, for every connection: the stalled
    body alone would be retried (S3 had answered; test_faults.py), but the GETs waiting for an
    answer meanwhile find it hung, and the mount goes offline within the data timeout."""
    big = helpers.put_random_object(s3, bucket, "big.bin", 24 * MiB + 5)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    start = 2 * MiB
    with open(m.path / "big.bin", "rb", buffering=0) as f:
        assert f.read(start) == big.data[:start]  # these bytes are cached
        s3_proxy.blackhole_after(3 * MiB)  # S3 goes silent in the middle of an answer
        got = bytearray()
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            while True:
                chunk = f.read(MiB)
                assert chunk, "read to the end through a black hole"
                got += chunk
        took = time.monotonic() - t
    assert e.value.errno == errno.ENETUNREACH, e.value
    assert s3_proxy.mode == "blackhole"
    assert took < DATA_TIMEOUT + 4, f"the stalled read failed only after {took:.1f} s"
    assert got == big.data[start:start + len(got)]  # what was served was right
    # offline now: what is cached still reads, byte for byte; the rest fails at once
    upto = start + len(got)
    assert helpers.read_range(m.path / "big.bin", 0, upto) == big.data[:upto]
    assert fails_enetunreach(lambda: helpers.read_range(m.path / "big.bin", 20 * MiB, MiB)) < 2.0
    s3_proxy.set_mode("pass")
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "big.bin") == big.data,
                     timeout=30, message="the whole object to read once back online")


def test_a_read_waiting_on_a_hung_download_stops_when_the_mount_goes_offline(mount, s3, bucket,
                                                                             s3_proxy):
    """A read waits for a GET (data timeout, 10 s); meanwhile a lookup (metadata timeout, 5 s)
    finds S3 not answering: the read fails then, without waiting out its own timeout."""
    big = helpers.put_random_object(s3, bucket, "big.bin", 8 * MiB)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--metadata-ttl", "0"])
    with open(m.path / "big.bin", "rb", buffering=0) as f:
        s3_proxy.set_mode("blackhole")
        result: list = []

        def read():
            t = time.monotonic()
            try:
                os.pread(f.fileno(), 4096, 4 * MiB)
                result.append(("read", time.monotonic() - t))
            except OSError as e:
                result.append((e.errno, time.monotonic() - t))
        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert fails_enetunreach(lambda: os.stat(m.path / "unknown")) < META_TIMEOUT + 2
        finally:
            reader.join(DATA_TIMEOUT + 5)
    assert result and result[0][0] == errno.ENETUNREACH, result
    assert result[0][1] < META_TIMEOUT + 2, f"the read waited {result[0][1]:.1f} s"
    s3_proxy.set_mode("pass")
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "big.bin") == big.data,
                     timeout=30, message="the mount to come back online")


@pytest.mark.expect_log(r"SlowDown|: 503$")  # a HEAD answer has no body to name it
def test_throttling_is_not_offline(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "a.txt", b"cached\n")
    helpers.put_object(s3, bucket, "b.txt", b"not yet\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--metadata-ttl", "0"])
    assert (m.path / "a.txt").read_bytes() == b"cached\n"
    s3_proxy.set_mode("slowdown")  # every request answered 503 SlowDown
    with pytest.raises(OSError) as e:
        (m.path / "b.txt").read_bytes()
    assert e.value.errno == errno.EIO, e.value  # throttled after retries, not ENETUNREACH
    s3_proxy.set_mode("pass")
    # never went offline: the next read goes to S3 at once, no probe to wait for
    assert (m.path / "b.txt").read_bytes() == b"not yet\n"
    assert "unreachable" not in m.log_text()  # "S3 is unreachable (...): offline, ..."
