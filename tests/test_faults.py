"""A server that answers is not offline. Faults are injected per request by the HTTP-aware proxy
in front of moto (tests/proxy.py): 500 InternalError, 503 SlowDown, a body reset or cut short
midway, a body trickled, a body that stalls past the data timeout, an answer lost after S3 acted
on the request. Each is retried, then reported to that request alone (EIO), never as
"unreachable"; the mount stays online; a reader gets S3's bytes or an error, never short or
wrong data; and every closed write reaches S3, byte for byte, once the faults stop.

Then back online on demand: offline, a request that needs S3 probes at once, so the first one
after the network returns is served; a burst of requests against a hung server shares one probe.
"""
from __future__ import annotations

import concurrent.futures
import errno
import os
import random
import subprocess
import threading
import time

import pytest

import helpers
from conftest import S3STASHFS_BIN
from helpers import KiB, MiB
from proxy import Fault

pytestmark = [pytest.mark.timeout(120)]

# Everything a fault makes the mount log is expected, but never that S3 is unreachable (the
# mount going offline) and never a traceback: the teardown fails the test on those.
ANSWERED_ONLY = r"\A(?![\s\S]*(Traceback|unreachable|unexpected))[\s\S]*(WARNING|ERROR)"
# --timeout for tests of stalls: a body stalls 6 s (the data timeout), a listing's 3 s (meta);
# shorter, a busy moto (two cores, dozens of requests at once) looks hung
STALL_TIMEOUT = "3"
CONNECT_TIMEOUT = 2.0  # store.Timeouts default: an on-demand probe waits this long at most
RECHECK_AFTER = 1.0  # connectivity.RECHECK_AFTER

# fault name -> (Fault arguments, extra mount arguments)
BODY_FAULTS = {
    "500": (dict(kind="500"), []),
    "503": (dict(kind="503"), []),
    "reset": (dict(kind="reset", at=0.5), []),
    "cut": (dict(kind="cut", at=0.3), []),
    "stall": (dict(kind="hold", at=0.5), ["--timeout", STALL_TIMEOUT]),
    "trickle": (dict(kind="trickle", piece=128 * KiB, pause=0.01), []),
}


def gets_of(*keys: str):
    """A Fault predicate: GETs of these keys (ranged or whole)."""
    paths = tuple("/" + k for k in keys)
    return lambda method, path, headers: method == "GET" and path.split("?")[0].endswith(paths)


def status_code(m) -> int:
    return subprocess.run([str(S3STASHFS_BIN), "status", str(m.path)], env=m.env,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL).returncode


def assert_online(m) -> None:
    """The mount never went offline: status says online, and the log never said unreachable."""
    assert status_code(m) == 0, "s3stashfs status: not online"
    assert "unreachable" not in m.log_text(), "the mount went offline for a server that answered"


def fault_mount(mount, bucket, s3_proxy, extra=(), env=None):
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=list(extra), env=env)
    m.expect_log(ANSWERED_ONLY)
    return m


def read_all(path, piece: int = MiB) -> bytes:
    got = bytearray()
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(piece)
            if not chunk:
                return bytes(got)
            got += chunk


def fails_eio(fn) -> None:
    """``fn`` fails with EIO: a clean error, never ENETUNREACH for a server that answered."""
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.EIO, e.value


def read_until_error(path, data: bytes) -> bytes:
    """Read ``path`` front to back; it must fail with EIO, and what it served before must be
    the object's first bytes (never short or wrong data presented as success)."""
    got = bytearray()
    with open(path, "rb", buffering=0) as f:
        with pytest.raises(OSError) as e:
            while True:
                chunk = f.read(MiB)
                assert chunk, "the read reached the end despite the faults"
                got += chunk
    assert e.value.errno == errno.EIO, e.value
    assert bytes(got) == data[:len(got)]
    return bytes(got)


def offsets(size: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, size - 4 * KiB) for _ in range(n)]


def s3_keys(s3, bucket) -> list[str]:
    return helpers.list_keys(s3, bucket)


