"""Archived objects (GLACIER, DEEP_ARCHIVE, INTELLIGENT_TIERING's archive tiers): listed with
their size, refused at open with EREMOTE and one log line, never downloaded, the mount online;
their storage class and restore state as xattrs; `s3stashfs restore` for files and directories;
then byte-exact reads. Through a real mount against moto_server (which keeps storage classes,
refuses GETs of archived objects with 403 InvalidObjectState and restores at once); what moto
cannot say (x-amz-archive-status, a restore under way, 409 RestoreAlreadyInProgress) the loopback
proxy adds to its answers."""
from __future__ import annotations

import dataclasses
import email.utils
import errno
import json
import os
import re
import subprocess
import time

import pytest
import trio

import helpers
from conftest import S3STASHFS_BIN
from proxy import Fault

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.expect_log(r"is in \S+( \S+)? and (not restored|its restore is still)")]


def cli(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def open_errno(path) -> int | None:
    """The errno open() (then a read) gives, None when the whole file reads."""
    try:
        with open(path, "rb") as f:
            f.read()
    except OSError as e:
        return e.errno
    return None


def refused(bucket: str, key: str, label: str, path) -> str:
    return (f"s3://{bucket}/{key} is in {label} and not restored: run `s3stashfs restore "
            f"{path}` (or restore it in S3), then open it again")


def gets(moto_server, mark, bucket, key) -> list:
    return moto_server.requests_since(mark, op="GetObject", bucket=bucket, key=key)


def put(s3, bucket, key, data, storage_class="STANDARD"):
    s3.put_object(Bucket=bucket, Key=key, Body=data, StorageClass=storage_class)


def test_archived_listed_refused_at_open_without_a_get(mount, s3, bucket, moto_server):
    data = {k: helpers.random_bytes(n, seed=k) for k, n in
            (("cold/g.bin", 300_000), ("cold/d.bin", 3 << 20), ("cold/ir.bin", 200_000),
             ("cold/std.bin", 1000))}
    for key, cls in (("cold/g.bin", "GLACIER"), ("cold/d.bin", "DEEP_ARCHIVE"),
                     ("cold/ir.bin", "GLACIER_IR"), ("cold/std.bin", "STANDARD")):
        put(s3, bucket, key, data[key], cls)
    seq = ["STANDARD", "STANDARD", "GLACIER", "STANDARD", "DEEP_ARCHIVE", "STANDARD"]
    for i, cls in enumerate(seq):
        put(s3, bucket, f"seq/f{i}.txt", b"%d" % i, cls)
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    cold = m.path / "cold"
    assert sorted(os.listdir(cold)) == ["d.bin", "g.bin", "ir.bin", "std.bin"]
    for key, body in data.items():  # listed with their size
        assert os.stat(m.path / key).st_size == len(body)

    mark = moto_server.mark()
    for _ in range(3):
        t0 = time.monotonic()
        assert open_errno(cold / "g.bin") == errno.EREMOTE
        assert time.monotonic() - t0 < 2.0  # at once: nothing is waited for
        assert open_errno(cold / "d.bin") == errno.EREMOTE
    assert gets(moto_server, mark, bucket, "cold/g.bin") == []
    assert gets(moto_server, mark, bucket, "cold/d.bin") == []
    r = subprocess.run(["cat", str(cold / "g.bin")], capture_output=True, text=True)
    assert r.returncode == 1 and "Object is remote" in r.stderr

    # a directory read in order has its next small files fetched ahead: not archived ones
    names = sorted(os.listdir(m.path / "seq"))
    assert [open_errno(m.path / "seq" / n) for n in names] == [
        None if cls == "STANDARD" else errno.EREMOTE for cls in seq]
    for i, cls in enumerate(seq):
        assert bool(gets(moto_server, mark, bucket, f"seq/f{i}.txt")) == (cls == "STANDARD")

    # GLACIER_IR is no archive: it reads like STANDARD
    assert (cold / "ir.bin").read_bytes() == data["cold/ir.bin"]
    assert (cold / "std.bin").read_bytes() == data["cold/std.bin"]

    # one line per object in the log, not one per open
    log = m.log_text()
    for key, label in (("cold/g.bin", "GLACIER"), ("cold/d.bin", "DEEP_ARCHIVE")):
        line = refused(bucket, key, label, m.path / key)
        assert log.count(line) == 1, log

    # the mount stays online, and status lists the objects among its errors
    r = cli(m.env, "status", m.path, "--json")
    assert r.returncode == 0, r
    st = json.loads(r.stdout)
    assert st["online"]
    messages = {e["key"]: e["message"] for e in st["errors"]}
    assert messages["cold/g.bin"] == refused(bucket, "cold/g.bin", "GLACIER", m.path / "cold/g.bin")

    # xattrs: the storage class, and the restore state of archived objects
    def xattr(name, attr):
        return os.getxattr(cold / name, attr).decode()
    assert xattr("g.bin", "user.s3.storage-class") == "GLACIER"
    assert xattr("g.bin", "user.s3.restore") == "not restored"
    assert xattr("d.bin", "user.s3.storage-class") == "DEEP_ARCHIVE"
    assert xattr("ir.bin", "user.s3.storage-class") == "GLACIER_IR"
    assert xattr("std.bin", "user.s3.storage-class") == "STANDARD"
    assert "user.s3.restore" not in os.listxattr(cold / "ir.bin")
    assert "user.s3.restore" in os.listxattr(cold / "g.bin")

    # what needs its bytes fails alike: a write that keeps them, a rename (a copy in S3), pin
    with pytest.raises(OSError) as e:
        open(cold / "g.bin", "r+b")
    assert e.value.errno == errno.EREMOTE
    with pytest.raises(OSError) as e:
        os.rename(cold / "d.bin", cold / "moved.bin")
    assert e.value.errno == errno.EREMOTE
    r = cli(m.env, "pin", cold / "g.bin")
    assert r.returncode == 1 and "not pinned" in r.stderr and "InvalidObjectState" in r.stderr
    # overwriting it whole (O_TRUNC) makes a new object, not archived
    (cold / "d.bin").write_bytes(b"new\n")
    assert s3.head_object(Bucket=bucket, Key="cold/d.bin").get("StorageClass") is None
    assert (cold / "d.bin").read_bytes() == b"new\n"
    assert gets(moto_server, mark, bucket, "cold/d.bin") == []


def test_restore_command_file_then_directory(mount, s3, bucket, moto_server):
    data = {k: helpers.random_bytes(n, seed=k) for k, n in
            (("a/one.bin", 2 << 20), ("a/sub/two.bin", 100_000), ("a/sub/plain.txt", 50),
             ("a/sub/ir.bin", 10))}
    put(s3, bucket, "a/one.bin", data["a/one.bin"], "GLACIER")
    put(s3, bucket, "a/sub/two.bin", data["a/sub/two.bin"], "DEEP_ARCHIVE")
    put(s3, bucket, "a/sub/plain.txt", data["a/sub/plain.txt"])
    put(s3, bucket, "a/sub/ir.bin", data["a/sub/ir.bin"], "GLACIER_IR")
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    one, two = m.path / "a" / "one.bin", m.path / "a" / "sub" / "two.bin"
    assert open_errno(one) == errno.EREMOTE

    # a file: requested (moto restores at once), for the days asked
    r = cli(m.env, "restore", one, "--days", "3")
    assert r.returncode == 0, r
    assert "1 requested, 0 already in progress, 0 already restored" in r.stdout
    assert re.search(rf"requested\s+{bucket}/a/one.bin  \(GLACIER\)", r.stdout), r.stdout
    head = s3.head_object(Bucket=bucket, Key="a/one.bin")
    assert 'ongoing-request="false"' in head["Restore"]
    expiry = email.utils.parsedate_to_datetime(
        re.search(r'expiry-date="([^"]+)"', head["Restore"]).group(1))
    assert 2.9 * 86400 < expiry.timestamp() - time.time() < 3.1 * 86400

    # then it reads, byte-exact, and says so
    assert one.read_bytes() == data["a/one.bin"]
    assert os.getxattr(one, "user.s3.restore").decode().startswith("restored until ")

    # a directory, recursively: every archived object under it, the rest skipped; one.bin
    # already restored (with its expiry): only two.bin is asked of S3
    mark = moto_server.mark()
    r = cli(m.env, "restore", m.path / "a", "--json", "--tier", "bulk")
    assert r.returncode == 3, r  # done, but some were not archived
    out = json.loads(r.stdout)
    states = {o["key"]: o["state"] for o in out["objects"]}
    assert states == {"a/one.bin": "restored", "a/sub/two.bin": "requested",
                      "a/sub/plain.txt": "not archived", "a/sub/ir.bin": "not archived"}
    assert out["tier"] == "Bulk" and out["days"] == 7
    assert out["counts"] == {"restored": 1, "requested": 1, "not archived": 2}
    assert [o["expiry"] for o in out["objects"] if o["key"] == "a/one.bin"] == [
        re.search(r'expiry-date="([^"]+)"', head["Restore"]).group(1)]
    posts = [q.key for q in moto_server.requests_since(mark) if q.method == "POST"]
    assert posts == ["a/sub/two.bin"]
    assert two.read_bytes() == data["a/sub/two.bin"]

    # bad input, and a path no mount holds
    assert cli(m.env, "restore", one, "--tier", "Fast").returncode == 2
    assert cli(m.env, "restore", one, "--days", "0").returncode == 2
    assert cli(m.env, "restore", m.path / "a" / "nope.bin").returncode == 2
    r = cli(m.env, "restore", m.path.parent)
    assert r.returncode == 4 and "not inside an s3stashfs mount" in r.stderr
    assert cli(m.env, "status", m.path).returncode == 0


def test_restored_elsewhere_reads_despite_a_fresh_listing(mount, s3, bucket, moto_server):
    """The listing (fresh for 300 s) says GLACIER and nothing of restores: open asks S3."""
    data = helpers.random_bytes(500_000, seed="elsewhere")
    put(s3, bucket, "g.bin", data, "GLACIER")
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "300"])
    assert os.listdir(m.path) == ["g.bin"]
    assert open_errno(m.path / "g.bin") == errno.EREMOTE
    s3.restore_object(Bucket=bucket, Key="g.bin",
                      RestoreRequest={"Days": 1, "GlacierJobParameters": {"Tier": "Standard"}})
    assert (m.path / "g.bin").read_bytes() == data


