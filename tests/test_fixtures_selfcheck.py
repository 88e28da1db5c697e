"""Checks of the test infrastructure itself: moto_server, request accounting, the
helpers, the biodata files, and the mount fixture's machinery (driven by a fake
`s3stashfs` that bind-mounts a directory, since the real one is not needed here)."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import botocore.exceptions
import pytest

import biodata
import helpers
from conftest import S3STASHFS_BIN, make_s3_client
from helpers import KiB, MiB

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------- moto_server


def test_moto_server_runs_on_loopback(moto_server, s3env):
    assert moto_server.is_running() and helpers.pid_alive(moto_server.pid)
    assert moto_server.url == f"http://127.0.0.1:{moto_server.port}"
    assert moto_server.answers()
    assert s3env["AWS_ACCESS_KEY_ID"] == "testing"
    assert s3env["AWS_SECRET_ACCESS_KEY"] == "testing-secret"
    assert s3env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not any(k.startswith("S3STASHFS_") and k != "S3STASHFS_ENV" for k in s3env)
    assert Path(s3env["S3STASHFS_ENV"]).read_text() == ""


def test_bucket_fixture_is_fresh_and_deleted_afterwards(s3, make_bucket):
    a, b = make_bucket(), make_bucket()
    assert a != b and len(a) <= 63
    assert helpers.list_keys(s3, a) == []
    # Deletion is checked by the next test.
    test_bucket_fixture_is_fresh_and_deleted_afterwards.made = (a, b)


def test_buckets_of_previous_test_are_gone(s3):
    made = getattr(test_bucket_fixture_is_fresh_and_deleted_afterwards, "made", ())
    names = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert not names & set(made)


# ------------------------------------------------------------------- request accounting


def test_request_accounting_by_method_key_and_range(moto_server, s3, bucket):
    obj = helpers.put_random_object(s3, bucket, "dir/a b+c.bin", 1 * MiB)
    # The tests' own client is left out by default...
    assert moto_server.requests_since() == []
    mark = moto_server.mark()
    s3.head_object(Bucket=bucket, Key=obj.key)
    body = s3.get_object(Bucket=bucket, Key=obj.key, Range="bytes=65536-131071", IfMatch=obj.etag)
    assert body["Body"].read() == obj.data[64 * KiB : 128 * KiB]
    s3.list_objects_v2(Bucket=bucket, Prefix="dir/", Delimiter="/")
    # ...and counted when asked for.
    reqs = moto_server.requests_since(mark, include_tests=True)
    assert [r.op for r in reqs] == ["HeadObject", "GetObject", "ListObjectsV2"], reqs
    head, get, listing = reqs
    assert (head.method, head.bucket, head.key, head.range) == ("HEAD", bucket, obj.key, None)
    assert (get.method, get.key, get.range) == ("GET", obj.key, "bytes=65536-131071")
    assert get.range_span() == (64 * KiB, 128 * KiB)
    assert get.if_match.strip('"') == obj.etag.strip('"')
    assert (listing.method, listing.key) == ("GET", None)
    assert listing.query["list-type"] == "2" and listing.query["prefix"] == "dir/"
    assert listing.query["delimiter"] == "/"
    assert all(r.from_tests for r in reqs)
    # Filters.
    assert moto_server.requests_since(mark, include_tests=True, op="GetObject") == [get]
    assert moto_server.requests_since(mark, include_tests=True, method="head") == [head]
    assert moto_server.requests_since(mark, include_tests=True, key="nope") == []


def test_requests_of_another_client_count_by_default(moto_server, s3, bucket):
    """A client without the tests' User-Agent marker - like the mount - is counted."""
    helpers.put_random_object(s3, bucket, "big.bin", 4 * MiB)
    other = make_s3_client(moto_server.url, user_agent_extra="not-the-tests")
    mark = moto_server.mark()
    other.get_object(Bucket=bucket, Key="big.bin", Range="bytes=2097152-2101247")["Body"].read()
    other.get_object(Bucket=bucket, Key="big.bin", Range="bytes=-100")["Body"].read()
    s3.head_object(Bucket=bucket, Key="big.bin")  # ours: not counted
    gets = moto_server.requests_since(mark, op="GetObject", key="big.bin")
    assert len(moto_server.requests_since(mark)) == 2
    assert [g.range_span(4 * MiB) for g in gets] == [
        (2 * MiB, 2 * MiB + 4 * KiB),
        (4 * MiB - 100, 4 * MiB),
    ]
    assert sum(e - s for s, e in (g.range_span(4 * MiB) for g in gets)) == 4 * KiB + 100


