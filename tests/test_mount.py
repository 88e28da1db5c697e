"""The mount's life: settings, the command line, errors, the root, the cache, unmounting."""
from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import time

import pytest

import helpers
from conftest import S3STASHFS_BIN, free_port
from helpers import MiB

pytestmark = pytest.mark.timeout(120)


def cli(*args, env, timeout=60):
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(text) -> str:
    if isinstance(text, bytes):
        text = text.decode()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


# ------------------------------------------------------------------ the root


def test_root_lists_buckets(mount, make_bucket, s3):
    a, b = make_bucket(), make_bucket()
    helpers.put_object(s3, b, "k.txt", b"in b\n")
    m = mount()
    names = set(os.listdir(m.path))
    assert {a, b} <= names
    assert (m.path / b / "k.txt").read_bytes() == b"in b\n"
    assert stat.S_ISDIR(os.stat(m.path / a).st_mode)
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "no-such-bucket-here")


def test_unlisted_bucket_found_by_name(mount, make_bucket, s3):
    """Bucket-scoped credentials may not list buckets: a name the root lacks is looked up."""
    shown, hidden = make_bucket(), make_bucket()
    helpers.put_object(s3, hidden, "x.txt", b"found\n")
    m = mount(env={"S3STASHFS_BUCKETS": shown})
    assert os.listdir(m.path) == [shown]
    assert (m.path / hidden / "x.txt").read_bytes() == b"found\n"


def test_bucket_prefix_root(mount, bucket, s3):
    helpers.put_object(s3, bucket, "runs/2024/a.txt", b"a\n")
    helpers.put_object(s3, bucket, "runs/2024/sub/b.txt", b"b\n")
    helpers.put_object(s3, bucket, "runs/2023/old.txt", b"old\n")
    m = mount(bucket=f"{bucket}/runs/2024")
    assert sorted(os.listdir(m.path)) == ["a.txt", "sub"]
    assert (m.path / "sub" / "b.txt").read_bytes() == b"b\n"


# ------------------------------------------------------------------ bad input


def test_help_is_complete(s3env):
    r = cli("--help", env=s3env)
    assert r.returncode == 0 and "mount" in r.stdout and "unmount" in r.stdout
    r = cli("mount", "--help", env=s3env)
    assert r.returncode == 0
    for flag in ("--bucket", "--endpoint-url", "--profile", "--region", "--cache-dir", "--read-only",
                 "--foreground", "--allow-other", "--metadata-ttl", "--log-file", "--debug",
                 "--xattrs"):
        assert flag in r.stdout, flag
    assert cli("unmount", "--help", env=s3env).returncode == 0


def test_unknown_flag_exits_2(s3env, tmp_path):
    r = cli("mount", tmp_path, "--no-such-flag", env=s3env)
    assert r.returncode == 2 and "--no-such-flag" in r.stderr


def test_bad_env_file_fails_clearly(mount, bucket, tmp_path):
    env_file = tmp_path / "broken.env"
    env_file.write_text("S3STASHFS_REGION=us-east-1\nthis line is not KEY=value\n")
    m, r = mount.run(bucket=bucket, env={"S3STASHFS_ENV": str(env_file)})
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert str(env_file) in line and "line 2" in line
    assert not m.is_mounted()


def test_bad_value_names_the_key(mount, bucket):
    m, r = mount.run(bucket=bucket, env={"S3STASHFS_METADATA_TTL": "soon"})
    assert r.returncode == 2
    assert "S3STASHFS_METADATA_TTL" in one_line(r.stderr)
    assert not m.is_mounted()


def test_missing_mountpoint(s3env, moto_server, tmp_path):
    r = cli("mount", tmp_path / "nope", "--endpoint-url", moto_server.url, "--cache-dir",
            tmp_path / "c", env=s3env)
    assert r.returncode == 2
    assert "does not exist" in one_line(r.stderr)


