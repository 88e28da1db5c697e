"""Directory listings through a real mount: paging, prefixes and markers, attributes
handed out by the listing (no request per file), mtimes, inode numbers.

Each test checks a claim of docs/SEMANTICS.md ("Paths and listings") through a real
s3stashfs mount against the real moto_server, counting the requests the mount sent.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import subprocess

import pytest

import helpers

pytestmark = pytest.mark.timeout(120)


def put_many(s3, bucket: str, objects: dict[str, bytes], workers: int = 16) -> None:
    """PUT every key -> bytes in parallel (moto answers a PUT in ~5-10 ms)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda kv: s3.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def walk_tree(root) -> dict[str, tuple[set[str], set[str]]]:
    """os.walk of `root` as {relative dir: (dir names, file names)}; any error raises."""

    def fail(exc: OSError) -> None:
        raise exc

    tree = {}
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        rel = os.path.relpath(dirpath, root)
        tree[rel] = (set(dirnames), set(filenames))
    return tree


def list_ops(moto_server, mark, bucket: str, prefix: str) -> list:
    return [
        r for r in moto_server.requests_since(mark, op="ListObjectsV2", bucket=bucket)
        if r.query.get("prefix", "") == prefix
    ]


# ------------------------------------------------------------------------------ paging


def test_listing_of_2500_keys(mount, bucket, s3, moto_server):
    n = 2500
    objects = {f"big/k{i:05d}": bytes([i % 251]) * (i % 97) for i in range(n)}
    sub = {
        "big/sub1/a.txt": b"a" * 11,
        "big/sub2/deeper/b.txt": b"b" * 22,
        "big/sub3/": b"",  # a marker: a directory too
    }
    put_many(s3, bucket, {**objects, **sub})
    assert len(helpers.list_keys(s3, bucket, "big/")) == n + len(sub)

    m = mount(bucket=bucket)
    big = m.path / "big"
    mark = moto_server.mark()
    assert stat.S_ISDIR(os.stat(big).st_mode)  # its LIST's first page goes on to list it all
    names = os.listdir(big)
    expected_files = {k[len("big/"):]: len(v) for k, v in objects.items()}
    expected = set(expected_files) | {"sub1", "sub2", "sub3"}
    assert len(names) == len(set(names)), "a name is listed twice"
    assert set(names) == expected, (
        f"missing {sorted(expected - set(names))[:10]}, extra {sorted(set(names) - expected)[:10]}"
    )
    lists = list_ops(moto_server, mark, bucket, "big/")
    assert len(lists) >= 3 and sum("continuation-token" in r.query for r in lists) >= 2, (
        f"2,500 keys take 3 pages of ListObjectsV2 (1,000 keys each); the mount sent "
        f"{len(lists)}: {[str(r) + ' ' + str(r.query) for r in lists]}"
    )

    sizes, dirs = {}, set()
    with os.scandir(big) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                dirs.add(entry.name)
            else:
                st = entry.stat(follow_symlinks=False)
                assert stat.S_ISREG(st.st_mode), entry.name
                sizes[entry.name] = st.st_size
    assert dirs == {"sub1", "sub2", "sub3"}
    assert sizes == expected_files
    assert os.listdir(big / "sub2") == ["deeper"]
    assert os.listdir(big / "sub3") == []
    assert (big / "sub1" / "a.txt").read_bytes() == sub["big/sub1/a.txt"]


# ------------------------------------------------------------------- prefixes, markers


def test_nested_prefixes_and_markers(mount, bucket, s3):
    files = {
        "a/b/c/d.txt": b"deep file\n",
        "a/x.txt": b"x in a\n",
        "a/b/y.txt": b"y in a/b\n",
    }
    markers = ["empty/", "a/b/marker/", "a/"]  # "a/" is a marker beside content
    put_many(s3, bucket, {**files, **{k: b"" for k in markers}})

    m = mount(bucket=bucket)
    assert walk_tree(m.path) == {
        ".": ({"a", "empty"}, set()),
        "a": ({"b"}, {"x.txt"}),
        "a/b": ({"c", "marker"}, {"y.txt"}),
        "a/b/c": (set(), {"d.txt"}),
        "a/b/marker": (set(), set()),
        "empty": (set(), set()),
    }
    for rel in ("empty", "a/b/marker", "a"):
        st = os.stat(m.path / rel)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, rel
    assert os.listdir(m.path / "empty") == []
    for key, data in files.items():
        p = m.path / key
        assert stat.S_ISREG(os.stat(p).st_mode)
        assert os.stat(p).st_size == len(data)
        assert p.read_bytes() == data, key