def test_marks_and_reset(moto_server, s3, bucket):
    s3.head_bucket(Bucket=bucket)
    m1 = moto_server.mark()
    s3.list_objects_v2(Bucket=bucket)
    assert [r.op for r in moto_server.requests_since(m1, include_tests=True)] == ["ListObjectsV2"]
    assert [r.op for r in moto_server.requests_since(include_tests=True)][-2:] == [
        "HeadBucket",
        "ListObjectsV2",
    ]
    moto_server.reset_requests()
    assert moto_server.requests_since(include_tests=True) == []
    with pytest.raises(ValueError):
        moto_server.requests_since(m1)


def test_every_concurrent_request_is_recorded(moto_server, s3, bucket):
    """Many threads at once, with a large upload whose record is written in two
    pieces, must still give exactly one record per request."""
    helpers.put_random_object(s3, bucket, "src", 2 * MiB)
    other = make_s3_client(moto_server.url, user_agent_extra="other", max_pool_connections=16)
    mark = moto_server.mark()

    def get(i: int) -> None:
        start = i * 16 * KiB
        rng = f"bytes={start}-{start + 4 * KiB - 1}"
        other.get_object(Bucket=bucket, Key="src", Range=rng)["Body"].read()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(get, i) for i in range(48)]
        futures.append(pool.submit(other.put_object, Bucket=bucket, Key="up", Body=os.urandom(8 * MiB)))
        for f in futures:
            f.result()
    reqs = moto_server.requests_since(mark)
    assert len([r for r in reqs if r.op == "GetObject"]) == 48
    assert sorted(r.range_span()[0] for r in reqs if r.op == "GetObject") == [
        i * 16 * KiB for i in range(48)
    ]
    puts = [r for r in reqs if r.op == "PutObject"]
    assert len(puts) == 1 and puts[0].content_length == 8 * MiB


def test_read_recording_copes_with_glued_and_partial_records(tmp_path):
    rec = tmp_path / "rec.jsonl"
    a = '{"headers": {"Range": "bytes=0-9"}, "method": "GET", "url": "http://h/b/k%20x", "body": ""}'
    b = '{"headers": {}, "method": "HEAD", "url": "http://h/b/other", "body": ""}'
    rec.write_text(a + b + "\n\n" + a + "\n" + '{"headers": {}, "meth')
    records, end = helpers.read_recording(rec)
    assert [(r.method, r.key, r.range) for r in records] == [
        ("GET", "k x", "bytes=0-9"),
        ("HEAD", "other", None),
        ("GET", "k x", "bytes=0-9"),
    ]
    assert end == len(rec.read_bytes()) - len('{"headers": {}, "meth')
    rec.write_text("garbage\n" + a + "\n")
    with pytest.raises(AssertionError, match="damaged"):
        helpers.read_recording(rec)


def test_operation_names(moto_server, s3, bucket):
    mark = moto_server.mark()
    s3.list_buckets()
    helpers.put_multipart_object(s3, bucket, "mp", helpers.random_bytes(6 * MiB), part_size=5 * MiB)
    s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "mp"})
    s3.delete_object(Bucket=bucket, Key="copy")
    ops = [r.op for r in moto_server.requests_since(mark, include_tests=True)]
    assert ops == [
        "ListBuckets",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
        "CopyObject",
        "DeleteObject",
    ]


# -------------------------------------------------------- stop / start / freeze the server


