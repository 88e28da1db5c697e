"""Crash safety, tested: the mount kills itself with SIGKILL at a named point of its uploads,
downloads, catalog updates, eviction or journal (the test hook ``S3STASHFS_CRASH_AT=NAME:N``,
s3stashfs/crashpoints.py), is mounted again on the same cache directory without the hook, and
synced. Then:

- the kill happened at the named point: the daemon is gone, and its log holds the hook's line
  for that point and no other (a point never reached fails the test);
- every file whose close returned was in S3 with its bytes at the kill, and still is;
- every file whose writes returned is in S3 with exactly those bytes once synced, whether or
  not its close returned ("no write is ever lost"); a write cut by the kill may have landed in
  part, as a prefix; a file whose create never returned is absent or empty;
- nothing else is in S3 (no conflict copy of an upload that a crash kept from being
  recorded), and the sync reports nothing failed and no conflict;
- ``cache verify`` finds no block that does not match its sum, and every object the cache
  holds reads through the new mount as S3's bytes; the remount's log has no warning.

Each point is its own test (a mount, a kill, a remount) running one workload that passes
through every point; the list is fixed, and holds more than 30 points.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

import helpers
from helpers import KiB, MiB
from s3stashfs import control

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.expect_log(r"crash point .* reached", "over its limits")]

ENV = {"S3STASHFS_MULTIPART_THRESHOLD_MB": "5", "S3STASHFS_PART_SIZE_MB": "5"}
CAP = 4 * MiB  # the workload reads and writes more than this: eviction runs
ARGS = ("--cache-max-size", str(CAP), "--cache-min-free", "0")
DEATH_TIMEOUT = 20.0  # background points (sync, eviction) come within a few seconds

# Objects in S3 before the mount: read cold (whole, whole with sums, ranged sequential, ranged
# random), and one changed in place. name -> (size, part size of a multipart upload or None)
SEEDED = {
    "r/small.bin": (300 * KiB, None),  # one GET, checked against its MD5 ETag
    "r/mp-small.bin": (700 * KiB, 5 * MiB),  # one GET, an ETag "-1": block sums
    "r/seq.bin": (2 * MiB, None),  # read front to back: ranged GETs, read-ahead
    "r/rand.bin": (2 * MiB, None),  # a few random reads: one block each
    "w/old.bin": (200 * KiB, None),  # changed in place through the mount
}

# (name, n): the daemon kills itself the nth time it passes crashpoints.hit(name).
POINTS = [
    # downloads: whole GETs (checked by MD5, or summed by block), ranged GETs piece by piece
    ("fetch.whole_written", 1), ("fetch.whole_written", 2),
    ("fetch.piece_written", 1), ("fetch.piece_summed", 3), ("fetch.piece_written", 6),
    # writes into the cache, before their close
    ("cache.local_created", 1), ("write.received", 3), ("write.done", 2),
    ("write.received", 12), ("write.done", 25),
    # one PUT each, and what follows every upload
    ("upload.before_put", 1),
    ("upload.sent", 1), ("upload.sent", 2), ("upload.sent", 3), ("upload.sent", 4),
    ("upload.journal_forgotten", 1), ("upload.journal_forgotten", 3),
    # multipart: a part sent while the file is written, the others at close
    ("upload.stream_created", 1), ("upload.stream_part_sent", 1),
    ("upload.multipart_created", 1), ("upload.part_sent", 1), ("upload.part_sent", 3),
    ("upload.before_complete", 1), ("upload.completed", 1), ("upload.completed", 2),
    # the catalog: fsync'ed but not recorded, inside and after its transactions
    ("cache.sync_one_fsynced", 1), ("cache.sync_one_fsynced", 2),
    ("cache.sync_fsynced", 1), ("cache.sync_recorded", 1), ("catalog.state_uncommitted", 1),
    ("catalog.journal_uncommitted", 1), ("catalog.journal_uncommitted", 2),
    # eviction: blocks forgotten, file not yet deleted
    ("cache.evict_dropped", 1), ("cache.evict_dropped", 2),
]
# Changes queued offline, applied once S3 answers: the upload, the mkdir, the delete.
QUEUE_POINTS = [("upload.sent", 1), ("journal.applied", 1), ("journal.applied", 2)]


def s3_bytes(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


class Killed(Exception):
    """The daemon died under the workload (a call on the mount failed, the PID is gone)."""


@dataclass
class Written:
    """What the workload did to one file, as its caller saw it."""

    key: str
    before: bytes | None  # S3's bytes before (None: no object)
    opened: bool = False  # open/create returned
    data: bytearray = field(default_factory=bytearray)  # after every write that returned
    cut: tuple[int, bytes] | None = None  # the write the kill cut: (offset, bytes)
    closed: bool = False  # close returned 0

    def check(self, got: bytes | None) -> None:
        """``got``: S3's bytes after the remount and sync (None: no object)."""
        if not self.opened:
            ok = got == self.before or (self.before is None and got == b"")
            assert ok, f"{self.key}: open cut by the kill, S3 has {describe(got)}"
            return
        assert got is not None, f"{self.key}: its writes returned, but it is not in S3"
        want = bytes(self.data)
        if self.cut is not None:  # any prefix of the cut write may have landed
            off, buf = self.cut
            region = got[off:off + len(buf)]
            k = next((i for i, (a, b) in enumerate(zip(region, buf)) if a != b),
                     min(len(region), len(buf)))
            if k:
                want = bytearray(want).ljust(off, b"\0")
                want[off:off + k] = buf[:k]
                want = bytes(want)
        assert got == want, (f"{self.key}: S3 has {describe(got)}, want {describe(want)} "
                             f"(close {'returned' if self.closed else 'cut by the kill'})")