def test_archived_after_listing_same_errno_and_cache_still_serves(mount, s3, bucket, moto_server):
    x = helpers.random_bytes(3 << 20, seed="x")
    y = helpers.random_bytes(200_000, seed="y")
    put(s3, bucket, "x.bin", x)
    put(s3, bucket, "y.bin", y)
    m = mount(bucket=bucket, extra_args=["--metadata-ttl", "300"])
    assert sorted(os.listdir(m.path)) == ["x.bin", "y.bin"]  # listed as STANDARD
    assert (m.path / "y.bin").read_bytes() == y  # cached whole
    for key in ("x.bin", "y.bin"):  # archived in place, after the listing
        s3.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key},
                       StorageClass="GLACIER")

    # the listing's word opens it; S3 refuses the GET: the same errno, message and log line
    mark = moto_server.mark()
    assert open_errno(m.path / "x.bin") == errno.EREMOTE
    assert gets(moto_server, mark, bucket, "x.bin")  # this time a GET was sent, and refused
    line = refused(bucket, "x.bin", "GLACIER", m.path / "x.bin")
    helpers.wait_for(lambda: line in m.log_text(), message="the log line")
    mark = moto_server.mark()
    assert open_errno(m.path / "x.bin") == errno.EREMOTE  # now refused at open: no GET
    assert gets(moto_server, mark, bucket, "x.bin") == []
    assert m.log_text().count(line) == 1
    r = cli(m.env, "status", m.path, "--json")
    assert r.returncode == 0, r
    assert line in [e["message"] for e in json.loads(r.stdout)["errors"]]

    # what the cache holds of the same version still reads, archived or not
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    assert (m.path / "y.bin").read_bytes() == y
    assert gets(moto_server, mark, bucket, "y.bin") == []