def test_stop_and_start_on_the_same_port_keeps_objects_and_etags(moto_server, s3, bucket):
    port, pid = moto_server.port, moto_server.pid
    single = helpers.put_random_object(
        s3, bucket, "meta.bin", 300 * KiB, Metadata={"my_key": "v1"}, ContentType="text/x-test"
    )
    multi = helpers.put_multipart_object(
        s3, bucket, "multi.bin", helpers.random_bytes(11 * MiB, 5), part_size=5 * MiB
    )
    assert multi.etag == helpers.s3_etag(multi.data, 5 * MiB) and multi.etag.endswith('-3"')
    assert single.etag == helpers.s3_etag(single.data)

    moto_server.stop()
    assert not moto_server.is_running() and not helpers.pid_alive(pid)
    with socket.socket() as sock:  # offline means "connection refused", at once
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    quick = make_s3_client(
        moto_server.url, retries={"total_max_attempts": 1}, connect_timeout=2, user_agent_extra="quick"
    )
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        quick.head_object(Bucket=bucket, Key="meta.bin")

    mark = moto_server.mark()
    moto_server.start()
    assert moto_server.port == port and moto_server.pid != pid
    head = s3.head_object(Bucket=bucket, Key="meta.bin")
    assert head["ETag"] == single.etag and head["Metadata"] == {"my_key": "v1"}
    assert head["ContentType"] == "text/x-test"
    assert s3.get_object(Bucket=bucket, Key="multi.bin")["Body"].read() == multi.data
    assert s3.head_object(Bucket=bucket, Key="multi.bin")["ETag"] == multi.etag
    # The request log goes on across the restart; the restore itself is not counted.
    quick.head_object(Bucket=bucket, Key="meta.bin")
    assert [r.op for r in moto_server.requests_since(mark)] == ["HeadObject"]


def test_stop_without_preserve_comes_back_empty(moto_server, s3, bucket):
    moto_server.kill(preserve=False)
    moto_server.start()
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_freeze_makes_requests_hang_not_fail(moto_server, s3, bucket):
    hung = make_s3_client(moto_server.url, retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=1)
    moto_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            hung.head_bucket(Bucket=bucket)
        assert time.monotonic() - started < 5
    finally:
        moto_server.thaw()
    hung.head_bucket(Bucket=bucket)


def test_left_stopped_by_a_test(moto_server):
    """The guard must restart it after this test (checked by the next one)."""
    moto_server.stop()


def test_guard_restarted_the_server(moto_server):
    assert moto_server.is_running() and moto_server.answers()


# ----------------------------------------------------------------------------- helpers


def test_wait_for_returns_value_and_times_out():
    t0 = time.monotonic()
    assert helpers.wait_for(lambda: time.monotonic() - t0 > 0.1 and "done", timeout=5) == "done"
    with pytest.raises(AssertionError, match="the moon"):
        helpers.wait_for(lambda: False, timeout=0.2, message="the moon")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("not yet")
        return 42

    assert helpers.wait_for(flaky, timeout=5, interval=0.01, ignore=(FileNotFoundError,)) == 42
    with pytest.raises(AssertionError, match="FileNotFoundError"):
        helpers.wait_for(
            lambda: open("/nonexistent/x"), timeout=0.1, ignore=(FileNotFoundError,)
        )


def test_random_bytes_are_deterministic_and_fast():
    t0 = time.monotonic()
    a = helpers.random_bytes(16 * MiB, seed=7)
    assert time.monotonic() - t0 < 2
    assert a == helpers.random_bytes(16 * MiB, seed=7)
    assert a != helpers.random_bytes(16 * MiB, seed=8)
    assert helpers.md5_hex(b"") == "d41d8cd98f00b204e9800998ecf8427e"


def test_md5_file_and_read_range(tmp_path):
    data = helpers.random_bytes(3 * MiB + 5, seed=1)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert helpers.md5_file(p) == helpers.md5_hex(data)
    assert helpers.read_range(p, 2 * MiB, 4 * KiB) == data[2 * MiB : 2 * MiB + 4 * KiB]


