"""What each metadata operation costs in S3 requests, before and after the metadata TTL.

A real mount, pointed at a recording proxy (tests/proxy.py) in front of moto_server, with a
short TTL. Expiry is waited for by repeating the operation until it makes the mount ask S3:
each call before that must cost nothing (the kernel's cache or a fresh listing answers), and the
call that asks shows what one revalidation costs. Each test checks a row of the table in
docs/SEMANTICS.md ("What metadata costs").
"""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
import urllib.parse
from collections.abc import Callable

import pytest

import helpers
from proxy import HttpProxy

pytestmark = pytest.mark.timeout(120)

TTL = 1.0  # seconds: short, so that tests wait little for expiry


def put_many(s3, bucket: str, objects: dict[str, bytes]) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]),
                      objects.items()))


def request_of(method: str, path: str, bucket: str) -> tuple[str, str]:
    """("HEAD", key), ("GET", key), ("LIST", prefix), or the method and path for the rest."""
    url = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qs(url.query)
    target = urllib.parse.unquote(url.path)
    if target.startswith(f"/{bucket}/") and method in ("HEAD", "GET"):
        return method, target[len(bucket) + 2:]
    if target.rstrip("/") == f"/{bucket}" and method == "GET" and "list-type" in query:
        return "LIST", query.get("prefix", [""])[0]
    return method, path


class Requests:
    """The requests the mount sent through ``proxy`` to ``bucket``, from a mark on."""

    def __init__(self, proxy: HttpProxy, bucket: str):
        self.proxy, self.bucket = proxy, bucket

    def mark(self) -> int:
        return len(self.proxy.recorded)

    def since(self, mark: int) -> list[tuple[str, str]]:
        return [request_of(r.method, r.path, self.bucket) for r in self.proxy.recorded[mark:]]

    def quiet(self, quiet: float = 0.3, timeout: float = 15.0) -> None:
        """Wait until no request has come for ``quiet`` seconds (read-ahead, prefetch done)."""
        last = [self.mark(), time.monotonic()]

        def settled() -> bool:
            now = self.mark()
            if now != last[0]:
                last[:] = [now, time.monotonic()]
                return False
            return time.monotonic() - last[1] >= quiet
        helpers.wait_for(settled, timeout=timeout, interval=0.05, message="the mount to go quiet")

    def during(self, action: Callable[[], object]) -> list[tuple[str, str]]:
        """What ``action`` (and what it set off) sent."""
        mark = self.mark()
        action()
        self.quiet()
        return self.since(mark)

    def until_asked(self, action: Callable[[], object], timeout: float = 10 * TTL + 10
                    ) -> tuple[int, list[tuple[str, str]]]:
        """Repeat ``action`` until it sends a request: (how many calls sent none first, what
        the one that did sent)."""
        deadline = time.monotonic() + timeout
        free = 0
        while time.monotonic() < deadline:
            mark = self.mark()
            try:
                action()
            except FileNotFoundError:
                pass
            if self.mark() != mark:
                self.quiet()
                return free, self.since(mark)
            free += 1
            time.sleep(0.02)
        raise AssertionError(f"no request sent in {timeout} s")

    def until_settled(self, action: Callable[[], object]) -> tuple[int, list[tuple[str, str]]]:
        """``until_asked``, then repeat ``action`` until a call sends nothing again: names the
        kernel learnt a few milliseconds apart expire a few milliseconds apart."""
        free, sent = self.until_asked(action)
        while more := self.during(action):
            sent += more
        return free, sent


@pytest.fixture
def counted(s3_proxy, mount, bucket):
    """A mount through the recording proxy, with the short TTL, and its request counter."""
    def make(ttl: float = TTL, proxy: HttpProxy | None = None):
        p = proxy or s3_proxy
        m = mount(bucket=bucket, endpoint_url=p.url, extra_args=["--metadata-ttl", str(ttl)])
        return m, Requests(p, bucket)
    return make


