"""The commands beside `mount` (status, cache, pin, unpin, sync): their output, JSON and exit
codes, through a real mount (they talk to it over its control socket) and on an unmounted cache
directory. S3 is made unreachable for the mount by the loopback proxy; the tests' own boto3
client still reaches moto."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time

import pytest

import helpers
from conftest import S3STASHFS_BIN
from helpers import MiB

pytestmark = [pytest.mark.timeout(180), pytest.mark.expect_log("unreachable|offline")]


def cli(env, *args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def cli_json(env, *args, code=0):
    r = cli(env, *args, "--json")
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def test_status_online_offline_and_unmounted(mount, s3, bucket, s3_proxy):
    data = helpers.random_bytes(300_000, seed="status")
    helpers.put_object(s3, bucket, "dir/a.bin", data)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    assert (m.path / "dir" / "a.bin").read_bytes() == data

    st = cli_json(m.env, "status", m.path)
    assert st["mounted"] and st["online"] and st["mountpoint"] == str(m.path)
    assert st["cache"]["objects"] >= 1
    assert st["cache"]["bytes"] >= len(data)
    assert st["pending"] == [] and st["conflicts"] == []
    # without a MOUNTPOINT, the settings' cache directory names the mount
    assert cli_json(m.env, "status", "--cache-dir", m.cache_dir)["pid"] == st["pid"]

    t = time.time()
    helpers.cut_off(m, s3_proxy)
    r = cli(m.env, "status", m.path)
    assert r.returncode == 3, r
    assert "OFFLINE since" in r.stdout
    st2 = cli_json(m.env, "status", m.path, code=3)
    assert st2["online"] is False and st2["since"] >= t - 1

    s3_proxy.set_mode("pass")
    helpers.wait_for(lambda: cli(m.env, "status", m.path).returncode == 0, timeout=30,
                     message="status to say online again")
    m.unmount()
    st3 = cli_json(m.env, "status", "--cache-dir", m.cache_dir, code=4)
    assert st3["mounted"] is False
    assert st3["cache"]["bytes"] == st["cache"]["bytes"]
    r = cli(m.env, "status", "--cache-dir", m.cache_dir)
    assert r.returncode == 4 and "not mounted" in r.stdout
    r = cli(m.env, "sync", "--cache-dir", m.cache_dir)
    assert r.returncode == 4 and "nothing pending" in r.stdout


def test_status_lists_pending_and_sync_uploads_them(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "old.txt", b"old\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--offline-writes", "queue"])
    assert (m.path / "old.txt").read_bytes() == b"old\n"
    helpers.cut_off(m, s3_proxy)
    (m.path / "new.txt").write_bytes(b"written offline\n")  # queued: close() succeeds
    (m.path / ".new.txt.swp").write_bytes(b"an editor's swap file\n")  # local only
    st = cli_json(m.env, "status", m.path, code=3)
    assert [(p["op"], p["key"]) for p in st["pending"]] == [("upload", "new.txt")]
    assert st["cache"]["dirty_objects"] == 2

    # unmounted (still offline), the cache directory says the same
    m.unmount()
    st = cli_json(m.env, "status", "--cache-dir", m.cache_dir, code=4)
    assert [(p["op"], p["key"]) for p in st["pending"]] == [("upload", "new.txt")]
    r = cli(m.env, "sync", "--cache-dir", m.cache_dir)
    assert r.returncode == 4 and "1 change(s) wait" in r.stdout, r
    m.remount()  # offline: the cache has something to serve

    # sync while S3 cannot be reached: nothing goes, the change stays pending, exit 1
    r = cli(m.env, "sync", m.path)
    assert r.returncode == 1, r
    assert "still pending: " in r.stdout and "new.txt" in r.stdout
    assert "new.txt" not in helpers.list_keys(s3, bucket)

    s3_proxy.set_mode("pass")
    r = cli_json(m.env, "sync", m.path)
    assert r["failed"] == [] and r["conflicts"] == []
    # when sync returns, the change is in S3
    assert s3.get_object(Bucket=bucket, Key="new.txt")["Body"].read() == b"written offline\n"
    assert cli_json(m.env, "status", m.path)["pending"] == []
    assert cli(m.env, "sync", m.path).returncode == 0  # nothing left: still 0


def test_conflicts_are_reported_by_status(mount, s3, bucket, s3_proxy):
    helpers.put_object(s3, bucket, "a.txt", b"base\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--offline-writes", "queue"])
    m.expect_log("conflict")
    assert (m.path / "a.txt").read_bytes() == b"base\n"
    helpers.cut_off(m, s3_proxy)
    (m.path / "a.txt").write_bytes(b"mine\n")
    helpers.put_object(s3, bucket, "a.txt", b"theirs\n")
    s3_proxy.set_mode("pass")
    cli(m.env, "sync", m.path)  # whoever uploads it, the conflict must be recorded

    def conflicts():
        return cli_json(m.env, "status", m.path)["conflicts"]
    helpers.wait_for(lambda: conflicts(), timeout=30, message="the conflict to be reported")
    (c,) = conflicts()
    assert c["key"] == "a.txt" and "kept as " in c["message"]
    kept = c["message"].rsplit("kept as ", 1)[1].strip()
    assert s3.get_object(Bucket=bucket, Key="a.txt")["Body"].read() == b"theirs\n"
    assert s3.get_object(Bucket=bucket, Key=kept)["Body"].read() == b"mine\n"
    r = cli(m.env, "status", m.path)
    assert "conflicts  1" in r.stdout and kept in r.stdout


def test_status_shows_errors_per_file(mount, s3, bucket):
    """A read that fails for a reason of its own file (here: the object changed under an open
    file) is listed by status with the file's name; the same error once, not per read."""
    helpers.put_random_object(s3, bucket, "big.bin", 24 * MiB)
    m = mount(bucket=bucket)
    m.expect_log("changed while open")
    with open(m.path / "big.bin", "rb") as f:
        f.read(4096)
        helpers.put_random_object(s3, bucket, "big.bin", 24 * MiB, seed=1)
        for _ in range(2):
            f.seek(20 * MiB)
            with pytest.raises(OSError) as e:
                f.read(4096)
            assert e.value.errno == errno.EIO
    errors = cli_json(m.env, "status", m.path)["errors"]
    assert [(x["key"], "changed" in x["message"]) for x in errors] == [("big.bin", True)]
    assert "big.bin: read: " in cli(m.env, "status", m.path).stdout