def test_find_log_problems():
    log = textwrap.dedent(
        """\
        2026-01-01 10:00:00,000 INFO s3stashfs.mount: mounted
        2026-01-01 10:00:01,000 WARNING s3stashfs.namespace: key 'a/../b' is not a valid name
        2026-01-01 10:00:02,000 ERROR s3stashfs.fs: unexpected error in read
        Traceback (most recent call last):
          File "/x/fs.py", line 10, in read
            raise ValueError("boom")
        ValueError: boom
        2026-01-01 10:00:03,000 INFO s3stashfs.fetch: fetched 65536 bytes
        2026-01-01 10:00:04,000 INFO s3stashfs.store: retrying with WARNINGS off
        Traceback (most recent call last):
          File "/x/a.py", line 1, in f
        KeyError: 'k'

        The above exception was the direct cause of the following exception:

        Traceback (most recent call last):
          File "/x/b.py", line 2, in g
        RuntimeError: wrapped
        2026-01-01 10:00:05,000 INFO s3stashfs.mount: unmounted
        """
    )
    problems = helpers.find_log_problems(log)
    assert len(problems) == 3, problems
    assert problems[0].endswith("is not a valid name")
    assert "unexpected error in read" in problems[1] and problems[1].endswith("ValueError: boom")
    assert problems[2].startswith("2026-01-01 10:00:04,000 INFO") and "RuntimeError: wrapped" in problems[2]
    assert "KeyError" in problems[2] and "unmounted" not in problems[2]
    assert helpers.find_log_problems("INFO all good\nDEBUG fine\n") == []


def test_proc_mounts_parsing():
    rows = helpers.proc_mounts()
    assert any(mp == "/" for _, mp, _ in rows)
    assert helpers._unescape_mount_field(r"/tmp/a\040b\134c") == "/tmp/a b\\c"


# ------------------------------------------------------------------------------ biodata


@biodata.requires_samtools
def test_bam_is_multi_block_sorted_and_indexed(bam_files):
    bam = bam_files
    assert bam.bam.stat().st_size > 1 * MiB and bam.bai.exists()
    assert b"SO:coordinate" in biodata.samtools_header(bam.bam)
    assert biodata.samtools_count(bam.bam) == bam.n_mapped + bam.n_unmapped
    assert biodata.samtools_count(bam.bam, "chr1") + biodata.samtools_count(bam.bam, "chr2") == bam.n_mapped
    region = "chr1:400000-420000"
    out = biodata.samtools_view(bam.bam, region)
    assert out and out.count(b"\n") == biodata.samtools_count(bam.bam, region) > 0
    assert all(line.split(b"\t")[2] == b"chr1" for line in out.splitlines())
    assert biodata.samtools_count(bam.bam, "chr2:1-2000") > 0


@biodata.requires_tabix
def test_vcf_is_bgzipped_indexed_and_queryable(vcf_files):
    vcf = vcf_files
    assert vcf.vcf_gz.stat().st_size > 1 * MiB and vcf.tbi.exists()
    for region in ("chr1:250000-260000", "chr2:1-5000", "chr2:499000-500000"):
        out = biodata.tabix_query(vcf.vcf_gz, region)
        assert out and out == biodata.vcf_region_reference(vcf.vcf, region), region
    whole = biodata.tabix_query(vcf.vcf_gz, "chr1") + biodata.tabix_query(vcf.vcf_gz, "chr2")
    assert whole.count(b"\n") == vcf.n_records


@biodata.requires_samtools
@biodata.requires_tabix
def test_biodata_is_deterministic_wherever_written(tmp_path):
    a = biodata.make_bam(tmp_path / "a", n_reads=2000)
    b = biodata.make_bam(tmp_path / "b" / "deeper", n_reads=2000)
    assert helpers.md5_file(a.bam) == helpers.md5_file(b.bam)
    va = biodata.make_vcf(tmp_path / "a", n_records=3000)
    vb = biodata.make_vcf(tmp_path / "c", n_records=3000)
    assert helpers.md5_file(va.vcf_gz) == helpers.md5_file(vb.vcf_gz)
    assert biodata.parse_region("chr1:1,000-2,000") == ("chr1", 1000, 2000)


# ------------------------------------------------- the mount fixture, on a fake s3stashfs