def test_mountpoint_not_a_directory(s3env, moto_server, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = cli("mount", f, "--endpoint-url", moto_server.url, "--cache-dir", tmp_path / "c", env=s3env)
    assert r.returncode == 2
    assert "not a directory" in one_line(r.stderr)


def test_bucket_not_found(mount):
    m, r = mount.run(bucket="no-such-bucket-anywhere")
    assert r.returncode == 1
    assert "bucket not found: no-such-bucket-anywhere" in one_line(r.stderr)
    assert not m.is_mounted()


def test_dead_endpoint_fails_fast(mount, bucket):
    t = time.monotonic()
    m, r = mount.run(bucket=bucket, endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "cannot reach S3" in one_line(r.stderr)
    assert time.monotonic() - t < 30
    assert not m.is_mounted()


def test_already_mounted(mount, bucket, moto_server, tmp_path):
    m = mount(bucket=bucket)
    r = cli("mount", m.path, "--bucket", bucket, "--endpoint-url", moto_server.url,
            "--cache-dir", tmp_path / "other-cache", env=mount.s3env)
    assert r.returncode == 1
    assert "already mounted" in one_line(r.stderr)
    assert (m.path / "..").exists() and m.is_mounted()


def test_cache_dir_in_use(mount, bucket, tmp_path):
    m = mount(bucket=bucket)
    m2, r = mount.run(bucket=bucket, cache_dir=m.cache_dir)
    assert r.returncode == 1
    assert "in use by another mount" in one_line(r.stderr)


# ------------------------------------------------------------------ read-only


def test_read_only_mount_refuses_every_change_with_erofs(mount, bucket, s3):
    helpers.put_object(s3, bucket, "dir/f.txt", b"keep me\n")
    m = mount(bucket=bucket, extra_args=["--read-only"])
    f = m.path / "dir" / "f.txt"
    attempts = {
        "create": lambda: open(m.path / "new.txt", "w"),
        "write existing": lambda: open(f, "r+b"),
        "append": lambda: open(f, "ab"),
        "truncate": lambda: os.truncate(f, 0),
        "unlink": lambda: os.unlink(f),
        "mkdir": lambda: os.mkdir(m.path / "newdir"),
        "rmdir": lambda: os.rmdir(m.path / "dir"),
        "rename": lambda: os.rename(f, m.path / "dir" / "g.txt"),
        "chmod": lambda: os.chmod(f, 0o600),
        "utime": lambda: os.utime(f, (0, 0)),
        "symlink": lambda: os.symlink("f.txt", m.path / "dir" / "link"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, (what, e.value)
    assert f.read_bytes() == b"keep me\n"
    assert s3.get_object(Bucket=bucket, Key="dir/f.txt")["Body"].read() == b"keep me\n"


# ------------------------------------------------------------------ the cache


def test_cache_files_are_private(mount, bucket, s3):
    helpers.put_random_object(s3, bucket, "a.bin", 3 * MiB)
    helpers.put_object(s3, bucket, "b.txt", b"b\n")
    m = mount(bucket=bucket)
    helpers.md5_file(m.path / "a.bin")
    (m.path / "b.txt").read_bytes()
    m.unmount()
    seen = 0
    for root, dirs, files in os.walk(m.cache_dir):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for name in files:
            p = os.path.join(root, name)
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
            seen += 1
    assert seen >= 3
    assert stat.S_IMODE(os.stat(m.cache_dir).st_mode) == 0o700


def test_file_mode_setting(mount, bucket, s3):
    helpers.put_object(s3, bucket, "b.txt", b"b\n")
    m = mount(bucket=bucket, env={"S3STASHFS_FILE_MODE": "0640"})
    (m.path / "b.txt").read_bytes()
    m.unmount()
    data = [os.path.join(r, n) for r, _, ns in os.walk(m.cache_dir / "data") for n in ns]
    assert data and all(stat.S_IMODE(os.stat(p).st_mode) == 0o640 for p in data)


def test_remount_keeps_cache(mount, bucket, s3, moto_server):
    obj = helpers.put_random_object(s3, bucket, "keep.bin", 5 * MiB)
    m = mount(bucket=bucket)
    assert helpers.md5_file(m.path / "keep.bin") == helpers.md5_hex(obj.data)
    m.unmount()
    m.remount()
    moto_server.wait_quiet()
    mark = moto_server.mark()
    assert helpers.md5_file(m.path / "keep.bin") == helpers.md5_hex(obj.data)
    moto_server.wait_quiet()
    assert moto_server.requests_since(mark, op="GetObject") == []


def test_partial_cache_survives_remount(mount, bucket, s3, moto_server):
    size = 32 * MiB
    obj = helpers.put_random_object(s3, bucket, "part.bin", size)
    m = mount(bucket=bucket)
    off = 20 * MiB
    assert helpers.read_range(m.path / "part.bin", off, 4096) == obj.data[off:off + 4096]
    m.unmount()
    m.remount()
    mark = moto_server.mark()
    assert helpers.read_range(m.path / "part.bin", off, 4096) == obj.data[off:off + 4096]
    moto_server.wait_quiet()
    assert moto_server.requests_since(mark, op="GetObject") == []


# ------------------------------------------------------------------ unmounting, logs


def test_sigterm_unmounts(mount, bucket):
    m = mount(bucket=bucket)
    pid = m.pid
    os.kill(pid, signal.SIGTERM)
    helpers.wait_for(lambda: not m.is_mounted() and not helpers.pid_alive(pid), timeout=20,
                     message="the mount to go away after SIGTERM")
    assert "SIGTERM received" in m.log_text()


def test_unmount_of_something_else_is_refused(s3env, tmp_path):
    r = cli("unmount", tmp_path, env=s3env)
    assert r.returncode == 2 and "not mounted" in one_line(r.stderr)


def test_credentials_never_logged(mount, bucket, s3, s3env):
    helpers.put_random_object(s3, bucket, "a.bin", 2 * MiB)
    m = mount(bucket=bucket, extra_args=["--debug"])
    helpers.md5_file(m.path / "a.bin")
    os.listdir(m.path)
    m.unmount()
    text = m.log_text()
    assert "DEBUG" in text  # the debug log was really written
    assert s3env["AWS_SECRET_ACCESS_KEY"] not in text
    assert not re.search(rf"\b{re.escape(s3env['AWS_ACCESS_KEY_ID'])}\b", text)
    assert "Authorization" not in text and "Signature=" not in text


def test_read_only_flag_mounts_ro(mount, bucket, s3):
    helpers.put_object(s3, bucket, "f.txt", b"f\n")
    m = mount(bucket=bucket, extra_args=["--read-only"])
    opts = [o for dev, point, fstype, o in
            ((ln.split()[0], ln.split()[1], ln.split()[2], ln.split()[3])
             for ln in open("/proc/mounts")) if point == str(m.path)]
    assert opts and "ro" in opts[0].split(",")
    assert (m.path / "f.txt").read_bytes() == b"f\n"
    with pytest.raises(OSError) as e:
        open(m.path / "g.txt", "w")
    assert e.value.errno == errno.EROFS


def test_xattrs_are_not_supported(mount, bucket, s3):
    helpers.put_object(s3, bucket, "f.txt", b"f\n")
    m = mount(bucket=bucket)
    for _ in range(2):  # the kernel remembers the answer after the first time
        with pytest.raises(OSError) as e:
            os.getxattr(m.path / "f.txt", "user.anything")
        assert e.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)


def test_kill_9_leaves_a_consistent_cache(mount, bucket, s3, moto_server):
    """After the daemon is killed mid-life, a new mount on the same cache serves right bytes
    (what the catalog had not recorded is fetched again)."""
    size = 12 * MiB
    obj = helpers.put_random_object(s3, bucket, "crash.bin", size)
    m = mount(bucket=bucket)
    assert helpers.md5_file(m.path / "crash.bin") == helpers.md5_hex(obj.data)
    pid = m.pid
    os.kill(pid, signal.SIGKILL)
    helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=10, message="the daemon to die")
    m.remount()
    assert helpers.md5_file(m.path / "crash.bin") == helpers.md5_hex(obj.data)
    for off in (0, 5 * MiB + 3, size - 100):
        assert helpers.read_range(m.path / "crash.bin", off, 100) == obj.data[off:off + 100]


def test_stray_cache_files_are_swept(mount, bucket, s3):
    """A data file no catalog row names (a crash between creating and recording it) is
    removed in the background after mount; files the catalog names are kept."""
    helpers.put_object(s3, bucket, "kept.txt", b"kept\n")
    m = mount(bucket=bucket)
    (m.path / "kept.txt").read_bytes()
    m.unmount()
    kept = [os.path.join(r, n) for r, _, ns in os.walk(m.cache_dir / "data") for n in ns]
    stray = m.cache_dir / "data" / "ab" / ("ab" + "0" * 38)
    stray.parent.mkdir(mode=0o700, exist_ok=True)
    stray.write_bytes(b"left over")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))
    m.remount()
    helpers.wait_for(lambda: not stray.exists(), timeout=20, message="the stray file to be swept")
    assert kept and all(os.path.exists(p) for p in kept)
    assert (m.path / "kept.txt").read_bytes() == b"kept\n"
