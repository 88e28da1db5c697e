"""Load without surprises (issue 8, item 7): many processes at once through one mount, with
faults injected by the proxy in front of moto (tests/proxy.py): readers of different large
objects (read-ahead, parallel ranged GETs), writers of files of several sizes (one PUT, and
multipart uploads sent while written), and a recursive listing of a tree of a few hundred keys.

What must hold, under 503 SlowDown on a share of all requests, GET bodies reset or cut short
midway and a few trickled ones, and uploads of a few files refused for the whole run:

- everything finishes: a watchdog fails the test, naming every stuck worker and the call it is
  in, when a call runs past its bound (below) or the run past its deadline;
- every call gets S3's bytes, or success, or a clean EIO: never ENETUNREACH (the server answers),
  never short or wrong data;
- every call ends within its bound, derived from the mount's timeouts and retries (bound());
- the mount stays online, and the daemon's peak RSS (VmHWM) stays within RSS_LIMIT;
- once the faults stop, every file whose close() returned 0 is in S3 with its bytes (it was
  already), and every file whose close() failed gets there by the background retries.

Workers are processes (tests/load_worker.py), released together; each records every system
call it makes (begin, end, errno, time), which is what the watchdog and the checks read.

Found by it, and kept as a strict xfail until fixed: lookups of names in one directory wait for
each other in the kernel with libfuse before 3.17 (test_lookups_in_one_directory_run_side_by_side).
(The heavier run (-m slow) once peaked near 250 MiB of RSS, freed buffers kept by glibc's
per-thread arenas; the daemon now limits its arenas and trims its heap: see mount.tame_malloc.)
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from conftest import S3STASHFS_BIN
from helpers import KiB, MiB
from proxy import Fault

pytestmark = [pytest.mark.timeout(600)]

WORKER = Path(__file__).with_name("load_worker.py")
RSS_LIMIT = 200 * MiB
# Everything a fault makes the mount log is expected, but never that S3 is unreachable (the
# mount going offline), never a traceback (see test_faults.py)
ANSWERED_ONLY = r"\A(?![\s\S]*(Traceback|unreachable|unexpected))[\s\S]*(WARNING|ERROR)"

# ----------------------------------------------------------------- the bound of each call
# The mount's timeouts (store.Timeouts, scaled from --timeout T): connect 0.4 T; then the wait
# for an answer, and between two pieces of a body: meta T (HEAD, LIST), data 2 T (GET), write
# 6 T (PUT, parts, completion). Its retries (store.Store._run): ATTEMPTS tries, with backoff and
# full jitter in between, uniform(0, 0.1 * 3^k) s, so at most 0.1 + 0.3 + 0.9 + 2.7 = 4 s in all.
# No fault here stalls a body (none is a "hold"; a trickled body keeps coming, and is short), so
# a try ends at most one connect and one wait after it starts, and one S3 call at most
#     ATTEMPTS * (connect + wait) + BACKOFF.
# A lookup is one such call of the meta kind (a HEAD and a LIST side by side). But the kernel
# looks names up in one directory one at a time (libfuse before 3.17 never tells it that it may
# do otherwise: see test_lookups_in_one_directory_run_side_by_side), so a call that looks a name
# up may wait for the lookups of every other worker in that directory first: IN_LINE of them (16
# readers open in big/, 16 writers create their first file in a directory of out/).
# So a system call waits for at most CALLS[op] lookups, then S3 calls of one kind one after
# another (a read for the GETs of its blocks, which run side by side; a close of a multipart file
# for its last parts, side by side, then the completion); its bound is that, plus QUEUE: the time
# a request may wait for its turn in the daemon and for one of its worker threads, on two cores
# shared by the daemon, 34 workers, moto, the proxy and whatever else the machine runs.
TIMEOUT = 3.0  # --timeout: as test_faults.py's, which a busy moto on two cores rides out
CONNECT, META, DATA, WRITE = 0.4 * TIMEOUT, TIMEOUT, 2 * TIMEOUT, 6 * TIMEOUT
ATTEMPTS, BACKOFF = 5, 0.1 + 0.3 + 0.9 + 2.7
IN_LINE = 16
QUEUE = 10.0


def call_bound(wait: float) -> float:
    return ATTEMPTS * (CONNECT + wait) + BACKOFF


CALLS = {  # op: (lookups, then S3 calls, and the wait of each); None: no bound of its own
    "open": (IN_LINE + 1, 0, 0.0),  # its directory's and its own (the open reuses its HEAD)
    "create": (IN_LINE + 1, 0, 0.0),  # likewise
    "read": (0, 1, DATA),
    "write": (0, 0, 0.0),  # into the cache file: parts go up beside it
    "close": (0, 2, WRITE),  # (a read-only close waits for nothing)
    "listdir": (2, 1, META),  # the walker and ls -lR look it up, then it is listed (one page)
    "lstat": (2, 0, 0.0),  # answered by the listing, or a lookup
    "ls -lR": None,  # a whole program: its calls are the walker's; the deadline bounds it
}


def bound(op: str) -> float:
    lookups, calls, wait = CALLS[op]
    return lookups * call_bound(META) + calls * call_bound(wait) + QUEUE


@dataclasses.dataclass(frozen=True)
class Load:
    """How much of everything: the default run, and a heavier one (slow)."""

    big_size: int  # each reader's object (16 of them)
    writer_sizes: tuple[int, ...]  # the files each writer writes, in this order
    multipart_every: int  # every n-th writer also writes a multipart file of multipart_size
    multipart_size: int
    deadline: float  # the whole run, from the release of the workers to the last one's end


LIGHT = Load(big_size=4 * MiB + 4099, writer_sizes=(3 * KiB, 700 * KiB + 11, 2 * MiB + 5),
             multipart_every=2, multipart_size=6 * MiB + 17, deadline=100.0)
HEAVY = Load(big_size=8 * MiB + 4099, writer_sizes=(3 * KiB, 700 * KiB + 11, 2 * MiB + 5, 5 * MiB),
             multipart_every=1, multipart_size=11 * MiB + 17, deadline=240.0)


READERS = WRITERS = 16
DOOMED_WRITERS = (3, 11)  # these also write a file whose every upload is refused (503) for the run
TREE = [f"tree/d{a}/e{b}/f{c:02d}.txt" for a in range(6) for b in range(5) for c in range(12)]
ENV = {"S3STASHFS_MULTIPART_THRESHOLD_MB": "5", "S3STASHFS_PART_SIZE_MB": "5"}


class RssOverLimit(AssertionError):
    """The daemon's peak RSS exceeded RSS_LIMIT."""