FAKE_S3STASHFS = r'''
"""Stands in for s3stashfs: bind-mounts a directory and leaves a "daemon" that exits
when the mountpoint is unmounted. Only for checking the test fixtures."""
import argparse, os, subprocess, sys, time

DAEMON = """
import sys, time
mp, deadline = sys.argv[1], time.monotonic() + 120
def mounted():
    with open('/proc/mounts') as f:
        return any(line.split()[1] == mp for line in f)
while mounted() and time.monotonic() < deadline:
    time.sleep(0.02)
"""

p = argparse.ArgumentParser()
sub = p.add_subparsers(dest="cmd", required=True)
m = sub.add_parser("mount")
m.add_argument("mountpoint")
for opt in ("--endpoint-url", "--cache-dir", "--log-file", "--bucket"):
    m.add_argument(opt)
for flag in ("--fake-fail", "--fake-warn", "--fake-hang"):
    m.add_argument(flag, action="store_true")
u = sub.add_parser("unmount")
u.add_argument("mountpoint")
a = p.parse_args()
state = os.environ["FAKE_STATE_DIR"]
pidfile = os.path.join(state, os.path.basename(a.mountpoint) + ".pid")
if a.cmd == "mount":
    log = open(a.log_file, "a")
    log.write("2026-01-01 00:00:00,000 INFO s3stashfs.mount: mounting %s\n" % a.mountpoint)
    if a.fake_warn:
        log.write("2026-01-01 00:00:00,001 WARNING s3stashfs.fs: fake warning\n"
                  "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
                  "ValueError: fake boom\n")
    if a.fake_fail:
        log.write("2026-01-01 00:00:00,002 ERROR s3stashfs.cli: bucket nope not found\n")
        log.close()
        print("s3stashfs: bucket 'nope' not found", file=sys.stderr)
        sys.exit(1)
    if a.fake_hang:
        time.sleep(60)
    os.makedirs(a.cache_dir, exist_ok=True)
    src = os.path.join(state, "src")
    os.makedirs(src, exist_ok=True)
    subprocess.run(["mount", "--bind", src, a.mountpoint], check=True)
    d = subprocess.Popen([sys.executable, "-c", DAEMON, a.mountpoint, "s3stashfs-fake-daemon"],
                         start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(a.cache_dir, "mount.lock"), "w") as f:
        f.write("%d\n" % d.pid)
    with open(pidfile, "w") as f:
        f.write("%d\n" % d.pid)
    log.write("2026-01-01 00:00:01,000 INFO s3stashfs.mount: mounted\n")
else:
    r = subprocess.run(["umount", a.mountpoint], stderr=subprocess.PIPE)
    if r.returncode:
        print("s3stashfs: " + r.stderr.decode().strip(), file=sys.stderr)
        sys.exit(1)
    pid = int(open(pidfile).read())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
'''


@pytest.fixture
def fake_mount(mount, tmp_path):
    """The mount fixture, running the fake s3stashfs instead of the real one."""
    if os.geteuid() != 0:
        pytest.skip("the fake s3stashfs needs root for mount --bind")
    script = tmp_path / "fake_s3stashfs.py"
    script.write_text(FAKE_S3STASHFS)
    state = tmp_path / "fake-state"
    state.mkdir()
    mount.command = [sys.executable, str(script)]
    mount.s3env = {**mount.s3env, "FAKE_STATE_DIR": str(state)}
    (state / "src").mkdir()
    (state / "src" / "hello.txt").write_text("hello\n")
    return mount


def test_mount_fixture_lifecycle(fake_mount, bucket):
    m = fake_mount(bucket=bucket)
    assert m.is_mounted() and (m.path / "hello.txt").read_text() == "hello\n"
    assert m.pid == m.read_pid() and helpers.pid_alive(m.pid)
    assert m.log_file.exists() and m.cache_dir.is_dir()
    argv = m.last_result.args
    assert argv[argv.index("--bucket") + 1] == bucket
    assert argv[argv.index("--endpoint-url") + 1] == fake_mount.moto_server.url
    first_pid = m.pid
    m.unmount()
    assert not m.is_mounted() and not helpers.pid_alive(first_pid)
    m.remount()
    assert m.is_mounted() and m.pid != first_pid and len(m.log_files) == 2
    # Left mounted: teardown unmounts it and checks /proc/mounts.


