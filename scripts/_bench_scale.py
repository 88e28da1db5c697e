"""The scale workloads of ``scripts/bench`` (``--only scale``, ``--scale N``: default 100,000;
--quick: 5,000), each beside a limit measured in the same run:

  one directory of N keys (scale/flat/): ``ls -f`` and ``ls -l``, cold (fresh mount and cache)
      and warm (again on the same mount), against the boto3 list_objects_v2 paginator
      (Delimiter='/', all pages); then the daemon's VmRSS, also as MiB per 100,000 inodes, and
      what it grew by since the mount, per 100,000 inodes
  a tree of N keys in 1,000 directories (scale/tree/dNNN/): ``find . -type f`` on a fresh
      mount, then ``du -s`` right after, against the paginator over the whole tree (no
      Delimiter: the cheapest way to learn every key); du is compared with the find
  a cache holding N objects, made by reading the N keys of scale/flat/ through a mount once
      (8 threads, after one listing, with --metadata-ttl 86400 so that each read costs a GET
      only; the time is printed): the per-object cold read cost of objects not in it
      (listdir, then open/read/close each, of the tree directories holding the first 1,000
      tree keys, at least 10 directories) against the same on an empty cache (as many other
      tree directories, before and after: the better of the two); the time of ``s3stashfs mount``
      (command start until it returns, mounted) and of ``s3stashfs status MOUNTPOINT`` (best
      of 3) with that cache, beside the same with an empty one
  eviction: that cache mounted again with --cache-max-size 10,000 objects' worth below what it
      holds (min(10,000, N/2) at --quick sizes) and --metadata-ttl 86400: time from the mount
      command's start until the catalog's running total is under the limit, and the longest
      open+read+close of one cached object by a concurrent reader meanwhile (it reads the tree
      objects read last through the big cache, which eviction keeps, of 5 directories, after
      listing them, so that no read asks S3)

The package is byte-compiled first (as pip install does; see compile_package).  Every key
holds its own name and a newline; the 2 x N objects are uploaded once, by 32 threads
of one boto3 client, and reused by every workload.  Targets: cold listings <= 1.3 x (warm ones
too: the issue names none), RSS <= 150 MiB, find <= 1.3 x its limit (the issue names none),
du <= 1.0 x the find, per-object cold read <= 1.1 x, mount <= 1 s, status <= 0.5 s, eviction
back under the limit <= 10 s (the issue names none) with no read stalled more than 0.1 s.
"""
from __future__ import annotations

import compileall
import importlib.util
import os
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import resource

from _mount import Mount, proc_cpu_seconds, proc_status

MiB = 1 << 20
FLAT = "scale/flat/"
TREE = "scale/tree/"
TREE_DIRS = 1000
PROBE_OBJECTS = 1000  # objects (at least 10 tree directories) read one by one, per cache state
UPLOAD_THREADS = 32
FILL_THREADS = 8
EVICT_OVER = 10_000   # objects over the limit
HOT_READS = 1000      # the concurrent reader's objects: the newest of the cache,
HOT_DIRS = 5          # in at most this many tree directories
C_ENV = dict(os.environ, LC_ALL="C")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def body(key: str) -> bytes:
    return key.encode() + b"\n"