def s3_has(s3, bucket, key, data: bytes) -> bool:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    except Exception:  # noqa: BLE001 - not there yet
        return False


# ------------------------------------------------------------------------------ reads
def in_parallel(*fns) -> None:
    """Run the functions at once (each fault's retries take seconds); re-raise the first
    failure."""
    with concurrent.futures.ThreadPoolExecutor(len(fns)) as pool:
        for fut in [pool.submit(fn) for fn in fns]:
            fut.result()


def test_reads_under_faults_get_s3s_bytes_or_eio_and_the_mount_stays_online(
        mount, s3, bucket, s3_proxy):
    """Sequential reads (front to back, with read-ahead), random ones (pread at scattered
    offsets) and small objects (fetched whole, checked by MD5 before any byte is served), under
    each fault. Faults that pass are retried (a broken-off ranged GET resumes where it got to;
    a whole GET starts again) and the bytes are S3's. Faults that persist give those reads EIO,
    while other files still read and writes still go up. Once the faults stop, everything
    reads byte for byte. The mount never goes offline."""
    size, small = 1536 * KiB + 123, 700 * KiB
    uses = ("seq", "rand", "small", "seq2", "rand2", "small2")
    keys = [f"{name}-{use}.bin" for name in BODY_FAULTS for use in uses]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        objs = dict(zip(keys, pool.map(lambda k: helpers.put_random_object(
            s3, bucket, k, small if "small" in k else size, seed=k).data, keys)))
    helpers.put_object(s3, bucket, "other.bin", b"other\n")
    # names and versions from one listing, trusted for the test: only GETs meet the faults
    m = fault_mount(mount, bucket, s3_proxy, ["--timeout", STALL_TIMEOUT, "--metadata-ttl", "600"])
    assert len(os.listdir(m.path)) == len(keys) + 1

    def sequential(key: str) -> None:
        assert read_all(m.path / key) == objs[key], key

    def whole(key: str) -> None:
        assert (m.path / key).read_bytes() == objs[key], key

    def scattered(key: str) -> None:
        with open(m.path / key, "rb", buffering=0) as fh:
            for off in offsets(size, 12, seed=key):
                assert os.pread(fh.fileno(), 4 * KiB, off) == objs[key][off:off + 4 * KiB], key

    def random_fails(key: str) -> None:
        with open(m.path / key, "rb", buffering=0) as fh:
            off = offsets(size, 1, seed=key)[0]
            fails_eio(lambda: os.pread(fh.fileno(), 4 * KiB, off))

    # passing faults, each on the first GETs of its own two files (one GET for a stall: a
    # second one of the same range would be its last try), all at once
    faults = {(name, use): s3_proxy.inject(Fault(**args, count=1 if name == "stall" else 2,
                                                 when=gets_of(f"{name}-{use}.bin")))
              for name, (args, _) in BODY_FAULTS.items() for use in ("seq", "rand", "small")}
    in_parallel(*[lambda n=name: sequential(f"{n}-seq.bin") for name in BODY_FAULTS],
                *[lambda n=name: scattered(f"{n}-rand.bin") for name in BODY_FAULTS],
                *[lambda n=name: whole(f"{n}-small.bin") for name in BODY_FAULTS])
    assert [k for k, f in faults.items() if f.injected < 1] == []
    s3_proxy.clear()
    # faults that persist (a slow body within the timeout is no failure: not trickle): those
    # reads fail, cleanly, and the mount goes on
    failing = [name for name in BODY_FAULTS if name != "trickle"]
    faults = {name: s3_proxy.inject(Fault(**BODY_FAULTS[name][0], when=gets_of(
        f"{name}-seq2.bin", f"{name}-rand2.bin", f"{name}-small2.bin"))) for name in failing}
    in_parallel(*[lambda n=name: read_until_error(m.path / f"{n}-seq2.bin", objs[f"{n}-seq2.bin"])
                  for name in failing],
                *[lambda n=name: random_fails(f"{n}-rand2.bin") for name in failing],
                *[lambda n=name: fails_eio(lambda: (m.path / f"{n}-small2.bin").read_bytes())
                  for name in failing])
    assert [n for n, f in faults.items() if f.injected < 3] == []
    assert (m.path / "other.bin").read_bytes() == b"other\n"  # other files still read
    (m.path / "new.txt").write_bytes(b"written meanwhile\n")  # writes go up (close: 0)
    assert s3_has(s3, bucket, "new.txt", b"written meanwhile\n")
    assert "unreachable" not in m.log_text(), "the mount went offline"
    s3_proxy.clear()
    in_parallel(*[lambda n=name: sequential(f"{n}-seq2.bin") for name in failing],
                *[lambda n=name: scattered(f"{n}-rand2.bin") for name in failing],
                *[lambda n=name: whole(f"{n}-small2.bin") for name in failing])
    assert_online(m)