def test_mount_failure_gives_stderr_and_log(fake_mount):
    with pytest.raises(pytest.fail.Exception) as info:
        fake_mount(bucket="nope", extra_args=["--fake-fail"])
    msg = str(info.value)
    assert "exited 1" in msg and "bucket 'nope' not found" in msg
    assert "ERROR s3stashfs.cli: bucket nope not found" in msg and "--fake-fail" in msg
    m = fake_mount.mounts[-1]
    m.expect_log("bucket nope not found")  # the failure's own log line is expected


def test_mount_run_reports_exit_code_and_timeout(fake_mount):
    m, result = fake_mount.run(bucket="nope", extra_args=["--fake-fail"])
    assert result.returncode == 1 and b"not found" in result.stderr and not m.is_mounted()
    assert "ERROR" in m.log_text() and m.unexpected_log_problems() == []  # tracebacks only
    t0 = time.monotonic()
    m2, result = fake_mount.run(extra_args=["--fake-hang"], timeout=1)
    assert result.returncode != 0 and b"did not finish" in result.stderr
    assert time.monotonic() - t0 < 10


def test_mount_log_problems_are_found(fake_mount):
    m = fake_mount(extra_args=["--fake-warn"])
    problems = m.unexpected_log_problems()
    assert len(problems) == 1 and "fake warning" in problems[0] and "fake boom" in problems[0]
    m.expect_log(r"fake warning", required=True)
    assert m.unexpected_log_problems() == [] and m.missing_required_log() == []
    m.expect_log(r"never logged", required=True)
    assert m.missing_required_log() == ["never logged"]
    m.required_log.remove("never logged")


@pytest.mark.skipif(not S3STASHFS_BIN.exists(), reason="s3stashfs is not installed in the venv")
def test_mount_fixture_with_the_real_s3stashfs(mount, bucket, s3, moto_server):
    obj = helpers.put_random_object(s3, bucket, "dir/data.bin", 1 * MiB)
    m = mount(bucket=bucket)
    assert m.is_mounted() and helpers.pid_alive(m.pid) and m.log_file.exists()
    mark = moto_server.mark()
    got = helpers.read_range(m.path / "dir" / "data.bin", 512 * KiB, 4 * KiB)
    assert got == obj.data[512 * KiB : 516 * KiB]
    gets = moto_server.requests_since(mark, op="GetObject", key="dir/data.bin")
    assert gets and not any(r.from_tests for r in gets)
    pid = m.pid
    m.unmount()
    assert not m.is_mounted() and not helpers.pid_alive(pid)


INNER_TESTS = r'''
import os, sys
import pytest

@pytest.fixture
def fake(mount, tmp_path):
    mount.command = [sys.executable, os.environ["FAKE_S3STASHFS"]]
    state = tmp_path / "state"
    state.mkdir()
    mount.s3env = {**mount.s3env, "FAKE_STATE_DIR": str(state)}
    return mount

def test_unexpected_warning_fails(fake):
    fake(extra_args=["--fake-warn"])

@pytest.mark.expect_log("fake warning")
def test_expected_by_marker(fake):
    fake(extra_args=["--fake-warn"])

@pytest.mark.allow_log_problems
def test_allowed_by_marker(fake):
    fake(extra_args=["--fake-warn"])

def test_clean_log_passes(fake):
    m = fake()
    m.unmount()
'''


def test_unexpected_log_warning_fails_the_test(tmp_path):
    """Run a small pytest session on the real conftest: a mount whose log has an
    undeclared warning makes its test fail at teardown; declared ones don't."""
    if os.geteuid() != 0:
        pytest.skip("the fake s3stashfs needs root for mount --bind")
    here = Path(__file__).resolve().parent
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(here)!r})\n"
        f"_real = {str(here / 'conftest.py')!r}\n"
        f"exec(compile(open(_real).read(), _real, 'exec'))\n"
    )
    (inner / "test_inner.py").write_text(INNER_TESTS)
    (tmp_path / "fake.py").write_text(FAKE_S3STASHFS)
    env = {**os.environ, "FAKE_S3STASHFS": str(tmp_path / "fake.py")}
    r = helpers.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rE", str(inner)],
        timeout=120, env=env, cwd=inner,
    )
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert "4 passed, 1 error" in out, out  # the call passes; teardown errors
    assert "ERROR at teardown of test_unexpected_warning_fails" in out, out
    assert "unexpected in the log" in out and "fake warning" in out, out


