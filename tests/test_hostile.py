"""Keys that are not valid paths (DESIGN.md "Paths", docs/SEMANTICS.md "Paths and listings").

A key with a component that is not a valid file name (empty, ".", "..", NUL, longer than
255 bytes) is not shown and is logged once; it never becomes a path, in the mount or in
the cache. A key `x` beside keys under `x/` is shown as the directory. All through a
real mount against the real moto_server.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

import pytest

import helpers

pytestmark = pytest.mark.timeout(120)

LONG = "n" * 300  # a 300-byte name: over NAME_MAX (255)

# key -> bytes. The hidden keys' contents must never show up anywhere.
HIDDEN = {
    "../../x": b"dot-dot escape\n",
    "a/../b": b"dot-dot in the middle\n",
    "/lead": b"leading slash\n",
    "dir//x": b"empty component\n",
    "./dot": b"dot component\n",
    LONG: b"name too long\n",
}
VISIBLE = {
    "ok.txt": b"an ordinary file\n",
    "dir/ok": b"an ordinary file in a directory\n",
    "x/inner": b"inside x\n",
}
CLASH = {"x": b"the object x, hidden by the prefix x/\n"}

# The tree a user sees: {dir: (subdirectories, files)}. `a` is there because the
# prefix "a/" exists (a prefix is a directory), but the only key under it, "a/../b",
# is hidden, so `a` lists empty. `x` is a directory: the prefix wins over the object.
VISIBLE_TREE = {
    ".": ({"a", "dir", "x"}, {"ok.txt"}),
    "a": (set(), set()),
    "dir": (set(), {"ok"}),
    "x": (set(), {"inner"}),
}

CACHE_FILE_RE = re.compile(r"(catalog\.sqlite3.*|mount\.lock|control\.sock"
                           r"|data/([0-9a-f]{2})/\2[0-9a-f]{38}(\.crc|\.crc32c)?)")


def put_keys(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        helpers.put_object(s3, bucket, key, data)
    # The test's premise: S3 (moto) stores these keys as given, unnormalised.
    assert set(helpers.list_keys(s3, bucket)) == set(objects)


def walk_tree(root: Path) -> dict[str, tuple[set[str], set[str]]]:
    def fail(exc: OSError) -> None:
        raise exc

    return {
        os.path.relpath(dirpath, root): (set(dirnames), set(filenames))
        for dirpath, dirnames, filenames in os.walk(root, onerror=fail)
    }


def all_paths(root: Path) -> set[str]:
    """Every file and directory under `root`, relative, without following links."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def hidden_path(key: str) -> str:
    """The part of `key` up to and including its first invalid component (with the
    following "/" when that component is a prefix): what a log line names."""
    parts = key.split("/")
    for i, part in enumerate(parts):
        if part in ("", ".", "..") or "\0" in part or len(part.encode()) > 255:
            return "/".join(parts[: i + 1]) + ("/" if i < len(parts) - 1 else "")
    raise ValueError(f"{key!r} is a valid path")


def log_mentions(text: str, bucket: str) -> list[str]:
    """The key or prefix named by each `s3://bucket/...` in the log, one per mention."""
    return re.findall(rf"s3://{re.escape(bucket)}/(\S*?)(?=:\s|:$|\s|$)", text, re.M)


def mentions_of(key: str, mentions: list[str]) -> list[str]:
    """Mentions that name `key`, or the invalid prefix that stands for it."""
    h = hidden_path(key)
    return [m for m in mentions if m.startswith(h) and key.startswith(m)]


# ----------------------------------------------------------------------------- tests