# ------------------------------------------------------------------------------ writes
WRITE_FAULTS = {
    "500": dict(kind="500"),
    "503": dict(kind="503"),
    "drop": dict(kind="drop"),  # S3 did it; its answer is lost: the retry meets its own success
    "reset": dict(kind="reset", at=0.5),  # only answers with a body: a multipart completion
}
SIZES = {"small": 150 * KiB, "multipart": 11 * MiB + 7}  # threshold and parts: 5 MiB


def upload_of(key: str, size_kind: str, fault: str):
    """A Fault predicate for the requests uploading ``key``: its PUT; or its multipart
    upload's parts (PUT ?partNumber=&uploadId=) and completion (POST ?uploadId=), only the
    completion for a lost or broken answer (a part's answer has no body, and a lost one is
    simply sent again)."""
    def when(method: str, path: str, headers) -> bool:
        if not path.split("?")[0].endswith("/" + key):
            return False
        if size_kind == "small":
            return method == "PUT" and "uploadId=" not in path
        if fault in ("drop", "reset"):
            return method == "POST" and "uploadId=" in path
        return "uploadId=" in path
    return when


def write_file(path, data: bytes) -> None:
    """Write front to back in 1 MiB writes (so a large file's parts go up while it is written)
    and close: close() raises if the upload failed."""
    with open(path, "wb") as fh:
        for i in range(0, len(data), MiB):
            fh.write(data[i:i + MiB])