def read_until_stall(body) -> bytes:
    """Read a response body until it stalls past the client's read timeout; what came first."""
    got = b""
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        while True:
            chunk = body.read(10_000)
            assert chunk, "the body ended instead of stalling"
            got += chunk
    return got


def test_s3_proxy_modes(s3_proxy, s3, bucket):
    """The proxy forwards, resets, black-holes, refuses, answers 503 SlowDown, stalls an
    answer mid-body, and forwards again."""
    import botocore.exceptions

    from conftest import make_s3_client

    helpers.put_object(s3, bucket, "p.txt", b"through the proxy\n")
    via = make_s3_client(s3_proxy.url, connect_timeout=1, read_timeout=1,
                         retries={"max_attempts": 1})

    def get():
        return via.get_object(Bucket=bucket, Key="p.txt")["Body"].read()

    assert get() == b"through the proxy\n"
    # reset: the RST may beat the end of connect() on a loaded machine (EndpointConnectionError)
    for mode, error in (("reset", (botocore.exceptions.ConnectionClosedError,
                                   botocore.exceptions.EndpointConnectionError)),
                        ("blackhole", botocore.exceptions.ReadTimeoutError),
                        ("refuse", botocore.exceptions.EndpointConnectionError)):
        s3_proxy.set_mode(mode)
        with pytest.raises(error):
            get()
        s3_proxy.set_mode("pass")
        assert get() == b"through the proxy\n"
    s3_proxy.set_mode("slowdown")
    for call in (get, lambda: via.head_object(Bucket=bucket, Key="p.txt")):
        with pytest.raises(botocore.exceptions.ClientError) as e:
            call()
        assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert e.value.response["Error"]["Code"] in ("SlowDown", "503")  # HEAD: no body to name it
    with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
        get()
    s3_proxy.set_mode("pass")
    assert get() == b"through the proxy\n"
    # mid-body: headers and the first bytes come, then nothing
    big = helpers.random_bytes(1 << 20, seed=5)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
    s3_proxy.blackhole_after(100_000)  # the answer's headers count too
    body = via.get_object(Bucket=bucket, Key="big.bin")["Body"]
    got = read_until_stall(body)
    assert 0 < len(got) <= 100_000 and got == big[:len(got)]
    assert s3_proxy.mode == "blackhole"
    s3_proxy.set_mode("pass")
    assert via.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == big


