"""Many readers at once (issue 10, items 4 and 5), through a real mount of moto behind
tests/proxy.py, which delays every request as a distant S3 would and counts the requests in
flight at once (``peak``):

- processes reading different cold files get a GET each in flight, side by side, not a few at a
  time (the store's worker threads per kind were 12 for data);
- sequential readers of different objects share one read-ahead budget: what they have asked
  for and not yet received never exceeds it (``status --json``, ``read_ahead``), and the
  daemon's peak RSS stays bounded.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import helpers
from conftest import S3STASHFS_BIN
from helpers import KiB, MiB

pytestmark = [pytest.mark.timeout(300)]


def status(m) -> dict:
    r = subprocess.run([str(S3STASHFS_BIN), "status", str(m.path), "--json"], env=m.env,
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def vm_hwm(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * KiB
    raise AssertionError(f"no VmHWM for pid {pid}")


def all_at_once(n: int, fn, items: list):
    """``fn(item)`` for every item, in ``n`` threads released together."""
    barrier = threading.Barrier(n)

    def one(item):
        barrier.wait(timeout=60)
        return fn(item)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, items))


READERS = 32  # programs opening a different small file each, at the same moment
IN_FLIGHT = 24  # GETs that must be seen in flight at once (12 before: the data threads)
DELAY = 1.0  # seconds the proxy holds each request: long enough for all to overlap


def test_cold_small_files_are_fetched_side_by_side(mount, s3, bucket, s3_proxy):
    data = {f"f{i:02d}": helpers.random_bytes(4 * KiB + i, seed=f"small{i}") for i in range(READERS)}
    for name, body in data.items():
        helpers.put_object(s3, bucket, f"many/{name}", body)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--metadata-ttl", "600"])
    # listed first, so that lookups are answered by the mount: the kernel sends the lookups
    # of one directory one at a time (test_load.py::test_lookups_in_one_directory_run_side_by_side)
    names = sorted(os.listdir(m.path / "many"))
    assert names == sorted(data)
    s3_proxy.delay = DELAY
    s3_proxy.reset_peak()
    got = all_at_once(READERS, lambda name: (m.path / "many" / name).read_bytes(), names)
    assert dict(zip(names, got)) == data
    peak = dict(s3_proxy.peak)
    print(f"requests in flight at once: {peak}")
    assert peak.get("GET", 0) >= IN_FLIGHT, peak
    assert not peak.get("HEAD") and not peak.get("LIST"), peak  # the listing answered for them


SEQ_READERS = 16
SEQ_SIZE = 4 * MiB
BUDGET = 4 * MiB  # a small budget: 16 readers of 4 MiB objects want far more read-ahead
RSS_LIMIT = 200 * MiB


def test_many_sequential_readers_share_the_budget(mount, s3, bucket, s3_proxy):
    data = {f"r{i:02d}.bin": helpers.random_bytes(SEQ_SIZE, seed=f"seq{i}") for i in range(SEQ_READERS)}
    for name, body in data.items():
        helpers.put_object(s3, bucket, f"seq/{name}", body)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url,
              extra_args=["--metadata-ttl", "600", "--read-ahead-memory", "4M"])
    names = sorted(os.listdir(m.path / "seq"))
    s3_proxy.delay = 0.05
    s3_proxy.reset_peak()

    def read(name: str) -> bytes:
        out = bytearray()
        with open(m.path / "seq" / name, "rb", buffering=0) as f:
            while chunk := f.read(128 * KiB):
                out += chunk
        return bytes(out)
    got = all_at_once(SEQ_READERS, read, names)
    assert dict(zip(names, got)) == data
    ra = status(m)["read_ahead"]
    print(f"read-ahead: {ra}; requests in flight at once: {dict(s3_proxy.peak)}")
    assert ra["limit"] == BUDGET
    assert 0 < ra["peak"] <= BUDGET, ra  # read ahead, and never more than the budget
    assert ra["outstanding"] == 0, ra  # every grant given back
    pid = m.read_pid()
    assert pid is not None
    assert vm_hwm(pid) <= RSS_LIMIT


def test_a_reader_alone_gets_its_whole_window(mount, s3, bucket, s3_proxy):
    """The default budget (64M) is MAX_WINDOW: one sequential reader is not cut to a share."""
    from s3stashfs.fetch import CHUNK
    body = helpers.random_bytes(32 * MiB, seed="alone")
    helpers.put_object(s3, bucket, "alone.bin", body)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    s3_proxy.delay = 0.05
    assert (m.path / "alone.bin").read_bytes() == body
    ra = status(m)["read_ahead"]
    print(f"read-ahead: {ra}")
    assert ra["limit"] == 64 * MiB
    assert CHUNK < ra["peak"] <= ra["limit"], ra  # more ahead than one GET: the window grew


def test_fuse_background_reads_are_raised_through_fusectl(tmp_path):
    """The kernel sends at most ``max_background`` (12) page-cache reads of one FUSE connection
    at once, whatever the daemon could serve: 32 programs reading the start of 32 large files had
    12 GETs in flight. The mount raises it through fusectl (when mounted, as root); fusectl names
    a connection by the device number of its mount."""
    from s3stashfs.mount import MAX_BACKGROUND, mounted_points, raise_background
    point, (_, dev) = next(iter(mounted_points().items()))  # stands for the mount
    major, minor = map(int, dev.split(":"))
    conn = tmp_path / "fusectl" / str((major << 20) | minor)
    conn.mkdir(parents=True)
    for name in ("max_background", "congestion_threshold"):
        (conn / name).write_text("12\n")
    raise_background(Path(point), fusectl=tmp_path / "fusectl")
    assert int((conn / "max_background").read_text()) == MAX_BACKGROUND
    assert 12 < int((conn / "congestion_threshold").read_text()) < MAX_BACKGROUND
    raise_background(Path(point), fusectl=tmp_path / "absent")  # no fusectl: the default stays