def tree_body(key: str) -> bytes:
    return (key.encode() + b"\n") * (len(key) % 7)  # some empty


def is_get(method: str, path: str, headers) -> bool:
    return method == "GET"


def doomed_put(method: str, path: str, headers) -> bool:
    return method == "PUT" and "/doomed-" in path


def faults(proxy) -> dict[str, Fault]:
    """The faults of the run (the first that takes a request applies), on a seeded generator."""
    proxy.clear(seed=8)
    return {
        "doomed": proxy.inject(Fault("503", when=doomed_put)),
        "503": proxy.inject(Fault("503", rate=0.05)),
        "reset": proxy.inject(Fault("reset", rate=0.04, at=0.5, when=is_get)),
        "cut": proxy.inject(Fault("cut", rate=0.04, at=0.3, when=is_get)),
        # 8 MiB in 64 KiB pieces 5 ms apart: 0.6 s, well within a data timeout
        "trickle": proxy.inject(Fault("trickle", rate=0.03, piece=64 * KiB, pause=0.005, when=is_get)),
    }


# ------------------------------------------------------------------------- the workers
@dataclasses.dataclass
class Worker:
    name: str
    spec: dict
    events_path: Path
    proc: subprocess.Popen | None = None

    def events(self) -> list[dict]:
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def in_flight(self) -> tuple[dict, float] | None:
        """The call it is in (its begin event) and for how long, if any."""
        begun: dict | None = None
        for e in self.events():
            if e["ev"] == "begin":
                begun = e
            elif e["ev"] == "end":
                begun = None
        return (begun, time.monotonic() - begun["t"]) if begun else None