def test_cache_commands_mounted_and_unmounted(mount, s3, bucket):
    blobs = {f"f{i}.bin": helpers.random_bytes(200_000 + i, seed=i) for i in range(4)}
    for k, v in blobs.items():
        helpers.put_object(s3, bucket, k, v)
    m = mount(bucket=bucket)
    for k, v in blobs.items():
        assert (m.path / k).read_bytes() == v
    total = sum(map(len, blobs.values()))

    size = cli_json(m.env, "cache", "size", m.path)
    assert size["objects"] == 4 and size["bytes"] >= total
    r = cli(m.env, "cache", "size", m.path)
    assert r.returncode == 0 and "in 4 files" in r.stdout

    # nothing is older than an hour; a date in the future takes everything not open
    assert cli_json(m.env, "cache", "prune", m.path, "--older-than", "1h")["objects"] == 0
    with open(m.path / "f0.bin", "rb") as held:
        pruned = cli_json(m.env, "cache", "prune", m.path, "--older-than", "2099-01-01")
        assert pruned["objects"] == 3 and pruned["kept_open"] == 1
        assert held.read() == blobs["f0.bin"]
    assert cli_json(m.env, "cache", "size", m.path)["objects"] == 1
    assert (m.path / "f1.bin").read_bytes() == blobs["f1.bin"]  # fetched again

    r = cli(m.env, "cache", "prune", m.path, "--older-than", "last tuesday")
    assert r.returncode == 2 and "--older-than" in r.stderr

    # unmounted: the commands work on the cache directory itself
    m.unmount()
    assert cli_json(m.env, "cache", "size", "--cache-dir", m.cache_dir)["objects"] == 2
    assert cli_json(m.env, "cache", "verify", "--cache-dir", m.cache_dir)["bad_blocks"] == 0
    data_files = [p for p in (m.cache_dir / "data").rglob("*")
                  if p.is_file() and p.stat().st_size == len(blobs["f1.bin"])]
    assert len(data_files) == 1
    with open(data_files[0], "r+b") as f:
        f.seek(70_000)
        f.write(b"\xff" * 10)
    r = cli(m.env, "cache", "verify", "--cache-dir", m.cache_dir)
    assert r.returncode == 3, r
    assert "bad block" in r.stdout and "f1.bin" in r.stdout
    assert cli(m.env, "cache", "verify", "--cache-dir", m.cache_dir).returncode == 0
    left = cli_json(m.env, "cache", "size", "--cache-dir", m.cache_dir)["objects"]
    assert left >= 1  # f0; f1 too, unless its bad block took all of it (small: MD5-checked)
    cleared = cli_json(m.env, "cache", "clear", "--cache-dir", m.cache_dir)
    assert cleared["objects"] == left
    assert cli_json(m.env, "cache", "size", "--cache-dir", m.cache_dir)["objects"] == 0
    m.remount()
    assert (m.path / "f1.bin").read_bytes() == blobs["f1.bin"]

    r = cli(m.env, "cache", "size", "--cache-dir", m.cache_dir / "nowhere")
    assert r.returncode == 1 and "no s3stashfs cache" in r.stderr