def _add_header(proxy, key: str, header: str) -> None:
    """HEAD answers for ``key`` get ``header`` (what real S3 sends and moto cannot)."""
    def on_answer(method, path, head):
        if method == "HEAD" and path.split("?")[0].endswith("/" + key):
            return head[:-2] + header.encode() + b"\r\n\r\n"
        return head
    proxy.on_answer = on_answer


def test_intelligent_tiering_archive_tier(mount, s3, bucket, moto_server, s3_proxy):
    data = helpers.random_bytes(100_000, seed="it")
    put(s3, bucket, "it.bin", data, "INTELLIGENT_TIERING")
    put(s3, bucket, "frequent.bin", data, "INTELLIGENT_TIERING")
    _add_header(s3_proxy, "it.bin", "x-amz-archive-status: ARCHIVE_ACCESS")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--xattrs"])
    assert sorted(os.listdir(m.path)) == ["frequent.bin", "it.bin"]
    assert os.stat(m.path / "it.bin").st_size == len(data)
    mark = moto_server.mark()
    assert open_errno(m.path / "it.bin") == errno.EREMOTE
    assert gets(moto_server, mark, bucket, "it.bin") == []
    assert refused(bucket, "it.bin", "INTELLIGENT_TIERING ARCHIVE_ACCESS",
                   m.path / "it.bin") in m.log_text()
    assert os.getxattr(m.path / "it.bin", "user.s3.archive-status") == b"ARCHIVE_ACCESS"
    assert os.getxattr(m.path / "it.bin", "user.s3.storage-class") == b"INTELLIGENT_TIERING"
    assert os.getxattr(m.path / "it.bin", "user.s3.restore") == b"not restored"
    # the frequent tier reads (only HEAD's x-amz-archive-status tells them apart)
    assert (m.path / "frequent.bin").read_bytes() == data