class ScaleBench:
    """Runs inside a ``Bench``: its server, mounter, rows, args, log and error type."""

    def __init__(self, bench, bucket: str, n: int, log, error):
        self.b = bench
        self.bucket = bucket
        self.n = n
        self.log = log
        self.error = error
        self.flat = [f"{FLAT}k{i:06d}" for i in range(n)]
        per_dir = max(1, n // TREE_DIRS)
        self.tree = [f"{TREE}d{i % TREE_DIRS:03d}/k{i:06d}" for i in range(n)]
        self.dirs = min(TREE_DIRS, n)
        self.per_dir = per_dir
        self.evict_over = min(EVICT_OVER, n // 2)
        self.probe_dirs = min(self.dirs // 3, max(10, PROBE_OBJECTS // per_dir))
        self.uploaded = False

    # ------------------------------------------------------------------ rows
    def define_rows(self):
        n = f"{self.n:,}"
        row = self.b.row
        for cmd in ("f", "l"):
            for state in ("cold", "warm"):
                row(f"scale_ls{cmd}_{state}", workload=f"ls -{cmd} of {n} keys in one directory, {state}",
                    unit="s", better="lower", target=1.3)
        row("scale_rss", workload=f"daemon RSS after ls -l of {n} keys", unit="MiB", better="lower",
            target=150.0, absolute=True)
        row("scale_find", workload=f"find -type f, {n} keys in {self.dirs:,} dirs, cold", unit="s",
            better="lower", target=1.3)
        row("scale_du", workload="du -s of that tree right after the find", unit="s", better="lower",
            target=1.0)
        row("scale_obj", workload=f"cold read per object, {n} objects cached", unit="ms", better="lower",
            target=1.1)
        row("scale_mount", workload=f"s3stashfs mount, {n} objects cached", unit="s", better="lower",
            target=1.0, absolute=True)
        row("scale_status", workload=f"s3stashfs status, {n} objects cached", unit="s", better="lower",
            target=0.5, absolute=True)
        row("scale_evict", workload=f"eviction of {self.evict_over:,} objects: back under the limit",
            unit="s", better="lower", target=10.0, absolute=True)
        row("scale_stall", workload="longest cached read during that eviction", unit="s", better="lower",
            target=0.1, absolute=True)

    # ------------------------------------------------------------------ data
    def upload(self):
        if self.uploaded:
            return
        s3 = self.b.s3_up
        have = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="scale/"):
            have += len(page.get("Contents", ()))
        if have == 2 * self.n:
            self.uploaded = True
            return
        t = time.monotonic()
        keys = self.flat + self.tree
        with ThreadPoolExecutor(UPLOAD_THREADS) as ex:
            for _ in ex.map(lambda k: s3.put_object(Bucket=self.bucket, Key=k, Body=body(k)), keys,
                            chunksize=64):
                pass
        dt = time.monotonic() - t
        self.log(f"[scale] uploaded {len(keys):,} objects in {dt:.1f} s ({len(keys) / dt:.0f}/s)")
        self.uploaded = True

    def raw_list(self, prefix: str, delimiter: bool, expect: int) -> float:
        s3 = self.b.s3
        s3.head_bucket(Bucket=self.bucket)
        kw = {"Delimiter": "/"} if delimiter else {}
        t = time.perf_counter()
        got = 0
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, **kw):
            got += len(page.get("Contents", ())) + len(page.get("CommonPrefixes", ()))
        dt = time.perf_counter() - t
        if got != expect:
            raise self.error(f"ListObjectsV2 of {prefix}: {got} entries, expected {expect}")
        return dt

    # ------------------------------------------------------------------ helpers
    def timed(self, argv: list[str], what: str, cwd: str | None = None) -> tuple[float, bytes]:
        with self.b.mounter.watchdog(self.b.args.step_timeout, what):
            t = time.perf_counter()
            r = subprocess.run(argv, capture_output=True, env=C_ENV, cwd=cwd)
            dt = time.perf_counter() - t
        if r.returncode != 0:
            raise self.error(f"{what}: {' '.join(argv)} exited {r.returncode}: "
                             f"{r.stderr[-300:].decode(errors='replace')}")
        return dt, r.stdout

    def ls(self, flag: str, path: str, what: str) -> float:
        dt, out = self.timed(["ls", flag, path], what)
        if flag == "-f":  # the names, and . and .. where the file system lists them
            lines = sum(1 for name in out.split(b"\n") if name not in (b"", b".", b".."))
        else:
            lines = out.count(b"\n") - 1  # minus "total N"
        if lines != self.n:
            raise self.error(f"{what}: {lines} entries, expected {self.n}")
        return dt

    def read_dirs(self, m: Mount, dirs: list[int], what: str) -> tuple[float, int]:
        """listdir, then open/read/close each object, of these tree directories: (s, objects)."""
        n = 0
        with self.b.mounter.watchdog(self.b.args.step_timeout, what):
            t = time.perf_counter()
            for d in dirs:
                path = os.path.join(m.mountpoint, TREE, f"d{d:03d}")
                for name in os.listdir(path):
                    with open(os.path.join(path, name), "rb", buffering=0) as f:
                        data = f.read()
                    if data != body(f"{TREE}d{d:03d}/{name}"):
                        raise self.error(f"{what}: wrong bytes in d{d:03d}/{name}")
                    n += 1
            return time.perf_counter() - t, n

    def status_time(self, m: Mount) -> tuple[float, float]:
        """(best wall time, its CPU seconds) of `s3stashfs status MOUNTPOINT`, of 3."""
        best = (float("inf"), 0.0)
        for _ in range(3):
            cpu = children_cpu()
            dt, _ = self.timed([*self.b.args.mount_cmd, "status", m.mountpoint], "status")
            best = min(best, (dt, children_cpu() - cpu))
        return best

    def mount_cpu(self, m: Mount, before: float) -> str:
        """The CPU seconds of a mount's start, which the wall time on a busy machine hides:
        of the command (the parent) and of its daemon so far (it answered just now)."""
        daemon = proc_cpu_seconds(m.pid)
        return f"CPU: command {children_cpu() - before:.2f} s, daemon {daemon or 0:.2f} s so far"

    @staticmethod
    def catalog(cache_dir: str, sql: str):
        con = sqlite3.connect(f"file:{os.path.join(cache_dir, 'catalog.sqlite3')}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(sql).fetchone()
        finally:
            con.close()

    # ------------------------------------------------------------------ workloads
    def listing(self):
        rows = self.b.rows
        base = min(self.raw_list(FLAT, True, self.n) for _ in range(2))
        for key in ("scale_lsf_cold", "scale_lsf_warm", "scale_lsl_cold", "scale_lsl_warm"):
            rows[key].limit = base
            rows[key].limit_what = "list_objects_v2 paginator, Delimiter='/'"
        path = None
        for flag in ("-f", "-l"):
            tag = flag[1]
            with self.b.mounter.mount(self.b.srv.endpoint_url, f"scale-ls{tag}") as m:
                path = os.path.join(m.mountpoint, FLAT.rstrip("/"))
                rss0 = proc_status(m.pid).get("VmRSS", 0)
                cold = self.ls(flag, path, f"ls {flag} cold")
                warm = min(self.ls(flag, path, f"ls {flag} warm") for _ in range(2))
                rows[f"scale_ls{tag}_cold"].ours = cold
                rows[f"scale_ls{tag}_warm"].ours = warm
                self.log(f"[scale] raw listing {base:.3f} s; ls {flag} cold {cold:.3f} s, warm {warm:.3f} s")
                if flag == "-l":
                    rss = proc_status(m.pid).get("VmRSS", 0)
                    r = rows["scale_rss"]
                    r.ours = rss / MiB
                    r.ours_note = (f"{rss / MiB * 100_000 / self.n:.1f} MiB per 100,000 inodes; above the "
                                   f"{rss0 / MiB:.0f} MiB of the fresh mount: "
                                   f"{(rss - rss0) / MiB * 100_000 / self.n:.1f} MiB per 100,000")
                    self.log(f"[scale] daemon RSS after ls -l: {rss / MiB:.1f} MiB")

    def tree_walk(self):
        rows = self.b.rows
        base = min(self.raw_list(TREE, False, self.n) for _ in range(2))
        rows["scale_find"].limit = base
        rows["scale_find"].limit_what = "list_objects_v2 paginator over the tree, no Delimiter"
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-tree") as m:
            root = os.path.join(m.mountpoint, TREE.rstrip("/"))
            dt_find, out = self.timed(["find", ".", "-type", "f"], "find", cwd=root)
            files = out.count(b"\n")
            if files != self.n:
                raise self.error(f"find: {files} files, expected {self.n}")
            dt_du, out = self.timed(["du", "-s", "."], "du -s", cwd=root)
        rows["scale_find"].ours = dt_find
        rows["scale_du"].ours = dt_du
        rows["scale_du"].limit = dt_find
        rows["scale_du"].limit_what = "the find just before"
        self.log(f"[scale] raw tree listing {base:.3f} s; find {dt_find:.3f} s; du -s {dt_du:.3f} s")

    def big_cache(self):
        rows = self.b.rows
        cache_dir = os.path.join(self.b.workdir, "scale-cache")
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        # the empty-cache figures: per-object cold read, mount, status
        cpu = children_cpu()
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-empty") as m:
            empty_mount, empty_cpu = m.seconds, self.mount_cpu(m, cpu)
            empty_dt, k = self.read_dirs(m, list(range(self.probe_dirs)), "cold reads, empty cache")
            empty_status = self.status_time(m)
        empty_per = empty_dt / k * 1000
        # fill: read every flat key once through a mount
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-fill", cache_dir=cache_dir,
                                  extra_args=["--metadata-ttl", "86400"]) as m:
            flat = os.path.join(m.mountpoint, FLAT.rstrip("/"))
            with self.b.mounter.watchdog(self.b.args.step_timeout * 4, "filling the cache"):
                t = time.monotonic()
                names = os.listdir(flat)

                def read(name):
                    with open(os.path.join(flat, name), "rb", buffering=0) as f:
                        return len(f.read())
                with ThreadPoolExecutor(FILL_THREADS) as ex:
                    sum(ex.map(read, names, chunksize=64))
                fill = time.monotonic() - t
        objects, held = self.catalog(cache_dir, "SELECT count(*), coalesce(sum(held), 0) FROM objects WHERE held > 0")
        self.log(f"[scale] filled the cache: {objects:,} objects, {held / MiB:.1f} MiB in {fill:.1f} s")
        if objects < self.n:
            raise self.error(f"the cache holds {objects} objects after reading {self.n}")
        cpu = children_cpu()
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-big", cache_dir=cache_dir) as m:
            big_mount, big_cpu = m.seconds, self.mount_cpu(m, cpu)
            dirs = list(range(self.probe_dirs, 2 * self.probe_dirs))
            big_dt, k = self.read_dirs(m, dirs, f"cold reads, {objects} cached")
            big_status = self.status_time(m)
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-empty2") as m:
            again, k2 = self.read_dirs(m, list(range(2 * self.probe_dirs, 3 * self.probe_dirs)),
                                       "cold reads, empty cache again")
        empty_per = min(empty_per, again / k2 * 1000)
        big_per = big_dt / k * 1000
        r = rows["scale_obj"]
        r.ours, r.limit = round(big_per, 3), round(empty_per, 3)
        r.limit_what = "the same on an empty cache"
        r.ours_note = f"{k} objects; the cache filled in {fill:.0f} s by reading through a mount"
        r = rows["scale_mount"]
        r.ours, r.ours_note = big_mount, big_cpu
        r.limit_what = f"empty cache: {empty_mount:.3f} s, {empty_cpu}"
        r = rows["scale_status"]
        r.ours, r.ours_note = big_status[0], f"CPU {big_status[1]:.2f} s"
        r.limit_what = f"empty cache: {empty_status[0]:.3f} s, CPU {empty_status[1]:.2f} s"
        self.log(f"[scale] per-object cold read {empty_per:.2f} ms empty, {big_per:.2f} ms with {objects:,} "
                 f"cached; mount {empty_mount:.3f} s ({empty_cpu}) / {big_mount:.3f} s ({big_cpu}); "
                 f"status {empty_status[0]:.3f} / {big_status[0]:.3f} s")
        self.eviction(cache_dir, objects, held)

    def eviction(self, cache_dir: str, objects: int, held: int):
        rows = self.b.rows
        per = held / objects
        limit = int(held - self.evict_over * per)
        hot = self.hot_keys(cache_dir)
        dirs = sorted({k.rsplit("/", 1)[0] for k in hot})[:HOT_DIRS]  # few listings before reading
        hot = [k for k in hot if k.rsplit("/", 1)[0] in dirs]
        stalls: list[float] = []
        stop = threading.Event()
        under = threading.Event()

        def reader(mp: str):
            for d in dirs:  # their names, for the TTL's life
                os.listdir(os.path.join(mp, d))
            i = 0
            while not stop.is_set():
                key = hot[i % len(hot)]
                t = time.perf_counter()
                with open(os.path.join(mp, key), "rb", buffering=0) as f:
                    f.read()
                stalls.append(time.perf_counter() - t)
                i += 1

        t0 = time.monotonic()
        with self.b.mounter.mount(self.b.srv.endpoint_url, "scale-evict", cache_dir=cache_dir,
                                  extra_args=["--cache-max-size", str(limit), "--metadata-ttl", "86400"]) as m:
            th = threading.Thread(target=reader, args=(m.mountpoint,), daemon=True)
            th.start()
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    (total,) = self.catalog(cache_dir, "SELECT bytes FROM totals WHERE id=0")
                    if total <= limit:
                        under.set()
                        break
                    time.sleep(0.05)
                took = time.monotonic() - t0
                time.sleep(0.2)  # a few reads after it, too
            finally:
                stop.set()
                th.join(30)
        r = rows["scale_evict"]
        if not under.is_set():
            r.failed = f"still over the limit after {took:.0f} s"
        else:
            r.ours = took
            r.ours_note = f"from the mount command's start; the mount took {m.seconds:.3f} s"
        r = rows["scale_stall"]
        r.ours = max(stalls) if stalls else None
        r.ours_note = f"{len(stalls)} reads, median {sorted(stalls)[len(stalls) // 2] * 1000:.1f} ms" if stalls else ""
        self.log(f"[scale] eviction to {limit:,} bytes: {took:.2f} s; {len(stalls)} reads, longest "
                 f"{max(stalls, default=0) * 1000:.1f} ms")

    def hot_keys(self, cache_dir: str) -> list[str]:
        con = sqlite3.connect(f"file:{os.path.join(cache_dir, 'catalog.sqlite3')}?mode=ro", uri=True, timeout=5)
        try:
            return [k for (k,) in con.execute(
                "SELECT key FROM objects WHERE held > 0 AND key LIKE ? ORDER BY last_access DESC, id DESC "
                "LIMIT ?", (TREE + "%", HOT_READS))]
        finally:
            con.close()

    def compile_package(self):
        """Byte-compile the s3stashfs package, as pip does when it installs one: an editable
        install under PYTHONDONTWRITEBYTECODE=1 (this machine's) compiles every module at every
        start instead, ~0.2 s of each mount's start-up and ~0.05 s of each command's."""
        spec = importlib.util.find_spec("s3stashfs")
        if spec is None or not spec.submodule_search_locations:
            return
        where = list(spec.submodule_search_locations)[0]
        ok = compileall.compile_dir(where, quiet=1)
        self.log(f"[scale] byte-compiled {where}: {'ok' if ok else 'failed'}")

    def run(self):
        self.upload()
        self.compile_package()
        if not self.b.ours:  # --baseline-only: the limits only
            rows = self.b.rows
            rows["scale_lsl_cold"].limit = self.raw_list(FLAT, True, self.n)
            rows["scale_find"].limit = self.raw_list(TREE, False, self.n)
            return
        for name, step in (("listing", self.listing), ("tree", self.tree_walk), ("cache", self.big_cache)):
            self.b.warm_server()
            self.log(f"--- scale: {name}")
            step()