def test_writes_under_faults_reach_s3_once_and_the_mount_stays_online(mount, s3, bucket,
                                                                      s3_proxy):
    """Uploads, one PUT or a multipart upload (above the threshold), of new files (If-None-Match:
    *) and of changed ones (If-Match), under each fault. Passing faults are retried and close()
    returns 0 once S3 has the bytes; an answer lost after S3 took the change is no conflict (the
    retry's failed condition is found to be our own success: no conflict copy). Faults that
    persist make close() fail with EIO; the file stays dirty and reaches S3 once they stop. The
    mount never goes offline."""
    env = {"S3STASHFS_MULTIPART_THRESHOLD_MB": "5", "S3STASHFS_PART_SIZE_MB": "5"}
    combos = [(n, k) for n in WRITE_FAULTS for k in SIZES if not (n == "reset" and k == "small")]
    for name, size_kind in combos:
        helpers.put_object(s3, bucket, f"{name}-{size_kind}-old.bin", b"the version before\n")
    m = fault_mount(mount, bucket, s3_proxy, env=env)
    datas = {f"{n}-{k}-{use}.bin": helpers.random_bytes(SIZES[k], seed=f"{n}{k}{use}")
             for n, k in combos for use in ("new", "old", "later")}

    faults = {}
    for name, size_kind in combos:
        for use in ("new", "old"):
            key = f"{name}-{size_kind}-{use}.bin"
            faults[key] = s3_proxy.inject(Fault(**WRITE_FAULTS[name], count=2,
                                                when=upload_of(key, size_kind, name)))
    keys = list(faults)
    in_parallel(*[lambda k=key: write_file(m.path / k, datas[k]) for key in keys])
    # every close() returned 0: S3 has exactly these bytes, after faults that really happened
    assert [k for k in keys if faults[k].injected < 1] == []
    assert [k for k in keys if not s3_has(s3, bucket, k, datas[k])] == []
    for name, size_kind in combos:
        etag = s3.head_object(Bucket=bucket, Key=f"{name}-{size_kind}-new.bin")["ETag"]
        assert etag.strip('"').endswith("-3") == (size_kind == "multipart"), etag
    assert not [k for k in s3_keys(s3, bucket) if ".conflict-" in k], "a bogus conflict copy"
    assert m.log_text().count("conflict: s3://") == 0
    assert "unreachable" not in m.log_text(), "the mount went offline"
    s3_proxy.clear()

    # faults that persist (S3 answers an error every time; a lost or broken answer every time
    # is no answer at all, see test_unreachable.py): close() fails with EIO, the bytes stay
    later = [f"{n}-{k}-later.bin" for n, k in combos if n in ("500", "503")]
    for key in later:
        name, size_kind = key.split("-")[:2]
        s3_proxy.inject(Fault(**WRITE_FAULTS[name], when=upload_of(key, size_kind, name)))

    def fails(key: str) -> None:
        fh = open(m.path / key, "wb")
        fh.write(datas[key])
        fails_eio(fh.close)
    in_parallel(*[lambda k=key: fails(k) for key in later])
    assert [k for k in later if (m.path / k).read_bytes() != datas[k]] == []  # kept here
    assert "unreachable" not in m.log_text(), "the mount went offline"
    s3_proxy.clear()
    helpers.wait_for(lambda: all(s3_has(s3, bucket, k, datas[k]) for k in later), timeout=60,
                     message="the files that failed to upload to reach S3")
    assert not [k for k in s3_keys(s3, bucket) if ".conflict-" in k]
    assert_online(m)


# ------------------------------------------------------------------------------ listings
LIST_FAULTS = BODY_FAULTS


def test_listings_under_faults_are_complete_or_eio_and_the_mount_stays_online(
        mount, s3, bucket, s3_proxy):
    """Directories listed again and again (--metadata-ttl 0), each while its listing meets one
    fault: complete, or EIO when the fault persists; never offline. (One page each: moto takes
    seconds to list 1,000 keys on a busy machine; paging is test_listing.py's.)"""
    names = [f"f{i:02d}.txt" for i in range(30)]
    dirs = [f"l{name}" for name in LIST_FAULTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=b"x"),
                      [f"{d}/{n}" for d in dirs for n in names]))
    m = fault_mount(mount, bucket, s3_proxy, ["--metadata-ttl", "0", "--timeout", STALL_TIMEOUT])

    def listing_of(d: str):  # the directory's own listing, not a lookup's (max-keys=1)
        return lambda method, path, headers: (method == "GET" and f"prefix={d}%2F" in path
                                              and "max-keys=1000" in path)

    def lists(d: str) -> None:
        assert sorted(os.listdir(m.path / d)) == names, d

    assert sorted(os.listdir(m.path)) == sorted(dirs)
    faults = {name: s3_proxy.inject(Fault(**args, count=1, when=listing_of(f"l{name}")))
              for name, (args, _) in LIST_FAULTS.items()}
    in_parallel(*[lambda d=d: lists(d) for d in dirs])
    assert {n: f.injected for n, f in faults.items()} == dict.fromkeys(faults, 1)
    s3_proxy.clear()
    failing = ["500", "503", "reset", "cut", "stall"]
    faults = {name: s3_proxy.inject(Fault(**LIST_FAULTS[name][0], when=listing_of(f"l{name}")))
              for name in failing}
    in_parallel(*[lambda d=f"l{name}": fails_eio(lambda: os.listdir(m.path / d))
                  for name in failing])
    assert {n: f.injected >= 2 for n, f in faults.items()} == dict.fromkeys(faults, True)
    assert "unreachable" not in m.log_text(), "the mount went offline"
    s3_proxy.clear()
    in_parallel(*[lambda d=d: lists(d) for d in dirs])
    assert_online(m)