def test_pin_a_prefix_then_it_all_reads_offline(mount, s3, bucket, s3_proxy):
    files = {f"project/s{i}/r{j}.txt": helpers.random_bytes(5000 * (i + 1) + j, seed=f"{i}{j}")
             for i in range(3) for j in range(4)}
    files["project/big.bam"] = helpers.random_bytes(6 * MiB + 123, seed="bam")
    for k, v in files.items():
        helpers.put_object(s3, bucket, k, v)
    helpers.put_object(s3, bucket, "other/x.txt", b"not pinned\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)

    r = cli(m.env, "pin", m.path / "project", "--progress")
    assert r.returncode == 0, r
    assert f"pinned {len(files)} of {len(files)} files" in r.stdout
    assert "files" in r.stderr and "left" in r.stderr  # the progress bar
    st = cli_json(m.env, "status", m.path)
    assert st["cache"]["pinned_objects"] == len(files)
    assert st["cache"]["pinned_bytes"] >= sum(map(len, files.values()))

    helpers.cut_off(m, s3_proxy)
    for k, v in files.items():
        assert (m.path / k).read_bytes() == v, k

    s3_proxy.set_mode("pass")
    helpers.wait_for(lambda: cli(m.env, "status", m.path).returncode == 0, timeout=30,
                     message="back online")
    r = cli_json(m.env, "unpin", m.path / "project" / "s1")
    assert r["files"] == 4
    assert cli_json(m.env, "status", m.path)["cache"]["pinned_objects"] == len(files) - 4


def test_pin_errors(mount, s3, bucket, s3_proxy, tmp_path):
    helpers.put_object(s3, bucket, "a.txt", b"a\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    r = cli(m.env, "pin", tmp_path)
    assert r.returncode == 2 and "not inside an s3stashfs mount" in r.stderr
    r = cli(m.env, "pin", m.path / "missing.txt")
    assert r.returncode == 1 and "No such file" in r.stderr
    helpers.cut_off(m, s3_proxy)
    t = time.monotonic()
    r = cli(m.env, "pin", m.path)  # the whole bucket: needs a listing, so S3
    assert r.returncode == 1 and "unreachable" in r.stderr.lower(), r
    assert time.monotonic() - t < 10  # at once, not a hang (the command's own start included)
    s3_proxy.set_mode("pass")


def _as_nobody(fn, *args, cwd_fd=None) -> int:
    """Run ``fn(*args)`` in a forked child with uid/gid 65534 (in directory ``cwd_fd``, entered
    before the uid changes); it returns the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            if cwd_fd is not None:
                os.fchdir(cwd_fd)
            os.setgid(65534)
            os.setuid(65534)
            code = fn(*args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_control_socket_is_private(mount, s3, bucket):
    import socket

    m = mount(bucket=bucket)
    m.expect_log("refused a connection from uid 65534")
    sock = m.cache_dir / "control.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(m.cache_dir.stat().st_mode) == 0o700

    def connect_and_ask(path) -> int:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        try:
            s.connect(path)
        except PermissionError:
            return 13
        try:
            s.sendall(b'{"cmd": "status"}\n')
            return 0 if s.recv(100) else 1  # an answer, or the connection closed unanswered
        except ConnectionError:
            return 1

    assert _as_nobody(connect_and_ask, str(sock)) == 13  # the file modes keep others out
    # and past the modes (socket opened up, reached from a working directory the child entered
    # as root), the mount itself refuses other users (SO_PEERCRED)
    dir_fd = os.open(m.cache_dir, os.O_RDONLY | os.O_DIRECTORY)
    os.chmod(sock, 0o666)
    os.chmod(m.cache_dir, 0o711)
    try:
        assert _as_nobody(connect_and_ask, "control.sock", cwd_fd=dir_fd) == 1
    finally:
        os.chmod(m.cache_dir, 0o700)
        os.chmod(sock, 0o600)
        os.close(dir_fd)
    assert cli_json(m.env, "status", m.path)["mounted"]
    m.unmount()
    assert not sock.exists()
