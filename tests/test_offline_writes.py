"""Changes while S3 is unreachable (offline_writes=refuse|queue) and conditional uploads that
keep both versions when S3 changed meanwhile.

The mount talks to moto through the loopback proxy (tests/proxy.py): ``s3_proxy.set_mode
("refuse")`` makes S3 unreachable for the mount only, while the test's own boto3 client still
changes objects in moto directly. Mounts use --metadata-ttl 0 so that listing a directory always
asks S3 (that is how a test makes the mount notice it is offline)."""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import sqlite3
import time

import pytest

import helpers
from s3stashfs import control

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.expect_log("unreachable", "upload of .* failed")]

QUEUE = ["--metadata-ttl", "0", "--offline-writes", "queue"]
REFUSE = ["--metadata-ttl", "0", "--xattrs"]  # refuse is the default


def s3_bytes(s3, bucket, key):
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_keys(s3, bucket):
    return set(helpers.list_keys(s3, bucket))


def catalog(m):
    db = sqlite3.connect(f"file:{m.cache_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        journal = [(op, key) for op, key in db.execute("SELECT op, key FROM journal ORDER BY seq")]
        events = [dict(zip(("key", "kind", "message"), r)) for r in
                  db.execute("SELECT key, kind, message FROM events ORDER BY id")]
        dirty = {k for (k,) in db.execute("SELECT key FROM objects WHERE dirty=1")}
    finally:
        db.close()
    return journal, events, dirty


def fails_at_once(fn, code=errno.ENETUNREACH):
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == code, (fn, e.value)
    assert time.monotonic() - t < 2.0


def write(path, data, mode="wb"):
    """open/write/close, timed: a queued close is quick."""
    t = time.monotonic()
    with open(path, mode) as f:
        f.write(data)
    return time.monotonic() - t


# ---------------------------------------------------------------------------------- refuse

def test_refuse_mode_fails_every_change_at_once_and_changes_nothing(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "a.txt", b"original\n")
    helpers.put_object(s3, bucket, "sub/b.txt", b"b\n")
    helpers.put_object(s3, bucket, "empty/", b"")
    m = mount(bucket=bucket, extra_args=REFUSE, endpoint_url=s3_proxy.url)
    assert (m.path / "a.txt").read_bytes() == b"original\n"
    assert (m.path / "sub" / "b.txt").read_bytes() == b"b\n"
    names = sorted(os.listdir(m.path))
    assert os.listdir(m.path / "empty") == []
    helpers.cut_off(m, s3_proxy)
    a = m.path / "a.txt"
    fails_at_once(lambda: open(a, "r+b"))  # O_RDWR
    fails_at_once(lambda: open(a, "ab"))  # O_WRONLY|O_APPEND
    fails_at_once(lambda: open(a, "wb"))  # O_TRUNC
    fails_at_once(lambda: open(m.path / "new.txt", "wb"))  # create
    fails_at_once(lambda: os.unlink(a))
    fails_at_once(lambda: os.rename(a, m.path / "renamed.txt"))
    fails_at_once(lambda: os.mkdir(m.path / "newdir"))
    fails_at_once(lambda: os.rmdir(m.path / "empty"))
    fails_at_once(lambda: os.symlink("a.txt", m.path / "link"))
    fails_at_once(lambda: os.truncate(a, 3))
    fails_at_once(lambda: os.chmod(a, 0o600))
    fails_at_once(lambda: os.utime(a, (1, 1)))
    fails_at_once(lambda: os.chown(a, 1234, 1234))
    fails_at_once(lambda: os.setxattr(a, "user.project", b"x"))
    # nothing changed locally: reads and listings as before
    assert a.read_bytes() == b"original\n"
    assert sorted(os.listdir(m.path)) == names
    assert catalog(m)[0] == []  # nothing pending
    helpers.reconnect(m, s3_proxy)
    # nor in S3, once the mount is back
    assert m.path.joinpath("sub", "b.txt").read_bytes() == b"b\n"
    assert s3_keys(s3, bucket) == {"a.txt", "sub/b.txt", "empty/"}
    assert s3_bytes(s3, bucket, "a.txt") == b"original\n"
    assert sorted(os.listdir(m.path)) == names
    # and changes work again
    (m.path / "new.txt").write_bytes(b"now\n")
    assert s3_bytes(s3, bucket, "new.txt") == b"now\n"


# ---------------------------------------------------------------------------------- queue

def test_queue_mode_applies_changes_in_order_once_back_without_remount(
        mount, s3, bucket, s3_proxy, moto_server):
    helpers.put_object(s3, bucket, "a.txt", b"v1\n")
    helpers.put_object(s3, bucket, "log.txt", b"line 1\n")
    helpers.put_object(s3, bucket, "gone.txt", b"to be deleted\n")
    helpers.put_object(s3, bucket, "meta.txt", b"unchanged bytes\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    for name in ("a.txt", "log.txt", "gone.txt", "meta.txt"):
        (m.path / name).read_bytes()  # cached
    helpers.cut_off(m, s3_proxy)
    assert write(m.path / "new.txt", b"created offline\n") < 2.0  # close() returns 0, at once
    write(m.path / "a.txt", b"v2\n")
    write(m.path / "a.txt", b"v3: the last version wins\n")
    write(m.path / "log.txt", b"line 2\n", "ab")
    os.mkdir(m.path / "newdir")
    write(m.path / "newdir" / "inner.txt", b"inside a new directory\n")
    os.unlink(m.path / "gone.txt")
    os.chmod(m.path / "log.txt", 0o640)
    os.chmod(m.path / "meta.txt", 0o600)  # a clean cached file: uploaded whole with it
    os.symlink("a.txt", m.path / "link")
    # never queued: the rename of a directory (a copy of every key below it); and a directory
    # known not to be empty is not removed
    fails_at_once(lambda: os.rename(m.path / "newdir", m.path / "moved"))
    fails_at_once(lambda: os.rmdir(m.path / "newdir"), errno.ENOTEMPTY)
    # the mount shows the changes at once
    assert (m.path / "new.txt").read_bytes() == b"created offline\n"
    assert (m.path / "a.txt").read_bytes() == b"v3: the last version wins\n"
    assert (m.path / "log.txt").read_bytes() == b"line 1\nline 2\n"
    assert os.stat(m.path / "log.txt").st_mode & 0o777 == 0o640
    assert os.stat(m.path / "meta.txt").st_mode & 0o777 == 0o600
    assert os.readlink(m.path / "link") == "a.txt"
    assert (m.path / "newdir" / "inner.txt").read_bytes() == b"inside a new directory\n"
    assert sorted(os.listdir(m.path)) == ["a.txt", "link", "log.txt", "meta.txt", "new.txt",
                                          "newdir"]
    assert os.listdir(m.path / "newdir") == ["inner.txt"]
    # pending, in the order of the changes (a file's place is that of its last close)
    journal, _, dirty = catalog(m)
    assert journal == [("upload", "new.txt"), ("upload", "a.txt"), ("mkdir", "newdir/"),
                       ("upload", "newdir/inner.txt"), ("delete", "gone.txt"),
                       ("upload", "log.txt"), ("upload", "meta.txt"), ("upload", "link")]
    assert dirty == {"new.txt", "a.txt", "log.txt", "newdir/inner.txt", "meta.txt", "link"}
    # S3 has none of it yet
    assert s3_keys(s3, bucket) == {"a.txt", "log.txt", "gone.txt", "meta.txt"}
    assert s3_bytes(s3, bucket, "a.txt") == b"v1\n"
    mark = moto_server.mark()
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued changes to be applied")
    assert s3_keys(s3, bucket) == {"a.txt", "log.txt", "new.txt", "newdir/", "newdir/inner.txt",
                                   "meta.txt", "link"}
    assert s3_bytes(s3, bucket, "a.txt") == b"v3: the last version wins\n"
    assert s3_bytes(s3, bucket, "log.txt") == b"line 1\nline 2\n"
    assert s3_bytes(s3, bucket, "new.txt") == b"created offline\n"
    assert s3_bytes(s3, bucket, "newdir/inner.txt") == b"inside a new directory\n"
    assert s3.head_object(Bucket=bucket, Key="log.txt")["Metadata"]["mode"] == str(0o100640)
    assert s3.head_object(Bucket=bucket, Key="meta.txt")["Metadata"]["mode"] == str(0o100600)
    assert s3_bytes(s3, bucket, "meta.txt") == b"unchanged bytes\n"
    assert s3_bytes(s3, bucket, "link") == b"a.txt"
    # applied in order, each on its condition
    changes = [r for r in moto_server.requests_since(mark, bucket=bucket)
               if r.method in ("PUT", "DELETE")]
    assert [(r.method, r.key) for r in changes] == [
        ("PUT", "new.txt"), ("PUT", "a.txt"), ("PUT", "newdir/"), ("PUT", "newdir/inner.txt"),
        ("DELETE", "gone.txt"), ("PUT", "log.txt"), ("PUT", "meta.txt"), ("PUT", "link")]
    assert changes[0].headers.get("if-none-match") == "*"
    assert changes[1].headers.get("if-match", "").strip('"') == helpers.md5_hex(b"v1\n")
    assert changes[4].headers.get("if-match", "").strip('"') == helpers.md5_hex(b"to be deleted\n")
    helpers.wait_for(lambda: catalog(m)[2] == set(), timeout=10,
                     message="nothing dirty in the catalog any more")


@pytest.mark.expect_log("conflict")
def test_queue_conflicts_keep_both_versions(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "a.txt", b"base\n")
    helpers.put_object(s3, bucket, "b.txt", b"b base\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "a.txt").read_bytes() == b"base\n"
    assert (m.path / "b.txt").read_bytes() == b"b base\n"
    helpers.cut_off(m, s3_proxy)
    write(m.path / "a.txt", b"changed locally\n")
    write(m.path / "new.txt", b"ours\n")  # created offline: S3 must not have it
    os.unlink(m.path / "b.txt")
    # meanwhile, someone else changes S3
    helpers.put_object(s3, bucket, "a.txt", b"changed in S3\n")
    helpers.put_object(s3, bucket, "new.txt", b"theirs\n")
    helpers.put_object(s3, bucket, "b.txt", b"b changed in S3\n")
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued changes to be applied")
    keys = s3_keys(s3, bucket)
    ca = [k for k in keys if k.startswith("a.conflict-") and k.endswith(".txt")]
    cn = [k for k in keys if k.startswith("new.conflict-") and k.endswith(".txt")]
    assert len(ca) == 1 and len(cn) == 1, keys
    assert keys == {"a.txt", "b.txt", "new.txt", ca[0], cn[0]}
    # the original keys keep S3's versions; the local ones are beside them
    assert s3_bytes(s3, bucket, "a.txt") == b"changed in S3\n"
    assert s3_bytes(s3, bucket, ca[0]) == b"changed locally\n"
    assert s3_bytes(s3, bucket, "new.txt") == b"theirs\n"
    assert s3_bytes(s3, bucket, cn[0]) == b"ours\n"
    assert s3_bytes(s3, bucket, "b.txt") == b"b changed in S3\n"  # the delete was not applied
    # recorded for status, with the conflict key
    _, events, _ = catalog(m)
    conflicts = {e["key"]: e["message"] for e in events if e["kind"] == "conflict"}
    assert conflicts["a.txt"].endswith(f"kept as {ca[0]}")
    assert conflicts["new.txt"].endswith(f"kept as {cn[0]}")
    assert "b.txt" in conflicts
    helpers.wait_for(lambda: catalog(m)[2] == set(), timeout=10, message="nothing dirty")
    # the mount shows both
    assert (m.path / "a.txt").read_bytes() == b"changed in S3\n"
    assert (m.path / ca[0]).read_bytes() == b"changed locally\n"
    assert (m.path / "new.txt").read_bytes() == b"theirs\n"
    assert (m.path / cn[0]).read_bytes() == b"ours\n"
    assert (m.path / "b.txt").read_bytes() == b"b changed in S3\n"


def test_queued_changes_survive_kill_9_and_a_remount_while_offline(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "keep.txt", b"cached\n")
    helpers.put_object(s3, bucket, "old.txt", b"old\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "keep.txt").read_bytes() == b"cached\n"
    assert (m.path / "old.txt").read_bytes() == b"old\n"
    helpers.cut_off(m, s3_proxy)
    write(m.path / "q.txt", b"queued before the crash\n")  # durable when close() returns
    os.mkdir(m.path / "qdir")
    os.unlink(m.path / "old.txt")
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=10)
    m.remount()  # still offline: mounts, because the cache has something to serve
    assert (m.path / "q.txt").read_bytes() == b"queued before the crash\n"
    assert sorted(os.listdir(m.path)) == ["keep.txt", "q.txt", "qdir"]
    assert os.listdir(m.path / "qdir") == []
    assert s3_keys(s3, bucket) == {"keep.txt", "old.txt"}
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: s3_keys(s3, bucket) == {"keep.txt", "q.txt", "qdir/"}, timeout=30,
                     message="the queued changes to reach S3 after the remount")
    assert s3_bytes(s3, bucket, "q.txt") == b"queued before the crash\n"
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=10, message="an empty journal")


def rename_noreplace(src, dst):
    """renameat2(RENAME_NOREPLACE), as `mv -n` does it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), 1) != 0:  # AT_FDCWD
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src))


def put_requests(moto_server, mark, bucket):
    """The changes the mount sent since ``mark``: (method, key, If-Match, If-None-Match)."""
    return [(r.method, r.key, r.headers.get("if-match", "").strip('"') or None,
             r.headers.get("if-none-match")) for r in moto_server.requests_since(mark, bucket=bucket)
            if r.method in ("PUT", "DELETE")]


def test_queue_mode_editor_save_by_rename_over_the_original(mount, s3, bucket, s3_proxy,
                                                            moto_server):
    """An editor saves by writing a temporary file and renaming it over the original."""
    helpers.put_object(s3, bucket, "f.txt", b"version 1\n", Metadata={"mode": str(0o100640)})
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "f.txt").read_bytes() == b"version 1\n"  # cached
    helpers.cut_off(m, s3_proxy)
    write(m.path / "f.txt.tmp", b"version 2, saved offline\n")
    t = time.monotonic()
    os.rename(m.path / "f.txt.tmp", m.path / "f.txt")
    assert time.monotonic() - t < 2.0
    # the mount shows it at once
    assert (m.path / "f.txt").read_bytes() == b"version 2, saved offline\n"
    assert os.listdir(m.path) == ["f.txt"]
    fails_at_once(lambda: os.stat(m.path / "f.txt.tmp"), errno.ENOENT)
    # one change pending: the upload of f.txt (f.txt.tmp never reached S3: nothing to delete)
    journal, _, dirty = catalog(m)
    assert journal == [("upload", "f.txt")]
    assert dirty == {"f.txt"}
    assert s3_keys(s3, bucket) == {"f.txt"}
    assert s3_bytes(s3, bucket, "f.txt") == b"version 1\n"
    mark = moto_server.mark()
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued rename to be applied")
    assert s3_keys(s3, bucket) == {"f.txt"}
    assert s3_bytes(s3, bucket, "f.txt") == b"version 2, saved offline\n"
    # replacing the version the editor had read, and only that one
    assert put_requests(moto_server, mark, bucket) == [
        ("PUT", "f.txt", helpers.md5_hex(b"version 1\n"), None)]
    helpers.wait_for(lambda: catalog(m)[2] == set(), timeout=10, message="nothing dirty")
    assert (m.path / "f.txt").read_bytes() == b"version 2, saved offline\n"


def test_queue_mode_rename_of_cached_files_to_new_names(mount, s3, bucket, s3_proxy, moto_server):
    big = helpers.random_bytes(3 * helpers.MiB, seed=7)  # cached in blocks, not in one GET
    helpers.put_object(s3, bucket, "a.txt", b"alpha\n", Metadata={"mode": str(0o100600)})
    helpers.put_object(s3, bucket, "big.bin", big)
    helpers.put_object(s3, bucket, "sub/x.txt", b"x\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "a.txt").read_bytes() == b"alpha\n"
    assert helpers.md5_file(m.path / "big.bin") == helpers.md5_hex(big)
    assert sorted(os.listdir(m.path)) == ["a.txt", "big.bin", "sub"]
    assert os.listdir(m.path / "sub") == ["x.txt"]
    mtime = os.stat(m.path / "a.txt").st_mtime_ns
    helpers.cut_off(m, s3_proxy)
    os.rename(m.path / "a.txt", m.path / "renamed.txt")
    os.rename(m.path / "big.bin", m.path / "sub" / "big.bin")
    # at once: the old names are gone, the new ones show the bytes and the metadata
    assert sorted(os.listdir(m.path)) == ["renamed.txt", "sub"]
    assert sorted(os.listdir(m.path / "sub")) == ["big.bin", "x.txt"]
    st = os.stat(m.path / "renamed.txt")
    assert (st.st_mode & 0o777, st.st_size, st.st_mtime_ns) == (0o600, 6, mtime)
    assert (m.path / "renamed.txt").read_bytes() == b"alpha\n"
    assert helpers.md5_file(m.path / "sub" / "big.bin") == helpers.md5_hex(big)
    fails_at_once(lambda: os.stat(m.path / "a.txt"), errno.ENOENT)
    fails_at_once(lambda: rename_noreplace(m.path / "renamed.txt", m.path / "sub" / "x.txt"),
                  errno.EEXIST)  # mv -n: an existing target stays
    assert (m.path / "renamed.txt").read_bytes() == b"alpha\n"
    journal, _, _ = catalog(m)
    assert journal == [("upload", "renamed.txt"), ("delete", "a.txt"),
                       ("upload", "sub/big.bin"), ("delete", "big.bin")]
    assert s3_keys(s3, bucket) == {"a.txt", "big.bin", "sub/x.txt"}
    mark = moto_server.mark()
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued renames to be applied")
    assert s3_keys(s3, bucket) == {"renamed.txt", "sub/big.bin", "sub/x.txt"}
    assert s3_bytes(s3, bucket, "renamed.txt") == b"alpha\n"
    assert helpers.md5_hex(s3_bytes(s3, bucket, "sub/big.bin")) == helpers.md5_hex(big)
    assert s3.head_object(Bucket=bucket, Key="renamed.txt")["Metadata"]["mode"] == str(0o100600)
    # each new name only if S3 had nothing there; each old one only if still the version renamed
    assert put_requests(moto_server, mark, bucket) == [
        ("PUT", "renamed.txt", None, "*"), ("DELETE", "a.txt", helpers.md5_hex(b"alpha\n"), None),
        ("PUT", "sub/big.bin", None, "*"), ("DELETE", "big.bin", helpers.md5_hex(big), None)]
    assert sorted(os.listdir(m.path)) == ["renamed.txt", "sub"]
    assert os.stat(m.path / "renamed.txt").st_mtime_ns == mtime


def test_a_renamed_file_leaves_its_old_name_only_once_s3_has_the_new_one(mount, s3, bucket,
                                                                        s3_proxy):
    """A rename queued offline is an upload of the new name and a delete of the old one: the
    delete waits while the upload cannot go (here: the file is held open for writing), so S3
    never has neither name."""
    helpers.put_object(s3, bucket, "a.txt", b"alpha\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "a.txt").read_bytes() == b"alpha\n"
    helpers.cut_off(m, s3_proxy)
    os.rename(m.path / "a.txt", m.path / "b.txt")
    with open(m.path / "b.txt", "ab") as held:
        held.write(b"beta\n")
        held.flush()
        helpers.reconnect(m, s3_proxy)
        # `s3stashfs sync`, asked from this process: a child process would close its inherited
        # copy of `held` at exec, and that close uploads the file
        r = control.request(m.cache_dir, {"cmd": "sync"})
        failed = {(f["op"], f["key"]): f["error"] for f in r["failed"]}
        assert "open for writing" in failed[("upload", "b.txt")], r
        assert "earlier upload" in failed[("delete", "a.txt")], r
        assert s3_keys(s3, bucket) == {"a.txt"}  # the old name stays while the new one waits
    helpers.wait_for(lambda: s3_keys(s3, bucket) == {"b.txt"}, timeout=30,
                     message="the rename to reach S3 once the file is closed")
    assert s3.get_object(Bucket=bucket, Key="b.txt")["Body"].read() == b"alpha\nbeta\n"


def test_queue_mode_rename_of_a_file_not_wholly_cached_fails_at_once(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "cold.txt", b"never read\n")
    helpers.put_object(s3, bucket, "partial.bin", helpers.random_bytes(3 * helpers.MiB, seed=3))
    helpers.put_object(s3, bucket, "dir/y.txt", b"y\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert sorted(os.listdir(m.path)) == ["cold.txt", "dir", "partial.bin"]
    assert len(helpers.read_range(m.path / "partial.bin", 0, 4096)) == 4096  # one block cached
    assert (m.path / "dir" / "y.txt").read_bytes() == b"y\n"
    helpers.cut_off(m, s3_proxy)
    fails_at_once(lambda: os.rename(m.path / "cold.txt", m.path / "c2.txt"))
    fails_at_once(lambda: os.rename(m.path / "partial.bin", m.path / "p2.bin"))
    fails_at_once(lambda: os.rename(m.path / "dir", m.path / "dir2"))  # a directory: never queued
    assert sorted(os.listdir(m.path)) == ["cold.txt", "dir", "partial.bin"]
    assert catalog(m)[0] == []


def test_queue_mode_rename_of_a_file_whose_metadata_is_not_known_fails_at_once(
        mount, s3, bucket, s3_proxy):
    """Opened within the TTL of a listing, an object is cached without a HEAD, so without its
    x-amz-meta-*: uploaded under a new name offline, it would lose them."""
    helpers.put_object(s3, bucket, "listed.txt", b"opened after a listing\n",
                       Metadata={"mode": str(0o100600)})
    helpers.put_object(s3, bucket, "d/other.txt", b"never listed\n")
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "60", "--offline-writes", "queue"],
              endpoint_url=s3_proxy.url)
    assert sorted(os.listdir(m.path)) == ["d", "listed.txt"]
    assert (m.path / "listed.txt").read_bytes() == b"opened after a listing\n"
    s3_proxy.set_mode("refuse")
    fails_at_once(lambda: os.listdir(m.path / "d"))  # needs S3: the mount goes offline
    helpers.wait_for(lambda: "offline, serving what is cached" in m.log_text(), timeout=30)
    fails_at_once(lambda: os.rename(m.path / "listed.txt", m.path / "moved.txt"))
    assert (m.path / "listed.txt").read_bytes() == b"opened after a listing\n"
    assert catalog(m)[0] == []


@pytest.mark.expect_log("conflict")
def test_queue_mode_renames_whose_names_changed_in_s3_keep_both_versions(mount, s3, bucket,
                                                                         s3_proxy):
    helpers.put_object(s3, bucket, "f.txt", b"base\n")
    helpers.put_object(s3, bucket, "g.txt", b"g base\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "f.txt").read_bytes() == b"base\n"
    assert (m.path / "g.txt").read_bytes() == b"g base\n"
    helpers.cut_off(m, s3_proxy)
    write(m.path / "f.txt.tmp", b"saved offline\n")
    os.rename(m.path / "f.txt.tmp", m.path / "f.txt")  # the target changes in S3 meanwhile
    os.rename(m.path / "g.txt", m.path / "h.txt")  # the source changes in S3 meanwhile
    helpers.put_object(s3, bucket, "f.txt", b"f changed in S3\n")
    helpers.put_object(s3, bucket, "g.txt", b"g changed in S3\n")
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued renames to be applied")
    keys = s3_keys(s3, bucket)
    cf = [k for k in keys if k.startswith("f.conflict-") and k.endswith(".txt")]
    assert len(cf) == 1, keys
    assert keys == {"f.txt", cf[0], "g.txt", "h.txt"}
    assert s3_bytes(s3, bucket, "f.txt") == b"f changed in S3\n"
    assert s3_bytes(s3, bucket, cf[0]) == b"saved offline\n"
    assert s3_bytes(s3, bucket, "g.txt") == b"g changed in S3\n"  # not deleted
    assert s3_bytes(s3, bucket, "h.txt") == b"g base\n"
    _, events, _ = catalog(m)
    conflicts = {e["key"]: e["message"] for e in events if e["kind"] == "conflict"}
    assert conflicts["f.txt"].endswith(f"kept as {cf[0]}")
    assert "g.txt" in conflicts
    helpers.wait_for(lambda: catalog(m)[2] == set(), timeout=10, message="nothing dirty")
    assert (m.path / "f.txt").read_bytes() == b"f changed in S3\n"
    assert (m.path / cf[0]).read_bytes() == b"saved offline\n"
    assert (m.path / "g.txt").read_bytes() == b"g changed in S3\n"
    assert (m.path / "h.txt").read_bytes() == b"g base\n"


def test_queue_mode_rmdir(mount, s3, bucket, s3_proxy, moto_server):
    helpers.put_object(s3, bucket, "empty/", b"")  # a marker: the directory persists empty
    helpers.put_object(s3, bucket, "full/x.txt", b"x\n")
    helpers.put_object(s3, bucket, "prefix/y.txt", b"y\n")  # a directory without a marker
    helpers.put_object(s3, bucket, "cold/z.txt", b"z\n")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert sorted(os.listdir(m.path)) == ["cold", "empty", "full", "prefix"]
    for d in ("empty", "full", "prefix"):  # listed: the mount knows what they hold
        os.listdir(m.path / d)
    helpers.cut_off(m, s3_proxy)
    t = time.monotonic()
    os.rmdir(m.path / "empty")
    assert time.monotonic() - t < 2.0
    fails_at_once(lambda: os.rmdir(m.path / "full"), errno.ENOTEMPTY)
    fails_at_once(lambda: os.rmdir(m.path / "cold"))  # never listed: its contents are unknown
    os.unlink(m.path / "prefix" / "y.txt")
    os.rmdir(m.path / "prefix")  # emptied offline; it has no marker: nothing more to send
    os.mkdir(m.path / "made")
    os.rmdir(m.path / "made")  # made and removed offline: nothing to send at all
    assert sorted(os.listdir(m.path)) == ["cold", "full"]
    fails_at_once(lambda: os.stat(m.path / "empty"), errno.ENOENT)
    assert catalog(m)[0] == [("delete", "empty/"), ("delete", "prefix/y.txt")]
    mark = moto_server.mark()
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=30,
                     message="the queued changes to be applied")
    assert s3_keys(s3, bucket) == {"full/x.txt", "cold/z.txt"}
    assert put_requests(moto_server, mark, bucket) == [
        ("DELETE", "empty/", helpers.md5_hex(b""), None),
        ("DELETE", "prefix/y.txt", helpers.md5_hex(b"y\n"), None)]
    assert sorted(os.listdir(m.path)) == ["cold", "full"]


def test_queued_renames_survive_kill_9_and_a_remount_while_offline(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "f.txt", b"v1\n")
    helpers.put_object(s3, bucket, "a.txt", b"alpha\n")
    helpers.put_object(s3, bucket, "empty/", b"")
    m = mount(bucket=bucket, extra_args=QUEUE, endpoint_url=s3_proxy.url)
    assert (m.path / "f.txt").read_bytes() == b"v1\n"
    assert (m.path / "a.txt").read_bytes() == b"alpha\n"
    assert sorted(os.listdir(m.path)) == ["a.txt", "empty", "f.txt"]
    assert os.listdir(m.path / "empty") == []
    helpers.cut_off(m, s3_proxy)
    write(m.path / "f.txt.tmp", b"v2\n")
    os.rename(m.path / "f.txt.tmp", m.path / "f.txt")
    os.rename(m.path / "a.txt", m.path / "b.txt")
    os.rmdir(m.path / "empty")
    pid = m.pid
    os.kill(pid, signal.SIGKILL)  # right after the renames returned: they were durable
    helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=10)
    m.remount()  # still offline
    assert sorted(os.listdir(m.path)) == ["b.txt", "f.txt"]
    assert (m.path / "f.txt").read_bytes() == b"v2\n"
    assert (m.path / "b.txt").read_bytes() == b"alpha\n"
    assert s3_keys(s3, bucket) == {"f.txt", "a.txt", "empty/"}
    helpers.reconnect(m, s3_proxy)
    helpers.wait_for(lambda: s3_keys(s3, bucket) == {"f.txt", "b.txt"}, timeout=30,
                     message="the queued renames to reach S3 after the remount")
    assert s3_bytes(s3, bucket, "f.txt") == b"v2\n"
    assert s3_bytes(s3, bucket, "b.txt") == b"alpha\n"
    helpers.wait_for(lambda: catalog(m)[0] == [], timeout=10, message="an empty journal")


# ---------------------------------------------------------------------------------- online

@pytest.mark.expect_log("conflict")
@pytest.mark.parametrize("size", [100, 9 * helpers.MiB], ids=["put", "multipart"])
def test_object_changed_in_s3_while_open_for_write_keeps_both(mount, s3, bucket, size):
    base = helpers.random_bytes(size, seed=1)
    helpers.put_object(s3, bucket, "data.bin", base)
    m = mount(bucket=bucket)
    assert helpers.md5_file(m.path / "data.bin") == helpers.md5_hex(base)
    local = bytearray(base)
    local[10:20] = b"LOCAL EDIT"
    with open(m.path / "data.bin", "r+b") as f:
        f.seek(10)
        f.write(b"LOCAL EDIT")
        remote = helpers.random_bytes(size, seed=2)
        helpers.put_object(s3, bucket, "data.bin", remote)
    # close() returned 0: both versions are safe
    keys = s3_keys(s3, bucket)
    conflict = [k for k in keys if k.startswith("data.conflict-") and k.endswith(".bin")]
    assert len(conflict) == 1, keys
    assert helpers.md5_hex(s3_bytes(s3, bucket, "data.bin")) == helpers.md5_hex(remote)
    assert helpers.md5_hex(s3_bytes(s3, bucket, conflict[0])) == helpers.md5_hex(bytes(local))
    _, events, dirty = catalog(m)
    assert [e["message"].endswith(f"kept as {conflict[0]}") for e in events
            if e["kind"] == "conflict" and e["key"] == "data.bin"] == [True]
    assert dirty == set()
    assert m.log_text().count("conflict: s3://") == 1
    assert helpers.md5_file(m.path / "data.bin") == helpers.md5_hex(remote)
    assert helpers.md5_file(m.path / conflict[0]) == helpers.md5_hex(bytes(local))


def test_uploads_are_conditional_on_the_version_they_change(mount, s3, bucket, moto_server):
    helpers.put_object(s3, bucket, "a.txt", b"one\n")
    m = mount(bucket=bucket)
    mark = moto_server.mark()
    with open(m.path / "a.txt", "ab") as f:
        f.write(b"two\n")
    (m.path / "b.txt").write_bytes(b"new\n")
    (m.path / "b.txt").write_bytes(b"newer\n")
    puts = [r for r in moto_server.requests_since(mark, method="PUT", bucket=bucket)]
    assert [(r.key, r.headers.get("if-match", "").strip('"'), r.headers.get("if-none-match"))
            for r in puts] == [("a.txt", helpers.md5_hex(b"one\n"), None),
                               ("b.txt", "", "*"),
                               ("b.txt", helpers.md5_hex(b"new\n"), None)]
    assert s3_bytes(s3, bucket, "a.txt") == b"one\ntwo\n"
    assert s3_bytes(s3, bucket, "b.txt") == b"newer\n"


# ---------------------------------------------------------------------- the lead's interface

def test_pending_and_sync_all(tmp_path, s3, bucket, moto_server, monkeypatch):
    """Uploader.pending() and sync_all(), in process against the real moto_server (what the
    status and sync commands are built on)."""
    import trio

    from s3stashfs.cache import Cache
    from s3stashfs.config import Settings
    from s3stashfs.store import Store
    from s3stashfs.uploads import Uploader

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    old = helpers.put_object(s3, bucket, "old.txt", b"old\n")
    helpers.put_object(s3, bucket, "c.txt", b"c base\n")
    settings = Settings(endpoint_url=moto_server.url, region="us-east-1",
                        cache_dir=tmp_path / "cache")

    def local(cache, key, data, base):
        obj = cache.create_local(bucket, key, base)
        os.pwrite(cache.ensure_open(obj), data, 0)
        obj.changed_locally(len(data))
        return obj

    async def main():
        cache = Cache(settings.cache_dir, settings.origin)
        store = Store(settings)
        up = Uploader(store, cache, 8 << 20, 8 << 20, (), "queue")
        store.connectivity.unreachable("test")  # offline: changes are queued
        t0 = time.time()
        assert await up.upload(local(cache, "n.txt", b"hello", "")) is None
        assert await up.upload(local(cache, "c.txt", b"c local\n",
                                     helpers.md5_hex(b"c base\n"))) is None
        up.queue(bucket, "old.txt", "delete", old.etag.strip('"'))
        pending = up.pending()
        assert [(p["op"], p["key"], p["size"]) for p in pending] == [
            ("upload", "n.txt", 5), ("upload", "c.txt", 8), ("delete", "old.txt", None)]
        assert [p["base_etag"] for p in pending] == ["", helpers.md5_hex(b"c base\n"),
                                                     old.etag.strip('"')]
        assert all(t0 - 1 <= p["since"] <= time.time() and p["error"] is None for p in pending)
        # offline: each attempt fails at once and is listed
        t = time.monotonic()
        r = await up.sync_all()
        assert time.monotonic() - t < 2
        assert r["uploaded"] == [] and r["conflicts"] == []
        assert [(f["op"], f["key"]) for f in r["failed"]] == [
            ("upload", "n.txt"), ("upload", "c.txt"), ("delete", "old.txt")]
        assert all("unreachable" in f["error"] for f in r["failed"][:2])
        assert "waits for an earlier upload" in r["failed"][2]["error"]  # deletes go after uploads
        assert [bool(p["error"]) for p in up.pending()] == [True, True, False]  # not tried
        helpers.put_object(s3, bucket, "c.txt", b"c changed in S3\n")
        store.connectivity.reachable()
        r = await up.sync_all()
        assert r["failed"] == []
        assert r["uploaded"] == [{"bucket": bucket, "key": "n.txt", "op": "upload"},
                                 {"bucket": bucket, "key": "old.txt", "op": "delete"}]
        assert [(c["key"], c["conflict_key"].startswith("c.conflict-")) for c in r["conflicts"]] \
            == [("c.txt", True)]
        assert up.pending() == []
        assert await up.sync_all() == {"uploaded": [], "failed": [], "conflicts": []}
        events = cache.catalog.events("conflict")
        assert events[0]["message"].endswith("kept as " + r["conflicts"][0]["conflict_key"])
        await cache.close()
        return r["conflicts"][0]["conflict_key"]

    ckey = trio.run(main)
    assert s3_keys(s3, bucket) == {"n.txt", "c.txt", ckey}
    assert s3_bytes(s3, bucket, ckey) == b"c local\n"
    assert s3_bytes(s3, bucket, "c.txt") == b"c changed in S3\n"