class Dir:
    """A directory of the mount held open, to name files relative to it: the kernel then
    revalidates only the last name, not each directory on the path (see
    test_path_walk_after_the_ttl_is_one_list_per_directory)."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.fd)

    def stat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd)

    def missing(self, name: str) -> None:
        with pytest.raises(FileNotFoundError):
            os.stat(name, dir_fd=self.fd)

    def read(self, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        try:
            out = b""
            while chunk := os.read(fd, 1 << 20):
                out += chunk
            return out
        finally:
            os.close(fd)

    def listdir(self, name: str) -> list[str]:
        """A new open (opendir) of ``name``: its listing, as readdir hands it out."""
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.fd)
        try:
            return sorted(os.listdir(fd))
        finally:
            os.close(fd)


@pytest.fixture
def opened():
    dirs: list[Dir] = []

    def open_dir(path) -> Dir:
        dirs.append(Dir(path))
        return dirs[-1]
    yield open_dir
    for d in dirs:  # before the mount's teardown unmounts it
        d.close()


# ------------------------------------------------------------------ single operations


def test_stat_of_a_listed_file_after_the_ttl_is_one_head(counted, opened, s3, bucket):
    """Within the TTL a listed file's stat costs nothing; after it, one HEAD (no LIST), and the
    open that follows reuses that HEAD's ETag: a cold `cat` costs the HEAD and the GET."""
    put_many(s3, bucket, {"d/a.txt": b"alpha\n", "d/b.txt": b"beta\n"})
    m, req = counted()
    d = opened(m.path / "d")
    assert d.listdir(".") == ["a.txt", "b.txt"]
    req.quiet()
    free, sent = req.until_asked(lambda: d.stat("a.txt"))
    assert free >= 1  # the stats within the TTL cost nothing
    assert sent == [("HEAD", "d/a.txt")]
    assert req.during(lambda: d.read("a.txt")) == [("GET", "d/a.txt")]


def test_stat_of_a_listed_directory_after_the_ttl_is_one_list_that_readdir_reuses(
        counted, opened, s3, bucket):
    """A directory the listing showed is revalidated with one LIST of it, kept as its listing:
    the `ls` that follows costs nothing."""
    put_many(s3, bucket, {"d/sub/x": b"x", "d/sub/y": b"y", "d/sub/deeper/z": b"z"})
    m, req = counted()
    d = opened(m.path / "d")
    assert d.listdir(".") == ["sub"]
    req.quiet()
    free, sent = req.until_asked(lambda: d.stat("sub"))
    assert free >= 1
    assert sent == [("LIST", "d/sub/")]
    names: list[str] = []
    assert req.during(lambda: names.extend(d.listdir("sub"))) == []
    assert names == ["deeper", "x", "y"]


def test_lookup_of_a_directory_of_a_few_pages_lists_it_all_for_the_names_opened_next(
        counted, opened, s3, bucket):
    """The lookup of a directory larger than one LIST page answers with the first page and
    fetches the rest in the background: the names opened in it next, past the first page too,
    cost no lookup request (programs opening files by name, each a HEAD and a LIST otherwise,
    which the kernel sends one at a time per directory)."""
    put_many(s3, bucket, {f"w/k{i:04d}": b"%d" % i for i in range(1500)})
    m, req = counted(ttl=60)
    sent = req.during(lambda: os.stat(m.path / "w"))
    assert sorted(sent) == [("HEAD", "w"), ("LIST", "w/"), ("LIST", "w/")]
    d = opened(m.path / "w")
    assert req.during(lambda: [d.stat(f"k{i:04d}") for i in (0, 999, 1000, 1499)]) == []
    data: list[bytes] = []
    assert req.during(lambda: data.append(d.read("k1234"))) == [("GET", "w/k1234")]
    assert data == [b"1234"]
    assert req.during(lambda: d.missing("k1500")) == []  # the listing says it is not there


