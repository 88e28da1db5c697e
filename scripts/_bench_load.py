"""The load workloads of ``scripts/bench`` (``--only load``): many processes and readers at
once, each run directly and again through a loopback proxy that makes every request wait
``--latency`` ms, as real S3 does; each figure beside a limit measured in the same run.

    P processes reading N different 4 KiB objects (N/P each, opened by name), cold   <= 1.2 x
        P threads of raw boto3 GetObject (one client each), P = 1, 8, 32
    8 concurrent cold sequential readers of 8 objects (1 MiB reads)                  >= 0.8 x
        8 concurrent boto3 download_file (one client each)
    16 concurrent `samtools view -c BAM REGION`, cold mount, then again (warm): p50 and p99
        beside 16 concurrent raw ranged GETs of the BAM, each about the size of a region
    daemon CPU seconds (user + system) per GiB read sequentially: cold, and warm (from the
        cache file: after drop_caches)
    daemon peak RSS (VmHWM, fresh mount) with 16 and with 100 sequential readers      <= 250 MiB
        at 100

The proxy (``DelayProxy``) runs in a child process (``python _bench_load.py delay-proxy``)
so that its threads do not compete with the bench's for one GIL: each chunk a client sends
waits MS ms, per connection (a delay line, so a request is delayed once, not per chunk, and
connections do not wait for each other); answers flow back undelayed (spliced). Opening a
connection costs no delay (on AWS it costs a round trip, two more with TLS). The mount and
the raw baseline both use it as their endpoint in the latency pass; it counts the requests
(GET, HEAD, LIST, ...) that go through it, for the log.

The reading processes are ``python _bench_load.py read-worker``: they start, say ready, and
read when told to go, so that interpreter start-up is not timed; every byte read through the
mount is compared with the data afterwards (untimed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _mount import RssSampler, proc_cpu_seconds  # noqa: E402

MiB = 1 << 20
SEED = 4099
SMALL_PREFIX = "load/small/"
SEQ_PREFIX = "load/seq/"
RSS_PREFIX = "load/rss/"
BAM_PREFIX = "load/bam/"
SMALL_SIZE = 4096
PROCS = (1, 8, 32)
SEQ_READERS = 8
RSS_READERS = (16, 100)
RSS_TARGET_MIB = 250.0
BAM_QUERIES = 16
BAM_REGION = 10_000  # bases per region
POOL = 16 * MiB + 4099  # sequential objects are 1 MiB slices of this pool
PART = 8 * MiB
F_SETPIPE_SZ = 1031


# =========================================================================== arguments


def add_arguments(ap) -> None:
    ap.add_argument("--latency", type=int, default=20, metavar="MS",
                    help="load workloads: a second pass through a proxy delaying each request MS ms "
                         "(default 20; 0: no second pass)")
    ap.add_argument("--load-objects", type=int, help="load: small objects read by 1, 8, 32 processes "
                                                      "(default 2000; --quick: 200)")
    ap.add_argument("--load-seq-mib", type=int, help="load: size of the 8 concurrent readers' objects "
                                                      "(default 128; --quick: 16)")
    ap.add_argument("--load-rss-mib", type=int, help="load: size of the objects of the 16/100 readers "
                                                      "(default 16; --quick: 4)")


def resolve_args(args, error: Callable[[str], None]) -> None:
    args.load_objects = args.load_objects or (200 if args.quick else 2000)
    args.load_seq_mib = args.load_seq_mib or (16 if args.quick else 128)
    args.load_rss_mib = args.load_rss_mib or (4 if args.quick else 16)
    if args.latency < 0 or min(args.load_objects, args.load_seq_mib, args.load_rss_mib) < 1:
        error("--latency must be >= 0; --load-objects, --load-seq-mib, --load-rss-mib positive")


def latencies(args) -> list[int]:
    return [0] + ([args.latency] if args.latency else [])


def define_rows(bench) -> None:
    """The rows, each workload's @0ms and @MSms rows next to each other."""
    args = bench.args
    lat = latencies(args)
    for p in PROCS:
        for ms in lat:
            bench.row(f"load_small_{p}_{ms}", workload=f"{plural(p, 'process')}, {args.load_objects} x 4 KiB "
                      f"objects, cold @{ms}ms", unit="s", better="lower", target=1.2)
    for ms in lat:
        bench.row(f"load_seq_{ms}", workload=f"{SEQ_READERS} concurrent cold sequential reads, "
                  f"{SEQ_READERS} x {args.load_seq_mib} MiB @{ms}ms", unit="MB/s", better="higher", target=0.8)
    for when in ("cold", "warm"):
        for q in ("p50", "p99"):
            for ms in lat:
                bench.row(f"load_bam_{when}_{q}_{ms}", workload=f"{BAM_QUERIES} samtools view -c regions, "
                          f"{when}, {q} @{ms}ms", unit="s", better="lower", target=None)
    for when in ("cold", "warm"):
        for ms in lat:
            bench.row(f"load_cpu_{when}_{ms}", workload=f"daemon CPU s per GiB, {when} sequential read @{ms}ms",
                      unit="s", better="lower", target=None)
    for n in RSS_READERS:
        for ms in lat:
            bench.row(f"load_rss{n}_{ms}", workload=f"daemon peak RSS, {n} readers of {args.load_rss_mib} MiB "
                      f"@{ms}ms", unit="MiB", better="lower", absolute=True,
                      target=RSS_TARGET_MIB if n == max(RSS_READERS) else None)


def plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "es" if what.endswith("s") else "s")


def fmt_requests(counts: dict[str, int] | None) -> str:
    return ", ".join(f"{n} {k}" for k, n in (counts or {}).items()) or "none"


# =========================================================================== helpers


def read_all(path: str, crc: bool = False, bufsize: int = MiB) -> tuple[int, int]:
    """Read a file front to back with one reused buffer: (bytes, crc32 or 0)."""
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    n = c = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while k := os.readv(fd, [buf]):
            n += k
            if crc:
                c = zlib.crc32(mv[:k], c)
    finally:
        os.close(fd)
    return n, c


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (of 16 values, p99 is the largest)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def at_once(n: int, fn: Callable[[int], object]) -> tuple[float, list]:
    """Run fn(0..n-1) in n threads released together: (wall seconds, results)."""
    gate = threading.Barrier(n + 1)

    def one(i):
        gate.wait()
        return fn(i)

    with ThreadPoolExecutor(n) as ex:
        futures = [ex.submit(one, i) for i in range(n)]
        gate.wait()
        t = time.perf_counter()
        out = [f.result() for f in futures]
        return time.perf_counter() - t, out


class SliceObjects:
    """n objects of `size` bytes, each a different sequence of 1 MiB slices of one random pool
    (making GiBs costs memcpy, not a random generator); crc32 of each, for the checks."""

    def __init__(self, prefix: str, n: int, size: int, seed: int):
        rng = random.Random(seed)
        pool = rng.randbytes(POOL)
        self.pool = pool + pool[:MiB]
        self.size = size
        self.keys = [f"{prefix}o{i:03d}.bin" for i in range(n)]
        self.offsets = [[rng.randrange(POOL) for _ in range(-(-size // MiB))] for _ in range(n)]
        self.crcs = [0] * n

    def data(self, i: int, off: int, n: int) -> bytes:
        pieces, end = [], off + n
        while off < end:
            j, within = divmod(off, MiB)
            k = min(MiB - within, end - off)
            start = self.offsets[i][j] + within
            pieces.append(self.pool[start:start + k])
            off += k
        return b"".join(pieces)

    def upload(self, s3, bucket: str) -> None:
        """Multipart in 8 MiB parts (single PUT up to one part), 16 at a time; crcs on the way."""
        parts = -(-self.size // PART)
        uploads = {}
        if parts > 1:
            uploads = {k: s3.create_multipart_upload(Bucket=bucket, Key=k)["UploadId"] for k in self.keys}

        def put(job):
            i, p = job
            body = self.data(i, p * PART, min(PART, self.size - p * PART))
            if parts == 1:
                s3.put_object(Bucket=bucket, Key=self.keys[i], Body=body)
                return i, p, ""
            r = s3.upload_part(Bucket=bucket, Key=self.keys[i], UploadId=uploads[self.keys[i]],
                               PartNumber=p + 1, Body=body)
            return i, p, r["ETag"]

        etags: dict[int, dict[int, str]] = {i: {} for i in range(len(self.keys))}
        with ThreadPoolExecutor(16) as ex:
            for i, p, etag in ex.map(put, [(i, p) for i in range(len(self.keys)) for p in range(parts)]):
                etags[i][p] = etag
        for i, key in enumerate(self.keys):
            c = 0
            for off in range(0, self.size, PART):
                c = zlib.crc32(self.data(i, off, min(PART, self.size - off)), c)
            self.crcs[i] = c
            if parts > 1:
                s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uploads[key], MultipartUpload={
                    "Parts": [{"PartNumber": p + 1, "ETag": etags[i][p]} for p in range(parts)]})


# =========================================================================== delaying proxy


class DelayProxy:
    """A loopback TCP proxy in front of 127.0.0.1:upstream_port, in a child process, that
    delays what clients send by `delay_ms` (see the module docstring). ``url`` is its endpoint;
    ``close()`` ends the child (it also ends when this process dies: its stdin closes)."""

    def __init__(self, upstream_port: int, delay_ms: int, timeout: float = 30.0):
        self.delay_ms = delay_ms
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "delay-proxy", "127.0.0.1",
                                      str(upstream_port), str(delay_ms)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else b""
            self.port = int(line)
        except ValueError:
            self.close()
            raise RuntimeError(f"delay proxy did not start (said {line!r})") from None
        self.url = f"http://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, int]:
        """Requests that went through so far, by kind (GET, HEAD, LIST, ...)."""
        self.proc.stdin.write(b"count\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def requests_since(self, before: dict[str, int]) -> dict[str, int]:
        now = self.counts()
        return {k: n - before.get(k, 0) for k, n in sorted(now.items()) if n - before.get(k, 0)}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve_delay_proxy(host: str, port: int, delay_ms: int) -> None:
    delay = delay_ms / 1000
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(512)
    print(lsock.getsockname()[1], flush=True)

    counts: dict[str, int] = {}
    lock = threading.Lock()

    def commands():  # "count": the requests so far, as JSON; stdin closes when the bench ends or dies
        for cmd in sys.stdin:
            if cmd.strip() == "count":
                with lock:
                    print(json.dumps(counts), flush=True)
        os._exit(0)

    threading.Thread(target=commands, daemon=True).start()
    while True:
        c, _ = lsock.accept()
        threading.Thread(target=_proxy_connection, args=(c, (host, port), delay, counts, lock),
                         daemon=True).start()


REQUEST_LINE = re.compile(rb"^(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r?$", re.M)


def _count_requests(data: bytes, counts: dict[str, int], lock: threading.Lock) -> None:
    """Requests by kind, from the request lines in what a client sent (a line split between
    two chunks is missed: the counts are a diagnostic). GET with list-type= is LIST."""
    for m in REQUEST_LINE.finditer(data):
        kind = m.group(1).decode()
        if kind == "GET" and b"list-type=" in m.group(2):
            kind = "LIST"
        with lock:
            counts[kind] = counts.get(kind, 0) + 1


def _proxy_connection(c: socket.socket, upstream: tuple[str, int], delay: float, counts: dict[str, int],
                      lock: threading.Lock) -> None:
    try:
        u = socket.create_connection(upstream, timeout=10)
        u.settimeout(None)
    except OSError:
        c.close()
        return
    for s in (c, u):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    line: deque[tuple[float, bytes | None]] = deque()
    cv = threading.Condition()
    left = [3]

    def done(failed: bool):
        with cv:
            left[0] -= 1
            last = left[0] == 0
        if failed:  # unblock the other directions
            for s in (c, u):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if last:
            c.close()
            u.close()

    def take_in():
        failed = False
        try:
            while data := c.recv(262144):
                _count_requests(data, counts, lock)
                with cv:
                    line.append((time.monotonic() + delay, data))
                    cv.notify()
        except OSError:
            failed = True
        with cv:
            line.append((time.monotonic() + delay, None))
            cv.notify()
        done(failed)

    def send_out():
        failed = False
        try:
            while True:
                with cv:
                    while not line:
                        cv.wait()
                    due, data = line.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data is None:
                    u.shutdown(socket.SHUT_WR)
                    break
                u.sendall(data)
        except OSError:
            failed = True
        done(failed)

    def answers():
        failed = False
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, MiB)
            while n := os.splice(u.fileno(), w, MiB):
                while n:
                    n -= os.splice(r, c.fileno(), n)
            c.shutdown(socket.SHUT_WR)
        except OSError:
            failed = True
        finally:
            os.close(r)
            os.close(w)
        done(failed)

    threading.Thread(target=take_in, daemon=True).start()
    threading.Thread(target=send_out, daemon=True).start()
    answers()


# =========================================================================== reading processes


def _read_worker() -> int:
    """One reading process: a JSON line {"paths": [...]} on stdin, "ready" on stdout, then on
    "go" read each file whole; then a JSON line with its start/end (CLOCK_MONOTONIC, the same
    clock in every process), and per file the size and crc32 or the errno."""
    spec = json.loads(sys.stdin.readline())
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    t0 = time.monotonic()
    got: list[bytes | int] = []
    for p in spec["paths"]:
        try:
            with open(p, "rb", buffering=0) as f:
                got.append(f.read())
        except OSError as e:
            got.append(e.errno or -1)
    t1 = time.monotonic()
    out = {"t0": t0, "t1": t1, "files": [[len(g), zlib.crc32(g)] if isinstance(g, bytes) else ["errno", g]
                                         for g in got]}
    print(json.dumps(out), flush=True)
    return 0


def run_readers(shares: list[list[str]], timeout: float = 120.0) -> tuple[float, list[dict]]:
    """Start one read-worker process per share, wait until all are ready, let them go
    together: (seconds from go until the last one finished, their reports)."""
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "read-worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in shares]
    try:
        for p, paths in zip(procs, shares):
            p.stdin.write(json.dumps({"paths": paths}) + "\n")
            p.stdin.flush()
        for p in procs:
            ready, _, _ = select.select([p.stdout], [], [], timeout)
            if not ready or p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"read-worker {p.pid} did not get ready")
        t_go = time.monotonic()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        reports = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"read-worker {p.pid} ended without a report (exit {p.wait()})")
            reports.append(json.loads(line))
        return max(r["t1"] for r in reports) - t_go, reports
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# =========================================================================== the workloads


class Load:
    """The load step of one bench run: uploads its own objects under load/, then runs each
    workload at 0 ms and at --latency ms (raw baseline and a fresh mount at the same endpoint)."""

    def __init__(self, bench, bucket: str, log: Callable[[str], None], error: type[Exception]):
        self.b = bench
        self.args = bench.args
        self.srv = bench.srv
        self.log = log
        self.error = error
        self.bucket = bucket
        self.s3_up = self.srv.client(max_pool_connections=32, request_checksum_calculation="when_required")
        self.proxy: DelayProxy | None = None

    # ------------------------------------------------------------------ plumbing

    def endpoint(self, ms: int) -> str:
        return self.proxy.url if ms else self.srv.endpoint_url

    def clients(self, ms: int, n: int) -> list:
        """n boto3 clients at this latency's endpoint, connections up (untimed)."""
        cs = [self.srv.client(endpoint_url=self.endpoint(ms)) for _ in range(n)]
        for c in cs:
            c.head_bucket(Bucket=self.bucket)
        return cs

    @contextlib.contextmanager
    def mount(self, ms: int, label: str):
        with self.b.mounter.mount(self.endpoint(ms), f"{label}-{ms}ms") as m:
            yield m

    def snapshot(self, ms: int) -> dict[str, int] | None:
        """The proxy's request counts (at 0 ms nothing goes through it: None)."""
        return self.proxy.counts() if ms and self.proxy else None

    def since(self, before: dict[str, int] | None) -> dict[str, int] | None:
        return None if before is None or not self.proxy else self.proxy.requests_since(before)

    def watchdog(self, what: str):
        return self.b.mounter.watchdog(self.args.step_timeout, what)

    def run(self) -> None:
        t_step = time.monotonic()
        self.upload()
        self.b.warm_server()
        if self.args.latency:
            self.proxy = DelayProxy(self.srv.ports["s3"], self.args.latency)
            self.log(f"delay proxy at {self.proxy.url}: +{self.args.latency} ms per request "
                     f"(pid {self.proxy.proc.pid})")
        try:
            for ms in latencies(self.args):
                self.small(ms)
            for ms in latencies(self.args):
                self.sequential(ms)
            for ms in latencies(self.args):
                self.cpu(ms)
            for ms in latencies(self.args):
                self.bam(ms)
            for ms in latencies(self.args):
                self.rss(ms)
        finally:
            if self.proxy:
                self.proxy.close()
        self.b.meta["load_step_seconds"] = round(time.monotonic() - t_step, 1)
        self.log(f"load: the step took {time.monotonic() - t_step:.0f} s")

    def upload(self) -> None:
        a = self.args
        t = time.monotonic()
        rng = random.Random(SEED)
        self.small_data = {f"{SMALL_PREFIX}f{i:05d}.bin": rng.randbytes(SMALL_SIZE) for i in range(a.load_objects)}
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda kv: self.s3_up.put_object(Bucket=self.bucket, Key=kv[0], Body=kv[1]),
                        self.small_data.items()))
        self.seq = SliceObjects(SEQ_PREFIX, SEQ_READERS, a.load_seq_mib * MiB, SEED + 1)
        self.seq.upload(self.s3_up, self.bucket)
        self.many = SliceObjects(RSS_PREFIX, max(RSS_READERS), a.load_rss_mib * MiB, SEED + 2)
        self.many.upload(self.s3_up, self.bucket)
        total = len(self.small_data) * SMALL_SIZE + (len(self.seq.keys) * self.seq.size
                                                     + len(self.many.keys) * self.many.size)
        self.log(f"load: uploaded {len(self.small_data)} small objects, {SEQ_READERS} x {a.load_seq_mib} MiB, "
                 f"{max(RSS_READERS)} x {a.load_rss_mib} MiB ({total / MiB:.0f} MiB) in {time.monotonic() - t:.1f} s")
        self.bam_setup()

    # ------------------------------------------------------------------ small objects

    def small(self, ms: int) -> None:
        keys = sorted(self.small_data)
        want = {k: [SMALL_SIZE, zlib.crc32(v)] for k, v in self.small_data.items()}
        cs = self.clients(ms, max(PROCS))
        for p in PROCS:
            r = self.b.rows[f"load_small_{p}_{ms}"]
            shares = [keys[i * len(keys) // p:(i + 1) * len(keys) // p] for i in range(p)]
            r.limit_what = f"{plural(p, 'thread')} of boto3 GetObject, one client each"

            def get_share(i, shares=shares):
                for k in shares[i]:
                    if len(cs[i].get_object(Bucket=self.bucket, Key=k)["Body"].read()) != SMALL_SIZE:
                        raise self.error(f"GetObject {k}: short body")

            before = self.snapshot(ms)
            base, _ = at_once(p, get_share)
            r.limit = base
            msg = f"[load small @{ms}ms] {plural(p, 'thread')} x GetObject: {base:.2f} s"
            if before is not None:
                msg += f" ({fmt_requests(self.since(before))})"
            if self.b.ours:
                with self.mount(ms, f"small{p}") as m:
                    mshares = [[os.path.join(m.mountpoint, k) for k in s] for s in shares]
                    before = self.snapshot(ms)
                    with self.watchdog(f"{p} processes reading small objects"):
                        wall, reports = run_readers(mshares, timeout=self.args.step_timeout)
                    reqs = self.since(before)
                for share, rep in zip(shares, reports):
                    for k, got in zip(share, rep["files"]):
                        if got != want[k]:
                            r.failed = "wrong data" if got[0] != "errno" else f"errno {got[1]}"
                            raise self.error(f"{p} processes: {k} read as {got}, expected {want[k]}")
                r.ours = wall
                r.extra.update(requests=reqs)
                if reqs is not None:
                    r.ours_note = fmt_requests(reqs)
                msg += (f"; {plural(p, 'process')} through the mount: {wall:.2f} s ({r.ours / base:.2f}x)"
                        + (f" ({fmt_requests(reqs)})" if reqs is not None else "") + ", data checked")
            self.log(msg)

    # ------------------------------------------------------------------ sequential readers

    def seq_check(self, m, objs: SliceObjects, n: int, row) -> None:
        """Every object read again through the mount (untimed), its crc32 against the data."""
        paths = [os.path.join(m.mountpoint, k) for k in objs.keys[:n]]
        with self.watchdog("checking the data read"), ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: read_all(p, crc=True), paths))
        for i, (size, crc) in enumerate(got):
            if (size, crc) != (objs.size, objs.crcs[i]):
                row.failed = "wrong data"
                raise self.error(f"{objs.keys[i]}: read {size} bytes with crc32 {crc:#x} through the mount, "
                                 f"expected {objs.size} with {objs.crcs[i]:#x}")

    def sequential(self, ms: int) -> None:
        r = self.b.rows[f"load_seq_{ms}"]
        objs = self.seq
        total = SEQ_READERS * objs.size
        r.limit_what = f"{SEQ_READERS} concurrent boto3 download_file, one client each"
        cs = self.clients(ms, SEQ_READERS)
        dests = [os.path.join(self.b.workdir, "local", f"load-{i}.bin") for i in range(SEQ_READERS)]
        os.makedirs(os.path.dirname(dests[0]), exist_ok=True)
        os.sync()
        try:
            base, _ = at_once(SEQ_READERS, lambda i: cs[i].download_file(self.bucket, objs.keys[i], dests[i]))
            if [os.path.getsize(d) for d in dests] != [objs.size] * SEQ_READERS:
                raise self.error("concurrent download_file wrote the wrong sizes")
        finally:
            for d in dests:
                with contextlib.suppress(OSError):
                    os.unlink(d)
        r.limit = total / 1e6 / base
        msg = f"[load seq @{ms}ms] {SEQ_READERS} x download_file: {base:.2f} s = {r.limit:.0f} MB/s"
        if self.b.ours:
            with self.mount(ms, "seq") as m:
                os.sync()
                cpu0 = proc_cpu_seconds(m.pid) or 0.0
                paths = [os.path.join(m.mountpoint, k) for k in objs.keys]
                before = self.snapshot(ms)
                with self.watchdog("concurrent sequential reads"), RssSampler(m.pid) as rs:
                    wall, sizes = at_once(SEQ_READERS, lambda i: read_all(paths[i])[0])
                cpu = (proc_cpu_seconds(m.pid) or 0.0) - cpu0
                reqs = self.since(before)
                if sizes != [objs.size] * SEQ_READERS:
                    raise self.error(f"concurrent sequential reads gave {sizes} bytes")
                self.seq_check(m, objs, SEQ_READERS, r)
            r.ours = total / 1e6 / wall
            r.ours_note = f"daemon CPU {cpu / (total / 2**30):.1f} s/GiB, peak RSS {rs.peak / MiB:.0f} MiB"
            r.extra.update(seconds=wall, base_seconds=base, daemon_cpu_seconds=cpu, peak_rss_bytes=rs.peak,
                           requests=reqs)
            msg += f"; through the mount: {wall:.2f} s = {r.ours:.0f} MB/s ({r.ours / r.limit:.2f}x), {r.ours_note}"
            if reqs is not None:
                msg += f" ({fmt_requests(reqs)})"
        self.log(msg)

    def cpu(self, ms: int) -> None:
        """One reader reads the sequential objects one after the other, cold; then again after
        drop_caches, so that the daemon serves them from its cache files."""
        cold, warm = self.b.rows[f"load_cpu_cold_{ms}"], self.b.rows[f"load_cpu_warm_{ms}"]
        objs = self.seq
        gib = len(objs.keys) * objs.size / 2**30
        cold.limit_what = warm.limit_what = f"user+system of the daemon / GiB read ({gib:.2f} GiB)"
        if not self.b.ours:
            return
        with self.mount(ms, "cpu") as m:
            paths = [os.path.join(m.mountpoint, k) for k in objs.keys]
            for row, label in ((cold, "cold"), (warm, "warm")):
                if label == "warm":
                    if self.b.drop_reason:
                        warm.skipped = self.b.drop_reason
                        break
                    drop_caches()
                cpu0 = proc_cpu_seconds(m.pid) or 0.0
                t = time.perf_counter()
                with self.watchdog(f"{label} sequential read"):
                    got = [read_all(p, crc=True) for p in paths]
                dt = time.perf_counter() - t
                row.ours = ((proc_cpu_seconds(m.pid) or 0.0) - cpu0) / gib
                row.ours_note = f"{gib * 2**30 / 1e6 / dt:.0f} MB/s incl. crc32"
                if got != [(objs.size, c) for c in objs.crcs]:
                    row.failed = "wrong data"
                    raise self.error(f"{label} sequential read: data differs from the objects")
                self.log(f"[load cpu @{ms}ms] {label}: daemon {row.ours:.2f} CPU s per GiB, {row.ours_note}")
        self.b.warm_server()

    def rss(self, ms: int) -> None:
        objs = self.many
        for n in RSS_READERS:
            r = self.b.rows[f"load_rss{n}_{ms}"]
            r.limit_what = "VmHWM of the daemon, fresh mount"
            if not self.b.ours:
                continue
            with self.mount(ms, f"rss{n}") as m:
                paths = [os.path.join(m.mountpoint, k) for k in objs.keys[:n]]
                with self.watchdog(f"{n} sequential readers"), RssSampler(m.pid) as rs:
                    wall, sizes = at_once(n, lambda i, paths=paths: read_all(paths[i])[0])
                if sizes != [objs.size] * n:
                    raise self.error(f"{n} sequential readers got {sorted(set(sizes))} bytes")
                self.seq_check(m, objs, n, r)
            r.ours = rs.peak / MiB
            r.ours_note = f"{n * objs.size / 1e6 / wall:.0f} MB/s"
            self.log(f"[load rss @{ms}ms] {n} readers of {objs.size / MiB:.0f} MiB: {wall:.2f} s, "
                     f"daemon peak RSS {r.ours:.0f} MiB, data checked")

    # ------------------------------------------------------------------ samtools

    def bam_setup(self) -> None:
        """A coordinate-sorted, indexed BAM from tests/biodata.py, its 16 regions, their counts
        on the local copy, and for each a byte range of the BAM of about the region's size."""
        self.bam_skip = None
        if not self.b.ours:
            return
        tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
        sys.path.insert(0, tests)
        try:
            import biodata
        except ImportError as e:
            self.bam_skip = f"cannot import tests/biodata.py: {e}"
            return
        finally:
            sys.path.remove(tests)
        if not biodata.HAVE_SAMTOOLS:
            self.bam_skip = "samtools is not installed"
            return
        t = time.monotonic()
        n_reads = 30_000 if self.args.quick else 300_000
        self.bamfiles = biodata.make_bam(os.path.join(self.b.workdir, "local", "bam"), n_reads=n_reads)
        self.bam_size = self.bamfiles.bam.stat().st_size
        self.bam_keys = [BAM_PREFIX + p.name for p in self.bamfiles.paths]
        for p, k in zip(self.bamfiles.paths, self.bam_keys):
            self.s3_up.upload_file(str(p), self.bucket, k)
        genome = sum(self.bamfiles.refs.values())
        self.regions, self.ranges = [], []
        for i in range(BAM_QUERIES):
            g = int((i + 0.5) * genome / BAM_QUERIES)
            for name, length in self.bamfiles.refs.items():
                chrom = name
                if g < length:
                    break
                g -= length
            start = max(1, min(g, length - BAM_REGION))
            self.regions.append(f"{chrom}:{start}-{start + BAM_REGION - 1}")
            off = int((i + 0.5) * self.bam_size / BAM_QUERIES)
            size = min(self.bam_size - off, self.bam_size * BAM_REGION // genome + 65536)
            self.ranges.append((off, size))
        self.bam_counts = [biodata.samtools_count(self.bamfiles.bam, reg) for reg in self.regions]
        self.log(f"load: BAM of {self.bam_size / MiB:.1f} MiB ({n_reads} reads) with .bai uploaded, "
                 f"{BAM_QUERIES} regions of {BAM_REGION} bases ({min(self.bam_counts)}-{max(self.bam_counts)} "
                 f"reads each; raw GETs of {self.ranges[0][1] / 1024:.0f} KiB) in {time.monotonic() - t:.1f} s")

    def bam_queries(self, path: str) -> list[float]:
        def one(i):
            t = time.perf_counter()
            r = subprocess.run(["samtools", "view", "-c", path, self.regions[i]], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=self.args.step_timeout)
            dt = time.perf_counter() - t
            out = r.stdout.strip()
            if r.returncode != 0 or out != str(self.bam_counts[i]).encode():
                raise self.error(f"samtools view -c {path} {self.regions[i]}: exit {r.returncode}, {out!r} "
                                 f"(local copy: {self.bam_counts[i]}): {r.stderr.decode(errors='replace')[-300:]}")
            return dt

        with self.watchdog("samtools region queries"):
            return at_once(BAM_QUERIES, one)[1]

    def bam(self, ms: int) -> None:
        rows = {(w, q): self.b.rows[f"load_bam_{w}_{q}_{ms}"] for w in ("cold", "warm") for q in ("p50", "p99")}
        if self.bam_skip or not self.b.ours:
            for row in rows.values():
                row.skipped = self.bam_skip or "baseline only"
            return
        cs = self.clients(ms, BAM_QUERIES)
        bam_key = self.bam_keys[0]

        def get(i):
            off, size = self.ranges[i]
            t = time.perf_counter()
            body = cs[i].get_object(Bucket=self.bucket, Key=bam_key, Range=f"bytes={off}-{off + size - 1}")["Body"]
            n = len(body.read())
            if n != size:
                raise self.error(f"ranged GET of {size} bytes returned {n}")
            return time.perf_counter() - t

        raw = at_once(BAM_QUERIES, get)[1]
        with self.mount(ms, "bam") as m:
            path = os.path.join(m.mountpoint, bam_key)
            lat, reqs = {}, {}
            for when in ("cold", "warm"):
                before = self.snapshot(ms)
                lat[when] = self.bam_queries(path)
                reqs[when] = self.since(before)
            with self.watchdog("checking the BAM"):
                same = read_all(path, crc=True) == read_all(str(self.bamfiles.bam), crc=True)
        if not same:
            rows["warm", "p50"].failed = "wrong data"
            raise self.error("the BAM read through the mount differs from the local copy")
        for (w, q), row in rows.items():
            pq = 50 if q == "p50" else 99
            row.ours, row.limit = percentile(lat[w], pq), percentile(raw, pq)
            row.limit_what = f"{BAM_QUERIES} concurrent raw ranged GETs of {self.ranges[0][1] / 1024:.0f} KiB, {q}"
            row.extra.update(seconds=lat[w], base_seconds=raw, requests=reqs[w])
            if reqs[w] is not None and q == "p50":
                row.ours_note = fmt_requests(reqs[w])
        self.log(f"[load bam @{ms}ms] samtools p50/p99 cold {rows['cold', 'p50'].ours:.3f}/"
                 f"{rows['cold', 'p99'].ours:.3f} s, warm {rows['warm', 'p50'].ours:.3f}/{rows['warm', 'p99'].ours:.3f}"
                 f" s; raw GETs {percentile(raw, 50):.3f}/{percentile(raw, 99):.3f} s; counts and bytes checked"
                 + (f"; requests cold: {fmt_requests(reqs['cold'])}, warm: {fmt_requests(reqs['warm'])}"
                    if ms else ""))


# =========================================================================== child processes


def _main(argv: list[str]) -> int:
    if argv[:1] == ["delay-proxy"] and len(argv) == 4:
        _serve_delay_proxy(argv[1], int(argv[2]), int(argv[3]))
        return 0
    if argv == ["read-worker"]:
        return _read_worker()
    print("usage: _bench_load.py delay-proxy HOST PORT MS | read-worker  (started by scripts/bench)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