# ---------------------------------------------------------------- attributes by listing


def test_ls_l_sends_no_request_per_file(mount, bucket, s3, moto_server):
    sizes = {f"f{i:02d}.dat": 100 + 13 * i for i in range(50)}
    put_many(s3, bucket, {f"fifty/{name}": helpers.random_bytes(size, name) for name, size in sizes.items()})

    m = mount(bucket=bucket)
    assert "fifty" in os.listdir(m.path)  # the root's listing: the kernel knows "fifty"
    moto_server.wait_quiet(quiet=0.3)

    mark = moto_server.mark()
    r = subprocess.run(
        ["ls", "-l", "--time-style=long-iso", str(m.path / "fifty")],
        capture_output=True, stdin=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"}, timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    moto_server.wait_quiet(quiet=0.3)
    requests = moto_server.requests_since(mark)

    shown = {}
    for line in r.stdout.decode().splitlines():
        if line.startswith("total"):
            continue
        fields = line.split()
        # mode links user group size date time name
        assert len(fields) == 8 and fields[0].startswith("-rw-r--r--"), line
        shown[fields[7]] = int(fields[4])
    assert shown == sizes

    others = [str(q) for q in requests if q.op != "ListObjectsV2"]
    assert others == [], f"ls -l sent per-file requests: {others}"
    assert any(q.query.get("prefix") == "fifty/" for q in requests), [str(q) for q in requests]


# ------------------------------------------------------------------------------- mtime


def test_mtime_from_metadata(mount, bucket, s3, moto_server):
    helpers.put_object(s3, bucket, "meta.txt", b"with mtime\n", Metadata={"mtime": "1600000000"})
    helpers.put_object(s3, bucket, "plain.txt", b"without\n")
    plain_lm = s3.head_object(Bucket=bucket, Key="plain.txt")["LastModified"].timestamp()
    meta_lm = s3.head_object(Bucket=bucket, Key="meta.txt")["LastModified"].timestamp()
    assert abs(meta_lm - 1600000000) > 1e6  # the two sources of mtime are far apart

    m = mount(bucket=bucket)
    with open(m.path / "meta.txt", "rb") as f:  # an open sees the object's metadata
        assert f.read() == b"with mtime\n"
    assert os.stat(m.path / "meta.txt").st_mtime == 1600000000
    assert abs(os.stat(m.path / "plain.txt").st_mtime - plain_lm) <= 1

    # A new mount lists the directory (listings carry no metadata): the catalog still
    # knows the metadata of this ETag, without a HEAD.
    m.remount()
    mark = moto_server.mark()
    assert sorted(os.listdir(m.path)) == ["meta.txt", "plain.txt"]
    assert os.stat(m.path / "meta.txt").st_mtime == 1600000000
    assert abs(os.stat(m.path / "plain.txt").st_mtime - plain_lm) <= 1
    heads = moto_server.requests_since(mark, op="HeadObject")
    assert heads == [], [str(r) for r in heads]


# -------------------------------------------------------------------------- inode numbers


def test_inode_numbers_are_stable(mount, bucket, s3, moto_server):
    put_many(s3, bucket, {"d/f1": b"one", "d/sub/f2": b"two", "top.txt": b"top"})
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])
    paths = {rel: m.path / rel for rel in ("d", "d/f1", "d/sub", "d/sub/f2", "top.txt")}

    first = {rel: os.stat(p).st_ino for rel, p in paths.items()}
    assert len(set(first.values())) == len(first), f"two paths share an inode: {first}"
    assert os.stat(m.path).st_ino not in first.values()

    mark = moto_server.mark()
    for _ in range(3):
        assert {rel: os.stat(p).st_ino for rel, p in paths.items()} == first
        with os.scandir(m.path) as it:
            listed = {e.name: (e.inode(), e.stat().st_ino) for e in it}
        assert listed == {"d": (first["d"],) * 2, "top.txt": (first["top.txt"],) * 2}
        with os.scandir(m.path / "d") as it:
            listed = {e.name: (e.inode(), e.stat().st_ino) for e in it}
        assert listed == {"f1": (first["d/f1"],) * 2, "sub": (first["d/sub"],) * 2}
        assert [e.inode() for e in os.scandir(m.path / "d" / "sub")] == [first["d/sub/f2"]]
    # TTL 0: every lookup asked S3 again, so the numbers did not just come from a cache.
    heads = moto_server.requests_since(mark, op="HeadObject", key="d/f1")
    assert len(heads) >= 3, [str(r) for r in heads]
