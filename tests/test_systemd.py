"""The systemd user unit: it verifies, and the daemon does what Type=notify promises."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

import helpers
from conftest import S3STASHFS_BIN

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "s3stashfs.service"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def verify(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    unit = tmp_path / "s3stashfs.service"
    unit.write_text(text)
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    assert "Type=notify" in text and "Restart=on-failure" in text
    assert "mount --foreground %h/s3" in text
    # verify checks that ExecStart exists: point it at this checkout's s3stashfs
    r = verify(text.replace("%h/.local/bin/s3stashfs", str(S3STASHFS_BIN)), tmp_path)
    assert r.returncode == 0, r.stderr
    # and the check can fail
    bad = verify(text.replace("Type=notify", "Type=notifyy"), tmp_path)
    assert bad.returncode != 0 or "notifyy" in bad.stderr


def test_foreground_mount_notifies_readiness_and_unmounts_on_sigterm(moto_server, s3, bucket,
                                                                      s3env, tmp_path):
    helpers.put_object(s3, bucket, "hello.txt", b"hi\n")
    mnt = Path("/tmp") / f"s3stashfs-notify-{os.getpid()}"
    mnt.mkdir(exist_ok=True)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = {**s3env, "NOTIFY_SOCKET": str(sock_path)}
    proc = subprocess.Popen([str(S3STASHFS_BIN), "mount", "--foreground", str(mnt), "--bucket",
                             bucket, "--endpoint-url", moto_server.url, "--cache-dir",
                             str(tmp_path / "cache"), "--log-file", str(tmp_path / "log")],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        msg = sock.recv(1024).decode()
        assert "READY=1" in msg
        assert (mnt / "hello.txt").read_bytes() == b"hi\n"  # ready means it answers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not helpers.mounted_at(mnt)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if helpers.mounted_at(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], timeout=30)
        mnt.rmdir()