def test_restore_in_progress(mount, s3, bucket, moto_server, s3_proxy):
    put(s3, bucket, "going.bin", b"g" * 1000, "GLACIER")
    put(s3, bucket, "asked.bin", b"a" * 1000, "DEEP_ARCHIVE")
    _add_header(s3_proxy, "going.bin", 'x-amz-restore: ongoing-request="true"')
    # S3's answer to a second request while the first is under way (moto has none)
    s3_proxy.inject(Fault(kind="answer", status=409, code="RestoreAlreadyInProgress",
                          when=lambda method, path, h: method == "POST" and "asked.bin" in path))
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--xattrs"])
    assert open_errno(m.path / "going.bin") == errno.EREMOTE
    assert (f"s3://{bucket}/going.bin is in GLACIER and its restore is still in progress: open "
            "it again once it is done") in m.log_text()
    assert os.getxattr(m.path / "going.bin", "user.s3.restore") == b"in progress"
    r = cli(m.env, "restore", m.path / "going.bin", m.path / "asked.bin", "--json")
    assert r.returncode == 3, r  # done, but look: already in progress
    states = {o["key"]: o["state"] for o in json.loads(r.stdout)["objects"]}
    assert states == {"going.bin": "in progress", "asked.bin": "in progress"}
    # a failure is exit 1: Expedited is no tier of DEEP_ARCHIVE
    s3_proxy.clear()
    r = cli(m.env, "restore", m.path / "asked.bin", "--tier", "expedited")
    assert r.returncode == 1, r
    assert "DEEP_ARCHIVE offers no Expedited retrieval" in r.stderr