def test_missing_name_costs_nothing_within_the_ttl_and_head_and_list_after(counted, opened, s3,
                                                                           bucket):
    """A name the fresh listing does not show: no request. After the TTL: a HEAD and a LIST
    (the name may have become a file or a directory), then nothing for a TTL (negative cache)."""
    put_many(s3, bucket, {"d/a.txt": b"alpha\n"})
    m, req = counted()
    d = opened(m.path / "d")
    assert d.listdir(".") == ["a.txt"]
    req.quiet()
    free, sent = req.until_asked(lambda: d.missing("nope"))
    assert free >= 1
    assert sorted(sent) == [("HEAD", "d/nope"), ("LIST", "d/nope/")]
    assert req.during(lambda: d.missing("nope")) == []


def test_readdir_within_the_ttl_is_free_and_one_list_after(counted, opened, s3, bucket):
    put_many(s3, bucket, {f"d/f{i}": b"x" for i in range(5)})
    m, req = counted()
    d = opened(m.path / "d")
    assert len(d.listdir(".")) == 5
    req.quiet()
    free, sent = req.until_asked(lambda: d.listdir("."))
    assert free >= 1
    assert sent == [("LIST", "d/")]


def test_open_of_a_cached_file(counted, opened, s3, bucket):
    """Within the listing's TTL an open of a cached file sends nothing; after it, one HEAD (by
    the lookup or by the open, never both) and no GET; an open right after that asks again."""
    put_many(s3, bucket, {"d/a.txt": b"alpha\n"})
    m, req = counted()
    d = opened(m.path / "d")
    assert d.listdir(".") == ["a.txt"]
    assert d.read("a.txt") == b"alpha\n"  # cached now
    req.quiet()
    free, sent = req.until_asked(lambda: d.read("a.txt"))
    assert free >= 1  # opened within the TTL: no request
    assert sent == [("HEAD", "d/a.txt")]
    # again at once: the kernel still knows the name, and this open asks S3 (a HEAD)
    assert req.during(lambda: d.read("a.txt")) == [("HEAD", "d/a.txt")]


def test_open_of_an_uncached_file(counted, opened, s3, bucket):
    """Within the listing's TTL: the GET only. After it, `cat` (lookup, then open): the
    lookup's HEAD and the GET."""
    put_many(s3, bucket, {"d/a.txt": b"alpha\n", "d/b.txt": b"beta\n", "d/c.txt": b"gamma\n"})
    m, req = counted()
    d = opened(m.path / "d")
    assert d.listdir(".") == ["a.txt", "b.txt", "c.txt"]
    # (the last of the listing: no sibling prefetch, see test_read.py)
    assert req.during(lambda: d.read("c.txt")) == [("GET", "d/c.txt")]
    _, sent = req.until_asked(lambda: d.stat("b.txt"))
    assert sent == [("HEAD", "d/b.txt")]
    assert req.during(lambda: d.read("b.txt")) == [("GET", "d/b.txt")]


def test_path_walk_after_the_ttl(counted, s3, bucket):
    """`stat d/e/f` after the TTL: the kernel asks again for each name on the path. `d` costs a
    LIST of it, which then answers `e` at no cost; `f` costs its HEAD."""
    put_many(s3, bucket, {"d/e/f": b"f", "d/e/g": b"g"})
    m, req = counted()
    f = m.path / "d" / "e" / "f"
    assert os.stat(f).st_size == 1
    req.quiet()
    free, sent = req.until_settled(lambda: os.stat(f))
    assert free >= 1
    assert sorted(sent) == [("HEAD", "d/e/f"), ("LIST", "d/")]


# ------------------------------------------------------------------ walks


def tree(dirs: int, subdirs: int, files: int) -> dict[str, bytes]:
    return {f"t/d{i}/s{j}/f{k}": b"%d" % k for i in range(dirs) for j in range(subdirs)
            for k in range(files)}


def run(*argv: str, cwd) -> str:
    r = subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tree_walked_again_within_the_ttl_is_not_listed_again(counted, s3, bucket):
    objects = tree(3, 3, 4)
    put_many(s3, bucket, objects)
    m, req = counted(ttl=60)
    out: list[str] = []
    first = req.during(lambda: out.append(run("find", ".", "-type", "f", cwd=m.path / "t")))
    assert len(out[0].split()) == len(objects)
    # "t" is looked up first (a HEAD, and a LIST of t/ that its readdir then uses); then one
    # LIST for each directory
    assert sorted(first) == sorted([("HEAD", "t"), ("LIST", "t/")]
                                   + [("LIST", f"t/d{i}/") for i in range(3)]
                                   + [("LIST", f"t/d{i}/s{j}/") for i in range(3) for j in range(3)])
    assert req.during(lambda: run("find", ".", "-type", "f", cwd=m.path / "t")) == []
    assert req.during(lambda: run("du", "-s", ".", cwd=m.path / "t")) == []