# ------------------------------------------------------------------------------ on demand
@pytest.mark.expect_log("unreachable")
def test_back_online_on_demand_the_first_request_after_the_network_returns_is_served(
        mount, s3, bucket, s3_proxy):
    """Offline for a while (the background probe backs off: it asks 0.5, 1.5, 3.5, 7.5 s after
    going offline), S3 comes back, and the very next read of an uncached file is served at once:
    it probes S3 itself instead of waiting for the background probe."""
    helpers.put_object(s3, bucket, "seen.txt", b"seen\n")
    later = helpers.put_random_object(s3, bucket, "later.bin", 300 * KiB, seed=9).data
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    assert sorted(os.listdir(m.path)) == ["later.bin", "seen.txt"]
    helpers.cut_off(m, s3_proxy, "refuse")
    offline_at = time.monotonic()  # (the mount went offline a little earlier)
    # offline: what needs S3 fails at once (a refused probe costs nothing), until the third
    # background probe has come and gone
    while time.monotonic() - offline_at < 3.6:
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            (m.path / "later.bin").read_bytes()
        assert e.value.errno == errno.ENETUNREACH and time.monotonic() - t < 1.0
        time.sleep(0.2)  # a user retrying now and then (not a synchronisation)
    # the last on-demand probe failed up to 0.2 s ago: a request within RECHECK_AFTER of it
    # would fail at once by design; the user tries again a moment later
    time.sleep(RECHECK_AFTER)
    s3_proxy.set_mode("pass")
    t = time.monotonic()
    r = subprocess.run(["cat", str(m.path / "later.bin")], capture_output=True, timeout=30)
    took = time.monotonic() - t
    assert r.returncode == 0 and r.stdout == later, r.stderr
    # served before the background probe's next try (7.5 s after going offline): this read
    # found S3 again
    assert time.monotonic() - offline_at < 7.0, "too slow to tell the probes apart"
    assert took < 1.5, f"the first read after S3 came back took {took:.1f} s"
    assert m.log_text().count(helpers.ONLINE_LOG) == 1
    assert status_code(m) == 0


@pytest.mark.expect_log("unreachable")
def test_a_burst_of_requests_against_a_hung_server_shares_one_probe(mount, s3, bucket,
                                                                    s3_proxy):
    """Offline, with a server that accepts connections and never answers: 20 requests at once
    that need S3 wait for one on-demand probe (bounded by the connect timeout), not 20."""
    for i in range(20):
        helpers.put_object(s3, bucket, f"u{i:02d}.txt", b"u\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    assert len(os.listdir(m.path)) == 20  # names known: their reads need S3 only for data
    helpers.cut_off(m, s3_proxy, "refuse")
    s3_proxy.set_mode("blackhole")
    time.sleep(RECHECK_AFTER + 0.2)  # past the last probe: the burst's first request probes
    accepted = s3_proxy.accepted
    results: list[tuple[int | None, float]] = []
    lock = threading.Lock()

    def read(i: int) -> None:
        t = time.monotonic()
        try:
            (m.path / f"u{i:02d}.txt").read_bytes()
            out = None
        except OSError as e:
            out = e.errno
        with lock:
            results.append((out, time.monotonic() - t))
    t = time.monotonic()
    threads = [threading.Thread(target=read, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    wall = time.monotonic() - t
    assert len(results) == 20 and all(code == errno.ENETUNREACH for code, _ in results), results
    assert max(took for _, took in results) < CONNECT_TIMEOUT + 1.5, results
    assert wall < CONNECT_TIMEOUT + 1.5, f"20 requests took {wall:.1f} s"
    assert 1 <= s3_proxy.accepted - accepted <= 2  # one probe (and maybe the background one)
    s3_proxy.set_mode("pass")
    helpers.wait_for(lambda: helpers.read_or_none(m.path / "u00.txt") == b"u\n", timeout=30,
                     message="the mount to come back online")