# ------------------------------------------------------------------ units, no mount
def test_classification_from_head():
    from s3stashfs.store import ObjectInfo
    from s3stashfs.store.archive import archive_label, may_be_archived, readable, restore_state
    base = ObjectInfo(etag="e", size=1, last_modified_ns=0, mtime_ns=0, from_head=True)

    def info(**kw):
        return dataclasses.replace(base, **kw)
    glacier = info(storage_class="GLACIER")
    assert archive_label(glacier) == "GLACIER" and not readable(glacier)
    assert restore_state(glacier) == "not restored"
    going = info(storage_class="DEEP_ARCHIVE", restore='ongoing-request="true"')
    assert not readable(going) and restore_state(going) == "in progress"
    done = info(storage_class="GLACIER",
                restore='ongoing-request="false", expiry-date="Fri, 21 Dec 2012 00:00:00 GMT"')
    assert readable(done) and restore_state(done) == "restored until Fri, 21 Dec 2012 00:00:00 GMT"
    for tier in ("ARCHIVE_ACCESS", "DEEP_ARCHIVE_ACCESS"):
        it = info(storage_class="INTELLIGENT_TIERING", archive_status=tier)
        assert archive_label(it) == f"INTELLIGENT_TIERING {tier}" and not readable(it)
    frequent = info(storage_class="INTELLIGENT_TIERING")
    assert readable(frequent) and restore_state(frequent) is None
    for cls in ("STANDARD", "GLACIER_IR", "STANDARD_IA"):
        assert readable(info(storage_class=cls)) and archive_label(info(storage_class=cls)) is None
    listed = dataclasses.replace(base, from_head=False)
    assert may_be_archived(dataclasses.replace(listed, storage_class="GLACIER"))
    assert may_be_archived(dataclasses.replace(listed, storage_class="INTELLIGENT_TIERING"))
    assert not may_be_archived(dataclasses.replace(listed, storage_class="GLACIER_IR"))


def test_head_fields_from_botocore_and_direct_answers():
    """Both HEAD paths give the storage class, restore and archive status."""
    from s3stashfs.store import _direct_result
    from s3stashfs.store.metadata import MetadataCalls

    class Answer:
        status = 200
        headers = {"ETag": '"e"', "Content-Length": "5", "x-amz-storage-class": "GLACIER",
                   "x-amz-restore": 'ongoing-request="true"',
                   "x-amz-archive-status": "ARCHIVE_ACCESS"}
    direct = _direct_result(Answer(), "HEAD s3://b/k")
    boto = {"ETag": '"e"', "ContentLength": 5, "StorageClass": "GLACIER",
            "Restore": 'ongoing-request="true"', "ArchiveStatus": "ARCHIVE_ACCESS"}
    for r in (direct, boto):
        i = MetadataCalls._info_from_head(None, r)  # type: ignore[arg-type]
        assert (i.storage_class, i.restore, i.archive_status) == (
            "GLACIER", 'ongoing-request="true"', "ARCHIVE_ACCESS")
    plain = MetadataCalls._info_from_head(None, {"ETag": '"e"', "ContentLength": 5})  # type: ignore[arg-type]
    assert plain.storage_class == "STANDARD" and plain.restore is None


def test_restore_request_of_a_tier_has_no_days():
    """INTELLIGENT_TIERING's archive tiers take no Days (S3 refuses the request with them)."""
    from s3stashfs.archive import Archives
    from s3stashfs.store import ObjectInfo
    asked = []

    class Store:
        async def head_object(self, bucket, key):
            return ObjectInfo(etag="e", size=1, last_modified_ns=0, mtime_ns=0, from_head=True,
                              storage_class="INTELLIGENT_TIERING" if key == "it" else "GLACIER",
                              archive_status="DEEP_ARCHIVE_ACCESS" if key == "it" else None)

        async def restore_object(self, bucket, key, days, tier):
            asked.append((key, days, tier))
            return "requested"

    class Ns:
        store = Store()

    class Inodes:
        root = None

    archives = Archives(Ns(), None, Inodes())  # type: ignore[arg-type]
    listed = ObjectInfo(etag="e", size=1, last_modified_ns=0, mtime_ns=0,
                        storage_class="INTELLIGENT_TIERING")

    async def main():
        return [await archives._restore_one("b", "it", listed, 7, "Bulk"),
                await archives._restore_one("b", "g", dataclasses.replace(
                    listed, storage_class="GLACIER"), 7, "Standard")]
    results = trio.run(main)
    assert [r["state"] for r in results] == ["requested", "requested"]
    assert asked == [("it", None, "Bulk"), ("g", 7, "Standard")]