class SlowListProxy(HttpProxy):
    """Delays each LIST by ``delay`` seconds, so that a walk outlasts the TTL."""

    list_delay = 0.06

    def _choose(self, method, path, headers):
        if method == "GET" and "list-type=" in path:
            time.sleep(self.list_delay)
        return super()._choose(method, path, headers)


@pytest.fixture
def slow_proxy(moto_server):
    proxy = SlowListProxy(moto_server.host, moto_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


def test_du_after_find_costs_no_more_than_the_find(slow_proxy, counted, s3, bucket):
    """`find` walks longer than the TTL; the `du -s` right after it sends no more requests
    than the `find` did, and no HEAD at all."""
    objects = tree(4, 6, 3)  # 29 directories, 72 files
    put_many(s3, bucket, objects)
    m, req = counted(ttl=TTL, proxy=slow_proxy)
    t = m.path / "t"
    assert os.listdir(m.path) == ["t"]
    start = time.monotonic()
    found: list[str] = []
    by_find = req.during(lambda: found.append(run("find", ".", "-type", "f", cwd=t)))
    took = time.monotonic() - start
    assert took > TTL, f"find took {took:.2f} s: the walk must outlast the TTL for this test"
    assert len(found[0].split()) == len(objects)
    used: list[str] = []
    by_du = req.during(lambda: used.append(run("du", "-s", "--apparent-size", "-B1", ".",
                                               cwd=t)))
    assert int(used[0].split()[0]) == sum(len(v) for v in objects.values())
    print(f"find: {took:.2f} s, {len(by_find)} requests; du: {len(by_du)} requests")
    assert len(by_du) <= len(by_find), (by_find, by_du)
    assert not [r for r in by_du if r[0] != "LIST"], by_du
    assert not [r for r in by_find if r[0] != "LIST"], by_find


# ------------------------------------------------------------------ correctness


def test_changes_in_s3_are_seen_after_the_ttl(counted, s3, bucket):
    """Revalidating with one request still sees every change: a file changed, one deleted, a
    file become a directory and a directory become a file."""
    put_many(s3, bucket, {"d/changed": b"old\n", "d/deleted": b"here\n", "d/became-dir": b"f",
                          "d/became-file/x": b"x"})
    m, _ = counted()
    d = m.path / "d"
    assert sorted(os.listdir(d)) == ["became-dir", "became-file", "changed", "deleted"]
    assert (d / "changed").read_bytes() == b"old\n"
    assert os.path.isfile(d / "became-dir") and os.path.isdir(d / "became-file")
    put_many(s3, bucket, {"d/changed": b"new and longer\n", "d/became-dir/y": b"y",
                          "d/became-file": b"file now"})
    for key in ("d/deleted", "d/became-dir", "d/became-file/x"):
        s3.delete_object(Bucket=bucket, Key=key)
    helpers.wait_for(lambda: os.stat(d / "changed").st_size == len(b"new and longer\n"),
                     timeout=10 * TTL + 10, message="the new size after the TTL")
    assert (d / "changed").read_bytes() == b"new and longer\n"
    helpers.wait_for(lambda: not os.path.exists(d / "deleted"), timeout=10 * TTL + 10,
                     message="the deleted file to go")
    helpers.wait_for(lambda: os.path.isdir(d / "became-dir"), timeout=10 * TTL + 10,
                     message="the file that became a directory")
    assert os.listdir(d / "became-dir") == ["y"]
    helpers.wait_for(lambda: os.path.isfile(d / "became-file"), timeout=10 * TTL + 10,
                     message="the directory that became a file")
    assert (d / "became-file").read_bytes() == b"file now"