def describe(b: bytes | None) -> str:
    return "no object" if b is None else f"{len(b)} bytes, MD5 {helpers.md5_hex(b)}"


class Workload:
    """Reads and writes through the mount until the daemon dies. Every call on the mount is
    recorded as it returned; a failure with the daemon gone raises Killed."""

    def __init__(self, m, seeded: dict[str, bytes]):
        self.m = m
        self.pid = m.pid
        self.seeded = seeded
        self.files: dict[str, Written] = {}
        self.fds: list[int] = []  # left open by a kill: closed before the remount

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNABORTED) or not helpers.pid_alive(self.pid):
                raise Killed(f"{fn.__name__}: {e}") from e
            raise

    def read_all(self, key: str, chunk: int = 128 * KiB) -> None:
        fd = self._call(os.open, self.m.path / key, os.O_RDONLY)
        self.fds.append(fd)
        got = bytearray()
        while b := self._call(os.read, fd, chunk):
            got += b
        assert got == self.seeded[key], key
        self._close(fd)

    def read_at(self, key: str, offsets: list[int], n: int = 4 * KiB) -> None:
        fd = self._call(os.open, self.m.path / key, os.O_RDONLY)
        self.fds.append(fd)
        for off in offsets:
            assert self._call(os.pread, fd, n, off) == self.seeded[key][off:off + n], (key, off)
        self._close(fd)

    def _close(self, fd: int) -> None:
        self.fds.remove(fd)
        self._call(os.close, fd)

    def create(self, key: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC) -> int:
        w = self.files[key] = Written(key, self.seeded.get(key))
        fd = self._call(os.open, self.m.path / key, flags, 0o644)
        self.fds.append(fd)
        w.opened = True
        if not flags & os.O_TRUNC and w.before is not None:
            w.data = bytearray(w.before)
        return fd

    def write(self, key: str, fd: int, off: int, buf: bytes) -> None:
        w = self.files[key]
        w.cut = (off, buf)
        n = self._call(os.pwrite, fd, buf, off)
        w.data[len(w.data):off] = bytes(max(0, off - len(w.data)))
        w.data[off:off + n] = buf[:n]
        w.cut = None
        if n < len(buf):  # the kernel sent it in pieces, and the daemon died after the first
            w.cut = (off + n, buf[n:])
            helpers.wait_for(lambda: not helpers.pid_alive(self.pid), timeout=5,
                             message=f"the daemon to be gone after a short write ({n} bytes)")
            raise Killed(f"pwrite: {n} of {len(buf)} bytes")

    def close(self, key: str, fd: int) -> None:
        self._close(fd)
        self.files[key].closed = True

    def run(self) -> None:
        m = self.m
        os.makedirs(m.path / "w", exist_ok=True)  # a prefix: no S3 call
        # cold reads: whole objects (with and without block sums), ranged, random
        self.read_all("r/small.bin")
        self.read_all("r/mp-small.bin")
        self.read_all("r/seq.bin")
        self.read_at("r/rand.bin", [0, 3 * KiB + 5, 1 * MiB + 77 * KiB, 2 * MiB - 4 * KiB])
        # a file written and left open: its close is cut by the kill
        held = self.create("w/open.txt")
        for i in range(2):
            self.write("w/open.txt", held, i * 10 * KiB, helpers.random_bytes(10 * KiB, f"o{i}"))
        # small files: one PUT each
        fd = self.create("w/small.txt")
        for i in range(3):
            self.write("w/small.txt", fd, i * 10 * KiB, helpers.random_bytes(10 * KiB, f"s{i}"))
        self.close("w/small.txt", fd)
        fd = self.create("w/old.bin", os.O_RDWR)  # a cached version becomes a local change
        self.write("w/old.bin", fd, 100 * KiB, helpers.random_bytes(4 * KiB, "patch"))
        self.close("w/old.bin", fd)
        # multipart: written front to back (parts go up while it is written) ...
        fd = self.create("w/stream.bin")
        for i in range(6):
            self.write("w/stream.bin", fd, i * MiB, helpers.random_bytes(MiB, f"m{i}"))
        self.close("w/stream.bin", fd)
        # ... and not (all parts at close)
        fd = self.create("w/scatter.bin")
        self.write("w/scatter.bin", fd, 5 * MiB, helpers.random_bytes(MiB, "x5"))
        for i in range(5):
            self.write("w/scatter.bin", fd, i * MiB, helpers.random_bytes(MiB, f"x{i}"))
        self.close("w/scatter.bin", fd)
        fd = self.create("w/last.txt")
        self.write("w/last.txt", fd, 0, b"the last file\n")
        self.close("w/last.txt", fd)
        # more cold reads, now that the cache is over its cap
        self.read_all("r/seq.bin")
        self.read_all("r/small.bin")

    def close_all(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass  # the daemon is gone
        self.fds = []


def seed(s3, bucket) -> dict[str, bytes]:
    out = {}
    for key, (size, part) in SEEDED.items():
        data = helpers.random_bytes(size, key)
        if part is None:
            helpers.put_object(s3, bucket, key, data)
        else:
            helpers.put_multipart_object(s3, bucket, key, data, part_size=part)
        out[key] = data
    return out


def wait_killed(m, name: str, n: int) -> None:
    """The daemon is gone, and it died at the named point: the hook's line is in its log, for
    that point only, and the daemon logged no clean exit after it."""
    pid = m.pid
    helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=DEATH_TIMEOUT,
                     message=lambda: f"the daemon to die at crash point {name}:{n} (never "
                     f"reached?); log tail:\n{helpers.tail(m.log_file)}")
    text = m.log_file.read_text(errors="replace")
    hook = re.findall(r"crash point (\S+) reached: SIGKILL", text)
    assert hook == [f"{name}:{n}"] and "unmounted" not in text.rpartition("crash point")[2], (
        f"the daemon died, but not at {name}:{n}; log tail:\n{helpers.tail(m.log_file)}")