@pytest.fixture
def workers(mount, tmp_path):
    """start(name, spec) -> Worker; start.daemon = the mount's daemon PID. Set up after the
    mount, so torn down before it: workers still running are killed, also on failure. A call
    that the daemon has taken and never answers outlives SIGKILL (the kernel waits for the
    answer); then the daemon is ended, which ends those calls, and the mount's own teardown
    cleans up after it."""
    started: list[Worker] = []

    def start(name: str, spec: dict) -> Worker:
        spec_path = tmp_path / f"{name}.json"
        spec_path.write_text(json.dumps(spec))
        w = Worker(name, spec, tmp_path / f"{name}.events")
        with open(tmp_path / f"{name}.stderr", "wb") as err:
            w.proc = subprocess.Popen([sys.executable, str(WORKER), str(spec_path), str(w.events_path)],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        started.append(w)
        return w
    start.daemon = None
    yield start

    def all_gone() -> bool:
        return all(w.proc.poll() is not None for w in started)
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()  # by its PID
    try:
        helpers.wait_for(all_gone, timeout=10)
    except AssertionError:
        if start.daemon is not None:
            helpers.terminate_pid(start.daemon, timeout=5, must_contain="s3stashfs")
        try:
            helpers.wait_for(all_gone, timeout=30)
        except AssertionError:
            pass  # reported by the test; nothing more to do by PID
    for w in started:
        if w.proc.stdin:
            try:
                w.proc.stdin.close()
            except OSError:
                pass


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), Threads of a process, in bytes (counts as they are)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM", "Threads"):
                    v = value.split()
                    out[name] = int(v[0]) * (KiB if v[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text() or "running"
    except OSError:
        return "?"


def stuck_report(ws: list[Worker], m) -> str:
    lines = []
    for w in ws:
        if w.proc.poll() is not None:
            continue
        fl = w.in_flight()
        where = (f"in {fl[0]['op']} {fl[0]['what']} for {fl[1]:.1f} s" if fl
                 else "between calls")
        lines.append(f"  {w.name} (pid {w.proc.pid}, kernel wait {wchan(w.proc.pid)}): {where}")
    try:
        r = subprocess.run([str(S3STASHFS_BIN), "status", str(m.path)], env=m.env, capture_output=True,
                           timeout=10, stdin=subprocess.DEVNULL)
        status = f"exit {r.returncode}:\n{r.stdout.decode(errors='replace')}"
    except subprocess.TimeoutExpired:
        status = "no answer within 10 s"
    return ("stuck workers:\n" + "\n".join(lines) + f"\ndaemon {m.pid} ({wchan(m.pid)}): {proc_status(m.pid)}, "
            f"{cpu_seconds(m.pid):.1f} s of CPU\ns3stashfs status: {status}")


# ------------------------------------------------------------------------------ the test
def s3_has(s3, bucket, key, data: bytes) -> bool:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    except Exception:  # noqa: BLE001 - not there (yet)
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(load: Load, request, mount, s3, bucket, s3_proxy, workers) -> dict:
    """The run; returns its figures (also printed: ``pytest -s`` shows them)."""
    t_setup = time.monotonic()
    bigs = {f"big/obj{i:02d}.bin": f"big{i}" for i in range(READERS)}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: helpers.put_random_object(s3, bucket, k, load.big_size, seed=bigs[k]),
                      bigs))
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=tree_body(k)), TREE))
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"out/w{i:02d}/", Body=b""),
                      range(WRITERS)))
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, env=ENV, extra_args=["--timeout", str(TIMEOUT)])
    m.expect_log(ANSWERED_ONLY)
    pid = workers.daemon = m.pid
    assert proc_status(pid), "no daemon to watch"

    written: dict[str, tuple[int, str]] = {}  # key: (size, seed of its bytes)
    ws: list[Worker] = []
    for i, (key, seed) in enumerate(bigs.items()):
        ws.append(workers(f"reader{i:02d}", dict(role="read", path=str(m.path / key),
                                                 size=load.big_size, seed=seed)))
    for i in range(WRITERS):
        sizes = list(load.writer_sizes) + ([load.multipart_size] if i % load.multipart_every == 0 else [])
        files = [(f"out/w{i:02d}/f{n}.bin", size) for n, size in enumerate(sizes)]
        if i in DOOMED_WRITERS:
            files.insert(1, (f"out/w{i:02d}/doomed-{i}.bin", 100 * KiB + i))
        written.update((key, (size, f"{key}:{size}")) for key, size in files)
        ws.append(workers(f"writer{i:02d}", dict(role="write", files=[
            dict(path=str(m.path / key), size=size, seed=f"{key}:{size}") for key, size in files])))
    ws.append(workers("walker", dict(role="walk", root=str(m.path / "tree"))))
    ws.append(workers("ls", dict(role="ls", root=str(m.path / "tree"), timeout=load.deadline)))
    helpers.wait_for(lambda: all(any(e["ev"] == "ready" for e in w.events()) for w in ws),
                     timeout=60, message="the workers to start")

    # ------------------------------------------------- all at once, under faults, watched
    fs = faults(s3_proxy)
    setup_took = time.monotonic() - t_setup
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    for w in ws:
        w.proc.stdin.write(b"go\n")
        w.proc.stdin.flush()
    rss = [0]

    def finished() -> bool:
        rss[0] = max(rss[0], proc_status(pid).get("VmRSS", 0))
        over = [w for w in ws if w.proc.poll() is None and (fl := w.in_flight())
                and CALLS[fl[0]["op"]] and fl[1] > bound(fl[0]["op"])]
        if over:
            pytest.fail(f"a call past its bound\n{stuck_report(ws, m)}", pytrace=False)
        return all(w.proc.poll() is not None for w in ws)
    try:
        helpers.wait_for(finished, timeout=load.deadline, interval=0.2)
    except AssertionError:
        pytest.fail(f"the load did not finish within {load.deadline:g} s (deadlock?)\n"
                    f"{stuck_report(ws, m)}", pytrace=False)
    took, cpu = time.monotonic() - t0, cpu_seconds(pid) - cpu0
    status = proc_status(pid)
    injected, requests = dict(s3_proxy.injected), len(s3_proxy.requests)
    s3_proxy.clear()

    # ------------------------------------------------ the figures (printed: pytest -s)
    events = {w.name: w.events() for w in ws}
    ends = [(name, e) for name, evs in events.items() for e in evs if e["ev"] == "end"]
    errors = [(name, e["op"], e["what"], errno.errorcode.get(e["errno"], e["errno"]))
              for name, e in ends if not e["ok"]]
    per_op: dict[str, list[float]] = {}
    for _, e in ends:
        per_op.setdefault(e["op"], []).append(e["took"])
    figures = dict(
        setup_s=round(setup_took, 1), load_s=round(took, 1), daemon_cpu_s=round(cpu, 1),
        peak_rss_mib=round(status["VmHWM"] / MiB, 1), sampled_rss_mib=round(rss[0] / MiB, 1),
        threads=status.get("Threads"), requests=requests, injected=injected,
        errors=[x[:2] + (Path(x[2]).name, x[3]) for x in errors],
        ops={op: dict(n=len(t), max_s=round(max(t), 2), bound_s=round(bound(op), 1) if CALLS[op] else None)
             for op, t in sorted(per_op.items())})
    print("\nload figures:", json.dumps(figures))

    # --------------------------------------------------------- what every call got
    unfinished = {w.name: (w.proc.returncode, w.events_path.with_suffix(".stderr").read_text()[-2000:])
                  for w in ws if w.proc.returncode != 0 or events[w.name][-1]["ev"] != "done"}
    assert unfinished == {}, "workers that did not finish their work"
    assert [e for evs in events.values() for e in evs if e["ev"] == "bad"] == [], "short or wrong data"
    assert [x for x in errors if x[3] != "EIO"] == [], "errors other than a clean EIO"
    slow = sorted(((round(e["took"], 1), round(bound(e["op"]), 1), name, e["op"], e["what"])
                   for name, e in ends if CALLS[e["op"]] and e["took"] > bound(e["op"])), reverse=True)
    assert slow == [], "calls past their bound"
    # the tree: every file with its size (walker), every name (ls -lR); after a failed listing
    # (EIO) what was listed must still be right
    trees = {name: e for name, evs in events.items() for e in evs if e["ev"] == "tree"}
    want = {k.removeprefix("tree/"): len(tree_body(k)) for k in TREE}
    if any(name == "walker" for name, *_ in errors):
        assert trees["walker"]["files"].items() <= want.items()
    else:
        assert trees["walker"]["files"] == want
    if "ls" in trees:  # else it failed, with EIO
        assert trees["ls"]["names"] == sorted(k.rsplit("/", 1)[1] for k in TREE)

    # --------------------------------------------------------------------- online
    assert subprocess.run([str(S3STASHFS_BIN), "status", str(m.path)], env=m.env, capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL).returncode == 0, "status: not online"
    assert "unreachable" not in m.log_text(), "the mount went offline for a server that answered"
    # the faults were there (seeded, but the order of requests is not: at least one of each)
    assert [k for k, f in fs.items() if not f.injected] == [], injected

    # --------------------------------------------------- every write reaches S3
    def outcomes(op: str) -> dict[str, bool]:  # key: did every such call of it succeed
        out: dict[str, bool] = {}
        for name, e in ends:
            if name.startswith("writer") and e["op"] == op:
                key = str(Path(e["what"].rsplit("@", 1)[0]).relative_to(m.path))
                out[key] = out.get(key, True) and e["ok"]
        return out
    created, wrote, closed = outcomes("create"), outcomes("write"), outcomes("close")
    assert sorted(created) == sorted(written)
    assert sorted(closed) == sorted(k for k, ok in created.items() if ok)  # a failed create: EIO
    whole = {k for k in closed if wrote.get(k, True)}  # a failed write (EIO) left it short
    datas = {k: helpers.random_bytes(*written[k]) for k in whole}
    lost = [k for k in whole if closed[k] and not s3_has(s3, bucket, k, datas[k])]
    assert lost == [], "close() returned 0, but S3 does not have those bytes"
    failed = sorted(k for k in whole if not closed[k])
    assert [k for k in closed if "/doomed-" in k and closed[k]] == [], "an upload refused throughout went up"
    t_sync = time.monotonic()
    sync = subprocess.run([str(S3STASHFS_BIN), "sync", str(m.path)], env=m.env, capture_output=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    helpers.wait_for(lambda: all(s3_has(s3, bucket, k, datas[k]) for k in failed), timeout=60,
                     message=lambda: f"the files whose close() failed to reach S3 (sync: exit "
                     f"{sync.returncode}: {sync.stdout.decode(errors='replace')})")
    assert not [k for k in helpers.list_keys(s3, bucket) if ".conflict-" in k], "a bogus conflict copy"
    figures.update(closes_failed=failed, sync_exit=sync.returncode, sync_s=round(time.monotonic() - t_sync, 1))
    print("after the load:", json.dumps({k: figures[k] for k in ("closes_failed", "sync_exit", "sync_s")}))

    # ------------------------------------------------------------- memory, last
    if status["VmHWM"] > RSS_LIMIT:
        raise RssOverLimit(f"the daemon's peak RSS: {status['VmHWM'] / MiB:.0f} MiB > {RSS_LIMIT / MiB:.0f}")

    return figures


def test_many_readers_writers_and_a_listing_under_faults(request, mount, s3, bucket, s3_proxy, workers):
    """16 readers of 4 MiB objects, 16 writers of 3-4 files (8 multipart), a walk and an ls -lR
    of 360 keys, at once, under faults."""
    run_load(LIGHT, request, mount, s3, bucket, s3_proxy, workers)


@pytest.mark.slow
def test_heavier_load_under_faults(request, mount, s3, bucket, s3_proxy, workers):
    """The same with 8 MiB objects and a multipart file of 11 MiB from every writer."""
    run_load(HEAVY, request, mount, s3, bucket, s3_proxy, workers)


# ------------------------------------------------------------ lookups in one directory
class LookupsInLine(AssertionError):
    """Lookups of different names in one directory waited for each other."""


def libfuse_version() -> tuple[int, ...]:
    lib = ctypes.CDLL("libfuse3.so.3")  # the one pyfuse3 is linked with
    lib.fuse_pkgversion.restype = ctypes.c_char_p
    return tuple(int(x) for x in lib.fuse_pkgversion().decode().split(".")[:2])


@pytest.mark.slow  # 10,007 keys to put into moto: about a minute
def test_lookups_in_one_directory_run_side_by_side(mount, s3, bucket, s3_proxy, request):
    """N lookups at once in one directory, each held most of a second by S3 (the LIST of the
    lookup trickled), should run side by side, but the kernel sends them one after another
    when FUSE_PARALLEL_DIROPS was not negotiated, which libfuse before 3.17 never does (it means
    to, but does not pass the flag on: libfuse commit c9905341, "Pass FUSE_PARALLEL_DIROPS to
    kernel"; the kernel then holds a lock of the directory across each lookup, and the waiting
    programs' kernel wait is fuse_lock_inode). Names a fresh listing shows cost no request, so
    this bites only where lookups ask S3: here, names in a directory too large (over 10 pages
    of 1,000 keys) for its lookup to list it whole."""
    n = 6
    keys = [*[f"one/a{i:05d}" for i in range(10001)], "one/y", *[f"one/z{i}" for i in range(n)]]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--metadata-ttl", "60"])
    os.stat(m.path / "one")  # known to the kernel; 10 pages of its listing seen, not all
    s3_proxy.inject(Fault("trickle", piece=32, pause=0.08,
                          when=lambda method, path, headers: method == "GET" and "list-type=" in path))

    def at_once(keys: list[str]) -> float:
        t = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
            list(pool.map(lambda k: os.stat(m.path / k), keys))
        return time.monotonic() - t
    alone = at_once(["one/y"])
    assert alone > 0.2, f"a lookup of a name past the first page took {alone:.2f} s: it asked S3 nothing"
    together = at_once([f"one/z{i}" for i in range(n)])
    print(f"lookups: alone {alone:.2f} s, together {together:.2f} s")
    if libfuse_version() < (3, 17):
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=LookupsInLine,
            reason=f"libfuse {'.'.join(map(str, libfuse_version()))} < 3.17 does not pass "
                   "FUSE_PARALLEL_DIROPS to the kernel: lookups in one directory wait in line"))
    if together >= n / 2 * alone:
        raise LookupsInLine(f"{n} lookups in one directory: {together:.1f} s, one alone {alone:.1f} s")
