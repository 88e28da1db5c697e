"""Writes through a real mount against the real moto_server: each test checks the mount AND the
object in S3 (with boto3)."""
from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import signal
import subprocess

import pytest

import helpers
from helpers import MiB

pytestmark = pytest.mark.timeout(180)


def s3_bytes(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_keys(s3, bucket, prefix=""):
    return set(helpers.list_keys(s3, bucket, prefix))


def sh(cmd, cwd):
    return subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size", [0, 1, 5 * MiB, 150 * MiB])
def test_files_of_every_size_reach_s3(mount, s3, bucket, tmp_path, size):
    data = helpers.random_bytes(size, seed=size)
    local = tmp_path / "src.bin"
    local.write_bytes(data)
    m = mount(bucket=bucket)
    os.mkdir(m.path / "out")
    r = sh(f"cp {local} {m.path}/out/f.bin", tmp_path)
    assert r.returncode == 0, r.stderr
    # in S3 when cp returns
    head = s3.head_object(Bucket=bucket, Key="out/f.bin")
    assert head["ContentLength"] == size
    assert hashlib.md5(s3_bytes(s3, bucket, "out/f.bin")).hexdigest() == helpers.md5_hex(data)
    if size > 8 * MiB:
        assert head["ETag"].strip('"').endswith(f"-{-(-size // (8 * MiB))}")  # parallel multipart
    assert helpers.md5_file(m.path / "out" / "f.bin") == helpers.md5_hex(data)
    assert "mtime" in head["Metadata"]


def test_shell_redirects_append_and_shorter_overwrite(mount, s3, bucket):
    m = mount(bucket=bucket)
    assert sh("echo hello > log.txt && echo world >> log.txt", m.path).returncode == 0
    assert (m.path / "log.txt").read_bytes() == b"hello\nworld\n"
    assert s3_bytes(s3, bucket, "log.txt") == b"hello\nworld\n"
    assert sh("echo hi > log.txt", m.path).returncode == 0
    assert (m.path / "log.txt").read_bytes() == b"hi\n"
    assert s3_bytes(s3, bucket, "log.txt") == b"hi\n"


def test_existing_object_changed_in_the_middle(mount, s3, bucket):
    obj = helpers.put_random_object(s3, bucket, "data.bin", 3 * MiB + 5, seed=3)
    m = mount(bucket=bucket)
    patch = b"PATCHED!" * 1000
    r = subprocess.run(["dd", f"of={m.path / 'data.bin'}", "bs=1", f"seek={1 * MiB + 3}",
                        "conv=notrunc", "status=none"], input=patch, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    want = bytearray(obj.data)
    want[1 * MiB + 3:1 * MiB + 3 + len(patch)] = patch
    assert s3_bytes(s3, bucket, "data.bin") == bytes(want)
    assert (m.path / "data.bin").read_bytes() == bytes(want)


def test_holes_read_as_zeros(mount, s3, bucket):
    m = mount(bucket=bucket)
    fd = os.open(m.path / "sparse.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"end", 1 * MiB)
    finally:
        os.close(fd)
    want = b"\0" * MiB + b"end"
    assert (m.path / "sparse.bin").read_bytes() == want
    assert s3_bytes(s3, bucket, "sparse.bin") == want


def test_truncate_down_and_up_on_closed_and_open_files(mount, s3, bucket):
    helpers.put_object(s3, bucket, "t.txt", b"0123456789")
    m = mount(bucket=bucket)
    os.truncate(m.path / "t.txt", 4)
    assert s3_bytes(s3, bucket, "t.txt") == b"0123"
    os.truncate(m.path / "t.txt", 8)
    assert s3_bytes(s3, bucket, "t.txt") == b"0123\0\0\0\0"
    with open(m.path / "t.txt", "r+b") as f:
        f.truncate(2)
        f.seek(0, 2)
        f.write(b"xy")
    assert (m.path / "t.txt").read_bytes() == b"01xy"
    assert s3_bytes(s3, bucket, "t.txt") == b"01xy"


def test_second_descriptor_sees_unclosed_writes(mount, s3, bucket):
    m = mount(bucket=bucket)
    with open(m.path / "shared.txt", "wb", buffering=0) as w:
        w.write(b"not yet closed")
        assert (m.path / "shared.txt").read_bytes() == b"not yet closed"


def test_dup_flushes_upload_once_per_change(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    mark = moto_server.mark()
    fd = os.open(m.path / "dup.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"once")
    fd2 = os.dup(fd)
    os.close(fd)  # flush: uploads
    os.close(fd2)  # flush again: nothing new
    puts = moto_server.requests_since(mark, op="PutObject", key="dup.txt")
    assert len(puts) == 1
    assert s3_bytes(s3, bucket, "dup.txt") == b"once"


def test_reading_back_costs_no_download(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    data = helpers.random_bytes(2 * MiB, seed=9)
    (m.path / "back.bin").write_bytes(data)
    mark = moto_server.mark()
    assert (m.path / "back.bin").read_bytes() == data
    moto_server.wait_quiet()
    assert moto_server.requests_since(mark, op="GetObject") == []


def test_directories_mkdir_rmdir_and_errors(mount, s3, bucket):
    m = mount(bucket=bucket)
    os.mkdir(m.path / "new")
    assert "new/" in s3_keys(s3, bucket)  # a marker: empty directories persist
    with pytest.raises(FileExistsError):
        os.mkdir(m.path / "new")
    (m.path / "new" / "f.txt").write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.rmdir(m.path / "new")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(m.path / "new" / "f.txt")
    os.rmdir(m.path / "new")
    assert s3_keys(s3, bucket, "new") == set()
    assert not (m.path / "new").exists()


def test_rm_rf_of_a_tree(mount, s3, bucket):
    for k in ("tree/a.txt", "tree/sub/b.txt", "tree/sub/deeper/c.txt", "tree/empty/"):
        helpers.put_object(s3, bucket, k, b"" if k.endswith("/") else k.encode())
    m = mount(bucket=bucket)
    r = sh("rm -rf tree", m.path)
    assert r.returncode == 0, r.stderr
    assert s3_keys(s3, bucket, "tree") == set()
    assert not (m.path / "tree").exists()


def test_unlink_while_open_keeps_descriptor_working(mount, s3, bucket):
    helpers.put_object(s3, bucket, "u.txt", b"still here")
    m = mount(bucket=bucket)
    fd = os.open(m.path / "u.txt", os.O_RDONLY)
    try:
        os.unlink(m.path / "u.txt")
        assert not (m.path / "u.txt").exists()
        assert "u.txt" not in s3_keys(s3, bucket)
        assert os.pread(fd, 100, 0) == b"still here"
        assert os.fstat(fd).st_size == len(b"still here")
    finally:
        os.close(fd)
    assert "u.txt" not in s3_keys(s3, bucket)


def test_a_local_file_unlinked_while_open_reads_back_as_written(mount, s3, bucket):
    """Bytes written through the mount are the user's, with no sums until S3 has them: unlinked
    while open, they still read back as written (not checked, nothing fetched)."""
    m = mount(bucket=bucket)
    data = helpers.random_bytes(300_000, seed="local")
    with open(m.path / "l.bin", "w+b", buffering=0) as f:
        f.write(data)
        os.unlink(m.path / "l.bin")
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the next read reaches the mount
        assert os.pread(f.fileno(), len(data), 0) == data
    assert "l.bin" not in s3_keys(s3, bucket)


@pytest.mark.parametrize("name", ["with space.txt", "ünïcødé ✓.txt", "#%+?*&=:;[]{}()$.txt"])
def test_names_with_spaces_unicode_and_punctuation(mount, s3, bucket, name):
    m = mount(bucket=bucket)
    (m.path / name).write_bytes(name.encode())
    assert s3_bytes(s3, bucket, name) == name.encode()
    assert name in os.listdir(m.path)
    m.remount()
    assert (m.path / name).read_bytes() == name.encode()


def test_mtime_mode_and_owner_survive_remount(mount, s3, bucket, tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"stamped")
    os.utime(src, (1500000000, 1500000000))
    m = mount(bucket=bucket)
    assert sh(f"cp --preserve=timestamps {src} {m.path}/copy.txt", tmp_path).returncode == 0
    helpers.put_object(s3, bucket, "old.txt", b"old")
    assert sh(f"touch -d 2020-01-01T00:00:00Z {m.path}/old.txt", tmp_path).returncode == 0
    os.chmod(m.path / "old.txt", 0o640)
    os.chown(m.path / "old.txt", 1234, 5678)
    etag_before = s3.head_object(Bucket=bucket, Key="old.txt")["ETag"]
    m.remount()
    assert os.stat(m.path / "copy.txt").st_mtime == 1500000000
    st = os.stat(m.path / "old.txt")
    assert st.st_mtime == 1577836800
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    meta = s3.head_object(Bucket=bucket, Key="old.txt")["Metadata"]
    assert (meta["mtime"], meta["uid"], meta["gid"]) == ("1577836800", "1234", "5678")
    assert int(meta["mode"]) & 0o7777 == 0o640
    assert s3_bytes(s3, bucket, "old.txt") == b"old"
    assert s3.head_object(Bucket=bucket, Key="old.txt")["ETag"] == etag_before  # not re-uploaded


def test_concurrent_writers(mount, s3, bucket):
    m = mount(bucket=bucket)
    datas = {f"c/{i}.bin": helpers.random_bytes(1 * MiB + i, seed=i) for i in range(6)}
    os.mkdir(m.path / "c")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda kv: (m.path / kv[0]).write_bytes(kv[1]), datas.items()))
    for k, d in datas.items():
        assert s3_bytes(s3, bucket, k) == d
    # disjoint ranges of one file
    size = 4 * MiB
    fd = os.open(m.path / "one.bin", os.O_RDWR | os.O_CREAT, 0o644)
    parts = [helpers.random_bytes(size // 4, seed=50 + i) for i in range(4)]
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: os.pwrite(fd, parts[i], i * (size // 4)), range(4)))
    finally:
        os.close(fd)
    assert s3_bytes(s3, bucket, "one.bin") == b"".join(parts)


def test_hard_links_refused_cleanly(mount, s3, bucket):
    helpers.put_object(s3, bucket, "h.txt", b"h")
    m = mount(bucket=bucket)
    with pytest.raises(OSError) as e:
        os.link(m.path / "h.txt", m.path / "h2.txt")
    assert e.value.errno in (errno.EPERM, errno.ENOTSUP)


def test_write_then_rename(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    with open(m.path / "part.tmp", "wb") as f:
        f.write(b"result")
    mark = moto_server.mark()
    os.rename(m.path / "part.tmp", m.path / "part.csv")
    assert s3_bytes(s3, bucket, "part.csv") == b"result"
    assert "part.tmp" not in s3_keys(s3, bucket)
    assert moto_server.requests_since(mark, op="PutObject") == []  # a server-side copy
    assert os.listdir(m.path) == ["part.csv"]
    assert (m.path / "part.csv").read_bytes() == b"result"
    # over an existing file, and refused with RENAME_NOREPLACE semantics by mv -n
    helpers.put_object(s3, bucket, "other.csv", b"other")
    os.rename(m.path / "part.csv", m.path / "other.csv")
    assert s3_bytes(s3, bucket, "other.csv") == b"result"
    assert s3_keys(s3, bucket) == {"other.csv"}
    (m.path / "third.csv").write_bytes(b"third")
    sh("mv -n third.csv other.csv", m.path)
    assert s3_bytes(s3, bucket, "other.csv") == b"result"


def test_rename_of_a_dirty_file_moves_it_locally(mount, s3, bucket):
    m = mount(bucket=bucket)
    f = open(m.path / "draft.txt", "wb")
    f.write(b"draft")
    f.flush()
    os.rename(m.path / "draft.txt", m.path / "final.txt")  # still open, never uploaded
    f.write(b" done")
    f.close()
    assert s3_bytes(s3, bucket, "final.txt") == b"draft done"
    assert "draft.txt" not in s3_keys(s3, bucket)


def test_rename_of_a_non_empty_directory(mount, s3, bucket):
    for k in ("proj/a.txt", "proj/sub/b.txt", "proj/empty/"):
        helpers.put_object(s3, bucket, k, b"" if k.endswith("/") else k.encode())
    m = mount(bucket=bucket)
    assert (m.path / "proj" / "sub" / "b.txt").read_bytes() == b"proj/sub/b.txt"
    os.rename(m.path / "proj", m.path / "renamed")
    assert s3_keys(s3, bucket) == {"renamed/a.txt", "renamed/sub/b.txt", "renamed/empty/", "renamed/"}
    assert s3_bytes(s3, bucket, "renamed/sub/b.txt") == b"proj/sub/b.txt"
    assert sorted(os.listdir(m.path / "renamed")) == ["a.txt", "empty", "sub"]
    assert (m.path / "renamed" / "sub" / "b.txt").read_bytes() == b"proj/sub/b.txt"
    assert not (m.path / "proj").exists()


@pytest.mark.expect_log("unreachable", "upload of .* failed")
def test_server_down_close_fails_and_data_reaches_s3_later(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    os.listdir(m.path)
    moto_server.stop()
    try:
        f = open(m.path / "later.txt", "wb")
        f.write(b"written while S3 was away")
        with pytest.raises(OSError) as e:
            f.close()
        assert e.value.errno == errno.ENETUNREACH
        # the data is still there, in the mount
        assert (m.path / "later.txt").read_bytes() == b"written while S3 was away"
    finally:
        moto_server.start()
    helpers.wait_for(lambda: "later.txt" in s3_keys(s3, bucket), timeout=30,
                     message="the pending upload to reach S3 after the server came back")
    assert s3_bytes(s3, bucket, "later.txt") == b"written while S3 was away"


@pytest.mark.expect_log("unreachable", "upload of .* failed")
def test_kill_9_with_a_dirty_file_then_remount_uploads_it(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    os.listdir(m.path)
    moto_server.stop()
    try:
        with pytest.raises(OSError):
            with open(m.path / "orphan.txt", "wb") as f:
                f.write(b"must not be lost")
    finally:
        pid = m.pid
        os.kill(pid, signal.SIGKILL)
        helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=10)
        moto_server.start()
    assert "orphan.txt" not in s3_keys(s3, bucket)
    m.remount()
    helpers.wait_for(lambda: "orphan.txt" in s3_keys(s3, bucket), timeout=60,
                     message="the dirty file to be uploaded after the remount")
    assert s3_bytes(s3, bucket, "orphan.txt") == b"must not be lost"
    assert (m.path / "orphan.txt").read_bytes() == b"must not be lost"


def test_editor_swap_files_stay_local(mount, s3, bucket):
    m = mount(bucket=bucket)
    (m.path / ".notes.txt.swp").write_bytes(b"swap")
    (m.path / "notes.txt").write_bytes(b"notes")
    assert s3_keys(s3, bucket) == {"notes.txt"}
    assert sorted(os.listdir(m.path)) == [".notes.txt.swp", "notes.txt"]
    m.remount()  # kept in the cache across mounts, still never uploaded
    assert (m.path / ".notes.txt.swp").read_bytes() == b"swap"
    assert s3_keys(s3, bucket) == {"notes.txt"}
    os.unlink(m.path / ".notes.txt.swp")
    assert os.listdir(m.path) == ["notes.txt"]


def test_local_only_patterns_are_a_setting(mount, s3, bucket):
    m = mount(bucket=bucket, env={"S3STASHFS_LOCAL_ONLY": "*.partial"})
    (m.path / "download.partial").write_bytes(b"half")
    (m.path / ".x.swp").write_bytes(b"uploaded now: the setting replaced the defaults")
    assert s3_keys(s3, bucket) == {".x.swp"}
    os.rename(m.path / "download.partial", m.path / "download.done")
    helpers.wait_for(lambda: "download.done" in s3_keys(s3, bucket), timeout=30,
                     message="the renamed file to be uploaded under its uploadable name")
    assert s3_bytes(s3, bucket, "download.done") == b"half"


def test_symlinks_the_s3fs_way(mount, s3, bucket):
    m = mount(bucket=bucket)
    (m.path / "results.csv").write_bytes(b"a,b\n")
    os.symlink("results.csv", m.path / "latest")
    assert os.readlink(m.path / "latest") == "results.csv"
    assert (m.path / "latest").read_bytes() == b"a,b\n"
    head = s3.head_object(Bucket=bucket, Key="latest")
    assert s3_bytes(s3, bucket, "latest") == b"results.csv"
    assert int(head["Metadata"]["mode"]) == 0o120777  # what s3fs writes and reads
    # a link s3fs made
    s3.put_object(Bucket=bucket, Key="from-s3fs", Body=b"results.csv",
                  Metadata={"mode": str(0o120777)})
    assert os.readlink(m.path / "from-s3fs") == "results.csv"
    m.remount()
    assert os.path.islink(m.path / "latest")
    assert os.readlink(m.path / "latest") == "results.csv"
    assert sorted(os.listdir(m.path)) == ["from-s3fs", "latest", "results.csv"]
    os.unlink(m.path / "latest")
    assert "latest" not in s3_keys(s3, bucket)


def test_user_xattrs_are_object_metadata(mount, s3, bucket):
    helpers.put_object(s3, bucket, "r.csv", b"1,2\n", Metadata={"project": "beta"})
    etag = s3.head_object(Bucket=bucket, Key="r.csv")["ETag"].strip('"')
    m = mount(bucket=bucket, extra_args=["--xattrs"])
    f = m.path / "r.csv"
    assert os.getxattr(f, "user.project") == b"beta"
    assert os.getxattr(f, "user.s3.uri") == f"s3://{bucket}/r.csv".encode()
    assert os.getxattr(f, "user.s3.etag") == etag.encode()
    assert os.getxattr(f, "user.s3.cache") == b"none"
    f.read_bytes()
    # recorded once the GET's thread hands over, which may come just after the read's answer
    helpers.wait_for(lambda: os.getxattr(f, "user.s3.cache") == b"complete, verified (MD5)",
                     timeout=10, message="r.csv recorded as verified by its MD5")
    os.setxattr(f, "user.project", b"alpha")
    os.setxattr(f, "user.owner", b"lab-7")
    assert s3.head_object(Bucket=bucket, Key="r.csv")["Metadata"] == {"project": "alpha", "owner": "lab-7"}
    assert s3_bytes(s3, bucket, "r.csv") == b"1,2\n"  # changed in place
    assert set(os.listxattr(f)) >= {"user.project", "user.owner", "user.s3.uri", "user.s3.etag",
                                    "user.s3.cache"}
    os.removexattr(f, "user.owner")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.owner")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.s3.etag", b"forged")
    assert e.value.errno == errno.EPERM
    m.remount(extra_args=["--xattrs"])
    assert os.getxattr(m.path / "r.csv", "user.project") == b"alpha"
    # a file being written takes its xattrs with its upload
    with open(m.path / "new.txt", "wb") as w:
        w.write(b"n")
        os.setxattr(m.path / "new.txt", "user.stage", b"raw")
    assert s3.head_object(Bucket=bucket, Key="new.txt")["Metadata"]["stage"] == "raw"


def test_reader_sees_what_a_write_only_descriptor_wrote(mount, s3, bucket):
    """Write-only descriptors bypass the page cache; readers must still see their bytes."""
    helpers.put_object(s3, bucket, "coherent.txt", b"A" * 8192)
    m = mount(bucket=bucket)
    p = m.path / "coherent.txt"
    with open(p, "rb") as r:
        assert r.read() == b"A" * 8192  # the kernel now caches these pages
        fd = os.open(p, os.O_WRONLY)
        try:
            os.pwrite(fd, b"B" * 100, 10)
        finally:
            os.close(fd)
        r.seek(0)
        assert r.read(200) == b"A" * 10 + b"B" * 100 + b"A" * 90
    assert p.read_bytes()[:200] == b"A" * 10 + b"B" * 100 + b"A" * 90
    assert s3_bytes(s3, bucket, "coherent.txt")[:200] == b"A" * 10 + b"B" * 100 + b"A" * 90


def test_large_file_written_front_to_back_is_uploaded_while_written(mount, s3, bucket, moto_server):
    m = mount(bucket=bucket)
    data = helpers.random_bytes(40 * MiB + 123, seed=77)
    mark = moto_server.mark()
    with open(m.path / "stream.bin", "wb") as f:
        for off in range(0, 36 * MiB, MiB):
            f.write(data[off:off + MiB])
        # parts are on their way before the file is closed
        helpers.wait_for(lambda: len(moto_server.requests_since(mark, op="UploadPart")) >= 3,
                         timeout=30, message="parts to be uploaded while the file is written")
        f.write(data[36 * MiB:])
    assert s3_bytes(s3, bucket, "stream.bin") == data
    assert s3.head_object(Bucket=bucket, Key="stream.bin")["ETag"].strip('"').endswith("-6")
    assert (m.path / "stream.bin").read_bytes() == data


@pytest.mark.parametrize("change", ["rewrite-early-part", "truncate", "chmod"])
def test_a_file_not_written_front_to_back_is_uploaded_whole(mount, s3, bucket, change):
    m = mount(bucket=bucket)
    data = bytearray(helpers.random_bytes(24 * MiB, seed=78))
    with open(m.path / "twist.bin", "wb") as f:
        f.write(data[:20 * MiB])
        if change == "rewrite-early-part":
            f.seek(3 * MiB)
            f.write(b"X" * 1000)
            data[3 * MiB:3 * MiB + 1000] = b"X" * 1000
            f.seek(20 * MiB)
            f.write(data[20 * MiB:])
        elif change == "truncate":
            f.truncate(12 * MiB)
            del data[12 * MiB:]
        else:
            os.chmod(m.path / "twist.bin", 0o600)
            f.write(data[20 * MiB:])
    assert s3_bytes(s3, bucket, "twist.bin") == bytes(data)
    assert (m.path / "twist.bin").read_bytes() == bytes(data)
