"""Start-up cost of the commands: `--help`, `status`, `cache size`, `unmount` and the parent
process of `mount` import neither boto3/botocore, nor pyfuse3, nor trio (together about 0.8 s
of every command's start on the bench machine); only the mount's daemon does. Each command
runs, for real, in a child Python that reports the modules it ended up with."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("boto3", "botocore", "s3transfer", "urllib3", "pyfuse3", "trio")

PROBE = """
import json, os, sys
from s3stashfs import cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
with open(os.environ["PROBE_OUT"], "w") as f:
    json.dump({"rc": rc, "modules": sorted(m for m in HEAVY if m in sys.modules)}, f)
""".replace("HEAVY", repr(HEAVY))

pytestmark = pytest.mark.timeout(120)


def run_cli(tmp_path: Path, env: dict[str, str], *args) -> dict:
    out = tmp_path / "probe.json"
    env = dict(env, PROBE_OUT=str(out))
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=90, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    result = json.loads(out.read_text())
    result["stdout"], result["stderr"] = r.stdout, r.stderr
    out.unlink()
    return result


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"], ["mount", "--help"]])
def test_help_imports_no_heavy_module(tmp_path, args):
    r = run_cli(tmp_path, dict(os.environ), *args)
    assert r["rc"] == 0 and "usage" in r["stdout"]
    assert r["modules"] == []


def test_commands_of_a_mount_import_no_heavy_module(mount, bucket, s3, tmp_path):
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"hello\n")
    m = mount(bucket=bucket)
    assert (m.path / "a.txt").read_bytes() == b"hello\n"

    st = run_cli(tmp_path, m.env, "status", m.path, "--json")
    assert st["rc"] == 0, st
    assert json.loads(st["stdout"])["pid"] == m.pid
    assert st["modules"] == []
    size = run_cli(tmp_path, m.env, "cache", "size", m.path, "--json")
    assert size["rc"] == 0 and json.loads(size["stdout"])["objects"] >= 1
    assert size["modules"] == []

    un = run_cli(tmp_path, m.env, "unmount", m.path)
    assert un["rc"] == 0 and not m.is_mounted() and not m.daemon_alive(), un
    assert un["modules"] == []
    m.mounted = False

    # the parent of a mount only checks and waits; its daemon does the importing
    log_file = tmp_path / "again.log"
    mo = run_cli(tmp_path, m.env, *m.factory.argv(m, log_file)[len(m.factory.command):])
    assert mo["rc"] == 0, (mo, log_file.read_text() if log_file.exists() else "")
    try:
        assert m.is_mounted()
        assert (m.path / "a.txt").read_bytes() == b"hello\n"
        assert mo["modules"] == []
    finally:
        assert run_cli(tmp_path, m.env, "unmount", m.path)["rc"] == 0
    assert not m.is_mounted()


def test_sweep_after_mount_removes_only_old_files_no_row_names(tmp_path):
    """The sweep at every mount start (cache/files.sweep_files, rewritten with scandir for
    caches of 100,000 objects): an old file no row names goes, with its sidecars; a named file
    and its sidecars stay, and so does a young unnamed one (it may be being recorded)."""
    import time

    from s3stashfs.cache.files import sweep_files
    from s3stashfs.cache.objects import SIDECARS
    sub = tmp_path / "data" / "ab"
    sub.mkdir(parents=True)
    old = time.time() - 3600
    files = {name: sub / name for name in ("ab01", "ab02", "ab03")}
    for name in ("ab01", "ab02"):
        for suffix in ("", *SIDECARS):
            p = sub / (name + suffix)
            p.write_bytes(b"x")
            os.utime(p, (old, old))
    files["ab03"].write_bytes(b"young")
    (tmp_path / "data" / "stray-file-not-a-dir").write_bytes(b"x")
    removed = sweep_files(tmp_path, {"data/ab/ab01"}, time.time() - 60)
    assert removed == 1 + len(SIDECARS)
    assert all((sub / ("ab01" + s)).exists() for s in ("", *SIDECARS))
    assert not any((sub / ("ab02" + s)).exists() for s in ("", *SIDECARS))
    assert files["ab03"].exists()
    assert sweep_files(tmp_path / "nothing-here", set(), time.time()) == 0