def unmount_dead(m) -> None:
    """The kernel keeps a killed daemon's mount (every call on it fails with ENOTCONN) until it
    is unmounted; nothing of ours holds a file open on it any more."""
    r = helpers.run(["fusermount3", "-u", str(m.path)], timeout=30)
    assert r.returncode == 0, r
    helpers.wait_for(lambda: not m.is_mounted(), timeout=10, message="the dead mount to go")
    m.mounted = False


def check_closed(s3, bucket, files: dict[str, Written]) -> None:
    """At the kill: what close() reported as uploaded is in S3."""
    for key, w in files.items():
        if w.closed:
            assert s3_bytes(s3, bucket, key) == w.data, f"{key}: close returned, not in S3"


def cached_keys(m, bucket) -> list[str]:
    db = sqlite3.connect(f"file:{m.cache_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        return [k for (k,) in db.execute("SELECT key FROM objects WHERE bucket=? AND "
                                         "(held > 0 OR dirty = 1) ORDER BY key", (bucket,))]
    finally:
        db.close()


def recover_and_check(m, s3, bucket, seeded: dict[str, bytes], files: dict[str, Written],
                      removed: set[str] = frozenset(), markers: set[str] = frozenset(),
                      use_cli: bool = False) -> None:
    """Mount again without the hook, sync, and check S3 and the cache."""
    unmount_dead(m)
    m.remount(env={"S3STASHFS_CRASH_AT": None})
    if use_cli:  # the commands, with their exit codes (0: all done, nothing to look at)
        r = cli(m, "sync", "--json", m.path)
        assert r.returncode == 0, r
        synced = json.loads(r.stdout)
        r = cli(m, "cache", "verify", "--json", m.path)
        assert r.returncode == 0, r
        verified = json.loads(r.stdout)
    else:  # what they ask the mount, without starting a process each
        synced = control.request(m.cache_dir, {"cmd": "sync"})
        verified = control.request(m.cache_dir, {"cmd": "verify"})
    assert not synced["failed"] and not synced["conflicts"], synced

    have = set(helpers.list_keys(s3, bucket))
    for key, w in files.items():
        w.check(s3_bytes(s3, bucket, key) if key in have else None)
    for key, data in seeded.items():
        if key not in files and key not in removed:
            assert key in have and s3_bytes(s3, bucket, key) == data, key
    allowed = set(seeded) - removed | set(files) | markers
    assert have <= allowed, f"unexpected objects in S3: {sorted(have - allowed)}"
    assert markers <= have, f"not in S3: {sorted(markers - have)}"
    assert not have & removed, f"still in S3: {sorted(have & removed)}"

    assert verified["bad_blocks"] == 0, verified
    for key in cached_keys(m, bucket):  # the new mount serves S3's bytes from its cache
        if not key.endswith("/"):
            assert (m.path / key).read_bytes() == s3_bytes(s3, bucket, key), key