def test_hostile_keys_are_hidden_and_never_reach_a_path(mount, bucket, s3, tmp_path):
    put_keys(s3, bucket, {**HIDDEN, **VISIBLE, **CLASH})

    # The cache directory sits two levels deep in a directory of its own: a key that
    # climbed out of the cache ("../../x") would land beside it.
    outer = tmp_path / "outer"
    cache_dir = outer / "p1" / "p2" / "cache"
    cache_dir.parent.mkdir(parents=True)
    before = all_paths(outer)
    watched = [outer, outer / "p1", outer / "p1" / "p2", Path("/"), tmp_path]
    absent_before = {
        d / name for d in watched for name in ("x", "b", "lead", "dot", LONG[:200])
        if not os.path.lexists(d / name)
    }

    m = mount(bucket=bucket, cache_dir=cache_dir)

    # The visible tree is exactly the valid part, and walking it raises nothing.
    assert walk_tree(m.path) == VISIBLE_TREE
    assert stat.S_ISDIR(os.stat(m.path / "x").st_mode)
    for key, data in VISIBLE.items():
        assert (m.path / key).read_bytes() == data, key
        assert os.stat(m.path / key).st_size == len(data), key

    # Lookups spelling the hostile names stay inside the mount and find nothing hidden.
    root = str(m.path)
    root_ino = os.stat(root).st_ino
    for spelled in ("a/../b", "dir//x", "./dot", "x/../b", "a/../../" + m.path.name + "/b"):
        with pytest.raises(FileNotFoundError):
            os.stat(f"{root}/{spelled}")
    assert os.stat(f"{root}/a/..").st_ino == root_ino
    assert os.stat(f"{root}/x/../ok.txt").st_ino == os.stat(m.path / "ok.txt").st_ino
    assert Path(f"{root}/x/../dir/./ok").read_bytes() == VISIBLE["dir/ok"]
    # FUSE passes names up to 1024 bytes to the daemon, which finds nothing (a local
    # file system would say ENAMETOOLONG); either way, never the hidden object.
    for attempt in (os.stat, lambda p: open(p, "rb")):
        with pytest.raises(OSError) as info:
            attempt(f"{root}/{LONG}")
        assert info.value.errno in (errno.ENOENT, errno.ENAMETOOLONG), info.value
    with pytest.raises(IsADirectoryError):
        open(m.path / "x", "rb")

    def check_cache_dir() -> None:
        # Nothing new outside the cache directory...
        assert all_paths(outer) - {p for p in all_paths(outer) if p.startswith("p1/p2/cache/")} == (
            before | {"p1/p2/cache"}
        )
        for p in absent_before:
            assert not os.path.lexists(p), f"{p} appeared"
        # ...and inside it only the catalog, the lock and hash-named data files, one
        # per visible object that was read.
        files = set()
        for dirpath, _dirs, filenames in os.walk(cache_dir):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), cache_dir)
                assert CACHE_FILE_RE.fullmatch(rel), f"unexpected file in the cache: {rel!r}"
                files.add(rel)
        data_files = [f for f in files if f.startswith("data/") and not f.endswith((".crc", ".crc32c"))]
        assert len(data_files) == len(VISIBLE), sorted(files)
        blobs = b"".join(HIDDEN.values()) + CLASH["x"]
        for rel in data_files:
            content = (cache_dir / rel).read_bytes()
            assert content in VISIBLE.values(), (rel, content[:80])
            assert content not in blobs

    check_cache_dir()
    m.unmount()
    check_cache_dir()


def test_file_and_prefix_clash(mount, bucket, s3):
    put_keys(s3, bucket, {**CLASH, **VISIBLE})
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])

    # Looked up before any listing (HEAD and LIST race), then listed: a directory both times.
    st = os.stat(m.path / "x")
    assert stat.S_ISDIR(st.st_mode)
    for _ in range(2):
        assert set(os.listdir(m.path)) == {"ok.txt", "dir", "x"}
        assert os.listdir(m.path / "x") == ["inner"]
        assert stat.S_ISDIR(os.stat(m.path / "x").st_mode)
    assert (m.path / "x" / "inner").read_bytes() == VISIBLE["x/inner"]
    with pytest.raises(IsADirectoryError):
        (m.path / "x").read_bytes()

    clash_lines = [
        line for line in m.log_text().splitlines() if "both an object and a prefix" in line
    ]
    assert len(clash_lines) == 1, clash_lines
    assert f"s3://{bucket}/x" in clash_lines[0]


def test_hidden_keys_are_logged_once_each(mount, bucket, s3):
    put_keys(s3, bucket, {**HIDDEN, **VISIBLE})
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "0"])

    # TTL 0: each walk lists every directory from S3 again.
    for _ in range(2):
        assert walk_tree(m.path) == {
            ".": ({"a", "dir", "x"}, {"ok.txt"}),
            "a": (set(), set()),
            "dir": (set(), {"ok"}),
            "x": (set(), {"inner"}),
        }
    # Looking the names up (the kernel asks for the ones it can) logs nothing more.
    for spelled in ("a/../b", "dir//x", "./dot"):
        with pytest.raises(FileNotFoundError):
            os.stat(f"{m.path}/{spelled}")

    mentions = log_mentions(m.log_text(), bucket)
    for key in HIDDEN:
        found = mentions_of(key, mentions)
        assert len(found) == 1, (
            f"hidden key {key[:40]!r} is named {len(found)} times in the log "
            f"(as {sorted(set(found))}); all mentions: {mentions}"
        )
    for key in VISIBLE:
        assert key not in mentions, f"the valid key {key!r} was logged as hidden"