def test_s3_proxy_faults(s3_proxy, s3, bucket, moto_server):
    """Each fault of the HTTP-aware proxy does what it says, to the requests it is meant for,
    as often as it is told, and is counted; the rest pass untouched."""
    from proxy import Fault

    big = helpers.random_bytes(1 << 20, seed=6)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
    via = make_s3_client(s3_proxy.url, connect_timeout=5, read_timeout=10,
                         retries={"total_max_attempts": 1})
    # for answers held back: a busy moto still answers within this
    quick = make_s3_client(s3_proxy.url, connect_timeout=5, read_timeout=2.5,
                           retries={"total_max_attempts": 1})

    def get(client=via, **kw):
        return client.get_object(Bucket=bucket, Key="big.bin", **kw)["Body"]

    def forwarded() -> int:
        return len(moto_server.requests_since(mark, include_tests=True, key="big.bin"))

    def read_all(body) -> bytes:
        got = b""
        while True:
            chunk = body.read(10_000)
            if not chunk:
                return got
            got += chunk

    # 500 / 503: S3's XML error, nothing forwarded
    for kind, code in (("500", "InternalError"), ("503", "SlowDown")):
        mark = moto_server.mark()
        f = s3_proxy.inject(Fault(kind, count=1))
        with pytest.raises(botocore.exceptions.ClientError, match=code):
            get()
        assert f.injected == 1 and forwarded() == 0
        assert get().read() == big  # the count is spent: forwarded again
        s3_proxy.clear()
    # reset and cut: the head and part of the body, then RST / FIN
    got = b""
    for kind, at, error in (("reset", 0.25, botocore.exceptions.ResponseStreamingError),
                            ("cut", 300_000, botocore.exceptions.IncompleteReadError)):
        f = s3_proxy.inject(Fault(kind, at=at, count=1))
        body = get()
        with pytest.raises(error):
            got = read_all(body)
        assert f.injected == 1
        s3_proxy.clear()
    # trickle: all of it, in pieces with pauses
    f = s3_proxy.inject(Fault("trickle", piece=64 * KiB, pause=0.02, count=1))
    t = time.monotonic()
    assert get().read() == big
    assert time.monotonic() - t >= 15 * 0.02 and f.injected == 1
    s3_proxy.clear()
    # hold: the request is forwarded, its answer never (or its body stalls midway)
    mark = moto_server.mark()
    f = s3_proxy.inject(Fault("hold", at=None, count=1))
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        get(quick)
    assert f.injected == 1 and forwarded() == 1
    s3_proxy.clear()
    f = s3_proxy.inject(Fault("hold", at=0.5, count=1))
    body = get(quick)
    got = read_until_stall(body)
    assert 0 < len(got) <= len(big) // 2 and got == big[:len(got)] and f.injected == 1
    s3_proxy.clear()
    # drop: S3 does it, the answer is lost
    f = s3_proxy.inject(Fault("drop", count=1, when=lambda m, p, h: m == "PUT"))
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        via.put_object(Bucket=bucket, Key="dropped.txt", Body=b"made\n")
    assert s3.get_object(Bucket=bucket, Key="dropped.txt")["Body"].read() == b"made\n"
    assert f.injected == 1
    s3_proxy.clear()
    # only the requests a predicate accepts; a body fault skips answers without a body
    f = s3_proxy.inject(Fault("cut", when=lambda m, p, h: "range" in h))
    assert get().read() == big and via.head_object(Bucket=bucket, Key="big.bin")
    assert f.injected == 0
    with pytest.raises(botocore.exceptions.IncompleteReadError):
        read_all(get(Range="bytes=0-99999"))
    assert f.injected == 1
    s3_proxy.clear()
    # a rate, drawn from a seeded generator: the same requests get the same faults
    outcomes = []
    for _ in range(2):
        s3_proxy.clear(seed=7)
        f = s3_proxy.inject(Fault("503", rate=0.5, when=lambda m, p, h: m == "HEAD"))
        run = []
        for _ in range(16):
            try:
                via.head_object(Bucket=bucket, Key="big.bin")
                run.append(True)
            except botocore.exceptions.ClientError:
                run.append(False)
        assert f.injected == run.count(False)
        outcomes.append(run)
    assert outcomes[0] == outcomes[1] and 0 < outcomes[0].count(False) < 16
    s3_proxy.clear()
    assert s3_proxy.injected == {"500": 1, "503": 1 + sum(r.count(False) for r in outcomes),
                                 "reset": 1, "cut": 2, "trickle": 1, "hold": 2, "drop": 1}


def test_http_proxy_keeps_connections_alive_and_handles_expect_100_continue():
    """moto closes every connection; a server that keeps them alive and answers
    ``Expect: 100-continue`` (as S3 does) goes through the proxy the same way."""
    import http.client
    import http.server
    import threading

    from proxy import HttpProxy

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"x" * 5000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()

        def do_PUT(self):
            n = int(self.headers["Content-Length"])
            body = self.rfile.read(n)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = HttpProxy("127.0.0.1", server.server_address[1])
    try:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        for method in ("GET", "HEAD", "GET"):
            conn.request(method, "/k")
            r = conn.getresponse()
            assert r.status == 200 and r.read() == (b"x" * 5000 if method == "GET" else b"")
        conn.putrequest("PUT", "/k")
        conn.putheader("Content-Length", "11")
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        sock = conn.sock
        interim = sock.recv(100)  # the server's "go on", relayed before the body is sent
        assert interim.startswith(b"HTTP/1.1 100"), interim
        sock.sendall(b"hello world")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"hello world"
        assert proxy.accepted == 1  # all of it on one connection
        assert [m for m, _ in proxy.requests] == ["GET", "HEAD", "GET", "PUT"]
        conn.close()
    finally:
        proxy.close()
        server.shutdown()
        server.server_close()