def cli(m, *args, timeout=120):
    return m.factory._run_cli([str(a) for a in args], m.env, timeout)


def point_id(p):
    return f"{p[0]}:{p[1]}"


@pytest.mark.parametrize("point", POINTS, ids=point_id)
def test_kill_9_at(point, mount, s3, bucket):
    name, n = point
    seeded = seed(s3, bucket)
    m = mount(bucket=bucket, extra_args=ARGS, env={**ENV, "S3STASHFS_CRASH_AT": f"{name}:{n}"})
    work = Workload(m, seeded)
    try:
        try:
            work.run()
        except Killed:
            pass
        # the workload may be done before the point comes (a sync, an eviction): w/open.txt
        # stays open meanwhile, so that its close is cut by the kill
        wait_killed(m, name, n)
    finally:
        work.close_all()
    check_closed(s3, bucket, work.files)
    recover_and_check(m, s3, bucket, seeded, work.files)


QUEUE = ("--metadata-ttl", "0", "--offline-writes", "queue")


@pytest.mark.expect_log("unreachable", "upload of .* failed")
@pytest.mark.parametrize("point", QUEUE_POINTS, ids=point_id)
def test_kill_9_while_applying_changes_queued_offline(point, mount, s3, bucket, s3_proxy):
    """Changes made offline (queue mode) are applied once S3 answers: a kill between S3's
    answer and the journal's record of it neither loses nor repeats one."""
    name, n = point
    seeded = {"q/keep.txt": b"kept\n", "q/old.txt": b"deleted offline\n"}
    for key, data in seeded.items():
        helpers.put_object(s3, bucket, key, data)
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url,
              env={"S3STASHFS_CRASH_AT": f"{name}:{n}"})
    work = Workload(m, seeded)
    work.read_all("q/keep.txt")
    work.read_all("q/old.txt")
    helpers.cut_off(m, s3_proxy)
    fd = work.create("q/new.txt")
    work.write("q/new.txt", fd, 0, b"written offline\n")
    work.close("q/new.txt", fd)
    os.mkdir(m.path / "q" / "dir")
    os.unlink(m.path / "q" / "old.txt")
    s3_proxy.set_mode("pass")
    # a lookup of a name never seen makes the mount probe S3 now instead of after its backoff;
    # back online, it applies the queued changes in order, and dies at the point
    def gone():
        try:
            os.stat(m.path / f".never-there-{time.monotonic_ns()}")
        except OSError:
            pass
        return not helpers.pid_alive(m.pid)
    helpers.wait_for(gone, timeout=DEATH_TIMEOUT, interval=0.2,
                     message=lambda: f"the daemon to die at crash point {name}:{n}; log "
                     f"tail:\n{helpers.tail(m.log_file)}")
    wait_killed(m, name, n)
    work.close_all()
    recover_and_check(m, s3, bucket, seeded, work.files, removed={"q/old.txt"},
                      markers={"q/dir/"}, use_cli=True)


def test_the_hook_kills_at_the_nth_hit_from_any_thread_and_costs_nothing_unarmed(tmp_path):
    """The hook itself: unarmed, hit() does nothing; armed NAME:N, the Nth hit among several
    threads (and no earlier one) kills the process with SIGKILL, after its log line."""
    log = tmp_path / "hook.log"
    prog = f"""
import logging, threading
from s3stashfs import crashpoints
logging.basicConfig(filename={str(log)!r}, level=logging.INFO)
crashpoints.hit("p")  # not armed yet
crashpoints.arm({{"S3STASHFS_CRASH_AT": "p:250"}})
done = []
def run():
    for _ in range(100):
        crashpoints.hit("other")
        crashpoints.hit("p")
        done.append(1)
threads = [threading.Thread(target=run) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print("survived")
"""
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r
    assert "survived" not in r.stdout
    assert re.findall(r"crash point (\S+) reached", log.read_text()) == ["p:250"]
