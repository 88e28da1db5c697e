"""Fixtures that run the real parts: a moto_server process on loopback, real FUSE
mounts of the real `s3stashfs` command, and the bioinformatics files of biodata.py.

Everything started here is stopped here, by PID, even when a test fails; every mount
is unmounted and checked gone from /proc/mounts. Waits are polls with deadlines.

Fixtures (see each docstring):
    moto_server  session   the MotoServer: .url .port .pid .stop() .start() requests
    s3env        session   env dict for subprocesses (credentials, no user config)
    s3           session   boto3 S3 client on moto_server (path style)
    make_bucket  function  make_bucket(name=None) -> str, deleted after the test
    bucket       function  one fresh bucket name
    mount        function  mount(bucket=None, extra_args=(), env=None, cache_dir=None) -> Mount
    bam_files    session   biodata.BamFiles (skips without samtools)
    vcf_files    session   biodata.VcfFiles (skips without bgzip/tabix)
Markers:
    @pytest.mark.allow_log_problems         don't fail on warnings/tracebacks in mount logs
    @pytest.mark.expect_log("regex", ...)   warnings/tracebacks matching these are expected
"""

from __future__ import annotations

import ctypes
import http.client
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` in any import mode

import biodata  # noqa: E402
import helpers  # noqa: E402
from proxy import HttpProxy  # noqa: E402
from helpers import S3Request, TEST_USER_AGENT_EXTRA, wait_for  # noqa: E402

BIN_DIR = Path(sys.executable).parent  # the venv's bin/, not resolved through symlinks
MOTO_SERVER_BIN = BIN_DIR / "moto_server"
S3STASHFS_BIN = BIN_DIR / "s3stashfs"

AWS_ACCESS_KEY_ID = "testing"
AWS_SECRET_ACCESS_KEY = "testing-secret"
AWS_REGION = "us-east-1"

MOTO_START_TIMEOUT = 30.0
MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 30.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_log_problems: do not fail the test on WARNING/ERROR lines or tracebacks "
        "in the logs of the mounts it made",
    )
    config.addinivalue_line(
        "markers",
        "expect_log(*patterns): regexes for warnings/tracebacks the test expects in the "
        "logs of every mount it makes (like Mount.expect_log)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Keep each phase's report on the item (fixtures look at it at teardown), and
    attach mount logs and the moto_server log to a failing test's report."""
    rep = yield
    setattr(item, f"_s3stashfs_rep_{rep.when}", rep)
    if rep.failed and rep.when in ("setup", "call"):
        for m in getattr(item, "_s3stashfs_mounts", []):
            for log in m.log_files:
                rep.sections.append((f"s3stashfs log {log.name}", helpers.tail(log, 60)))
        server = getattr(item.session, "_s3stashfs_moto", None)
        if server is not None and "moto_server" in getattr(item, "fixturenames", ()):
            rep.sections.append(("moto_server log", helpers.tail(server.log_path, 30)))
    return rep


def _test_failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_s3stashfs_rep_{w}", None), "failed", False)
        for w in ("setup", "call")
    )


# ------------------------------------------------------------------------ environment


def clean_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without anything that could point boto3 or s3stashfs elsewhere."""
    env = dict(os.environ if base is None else base)
    for name in list(env):
        upper = name.upper()
        if (
            upper.startswith(("AWS_", "S3STASHFS_", "BOTO_", "MOTO_"))
            or upper in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
        ):
            del env[name]
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


@pytest.fixture
def static_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores made in the test's own process find the test's static keys, as a mount's daemon
    does (a Store refuses to start when boto3 finds no credentials, --no-sign-request aside)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def s3env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for subprocesses (the mount, tools): test credentials and region,
    and no trace of the user's AWS config, proxies or ~/.s3stashfs.env (S3STASHFS_ENV
    points at an empty file). Copy it before changing it: `{**s3env, "X": "y"}`."""
    d = tmp_path_factory.mktemp("s3env")
    (d / "empty.env").write_text("")
    env = clean_environ()
    env.update(
        AWS_ACCESS_KEY_ID=AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY=AWS_SECRET_ACCESS_KEY,
        AWS_DEFAULT_REGION=AWS_REGION,
        AWS_CONFIG_FILE=str(d / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(d / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        S3STASHFS_ENV=str(d / "empty.env"),
        PYTHONUNBUFFERED="1",
    )
    return env


# ------------------------------------------------------------------------- moto_server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the child if pytest dies without tearing down (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def make_s3_client(endpoint_url: str, **config: Any) -> Any:
    """A boto3 S3 client for the tests: explicit test credentials (os.environ is not
    touched), path-style addressing, bounded timeouts and retries, and a User-Agent
    marker so request accounting leaves its requests out by default."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = dict(
        s3={"addressing_style": "path"},
        user_agent_extra=TEST_USER_AGENT_EXTRA,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    if "retries" in config:  # without "mode", botocore's legacy mode would add a retry
        config = {**config, "retries": {"mode": "standard", **config["retries"]}}
    options.update(config)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=AWS_ACCESS_KEY_ID,
        aws_secret_access_key=AWS_SECRET_ACCESS_KEY,
        region_name=AWS_REGION,
        config=Config(**options),
    )


@dataclass(frozen=True)
class Mark:
    """A point in the request log: `generation` changes at each reset_requests()."""

    generation: int
    offset: int


@dataclass
class _Snapshot:
    """Enough of moto's state to bring it back after a restart with the same ETags."""

    buckets: list[str] = field(default_factory=list)
    # (bucket, key, data, metadata, content_type, part sizes or None, etag)
    objects: list[tuple[str, str, bytes, dict, str | None, list[int] | None, str]] = field(
        default_factory=list
    )


class MotoServer:
    """One `moto_server -H 127.0.0.1 -p PORT` process, restartable on the same port.

    moto keeps its state in memory, so a plain restart comes back empty. `stop()`
    therefore snapshots buckets and objects (content, x-amz-meta, content type,
    multipart part layout) and `start()` restores them: same keys, same bytes, same
    ETags (LastModified is new). Pass `preserve=False` for a server that comes back
    empty. Not kept: versions, tags, ACLs, policies, unfinished multipart uploads.

    Request accounting uses moto's own recorder (MOTO_ENABLE_RECORDING): moto
    appends every request it receives to `recording_path` before handling it, so
    once a client has its answer the request is on disk. `mark()` then
    `requests_since(mark)` give the requests in between; by default without the
    tests' own boto3 calls and moto's /moto-api/ endpoints. The file survives
    restarts; `reset_requests()` empties it (the autouse guard does so before every
    test that uses moto) and invalidates older marks.
    """

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / "moto_server.log"
        self.recording_path = workdir / "moto_recording.jsonl"
        self.proc: subprocess.Popen | None = None
        self.frozen = False
        self._snapshot: _Snapshot | None = None
        self._generation = 0
        self._client: Any = None
        self.starts = 0

    # --- process lifecycle -------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def answers(self) -> bool:
        """True if an HTTP request to moto's API gets any answer."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/moto-api/config")
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def start(self, timeout: float = MOTO_START_TIMEOUT) -> None:
        """Start on `self.port` (again) and wait until it answers; restore the state
        saved by a preserving stop()."""
        if self.is_running():
            return
        env = clean_environ()
        env.update(
            MOTO_ENABLE_RECORDING="1",
            MOTO_RECORDER_FILEPATH=str(self.recording_path),
            PYTHONUNBUFFERED="1",
        )
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== moto_server start #{self.starts + 1} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER_BIN), "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # own process group: a ^C to pytest is not for it
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        self.frozen = False

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"moto_server exited with {self.proc.returncode} while starting on "
                    f"port {self.port}:\n{helpers.tail(self.log_path)}"
                )
            return self.answers()

        try:
            wait_for(
                ready,
                timeout=timeout,
                interval=0.05,
                message=lambda: f"moto_server to answer on {self.url}:\n"
                f"{helpers.tail(self.log_path)}",
            )
        except BaseException:
            self._terminate()
            raise
        if self._snapshot is not None:
            snapshot, self._snapshot = self._snapshot, None
            self._restore(snapshot)

    def stop(self, preserve: bool = True, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process (S3 goes away: connections are refused). With `preserve`
        the state is saved first and restored by start(). `sig=signal.SIGKILL` for a
        crash instead of a shutdown."""
        if not self.is_running():
            return
        self.thaw()
        if preserve:
            self._snapshot = self._take_snapshot()
        self._terminate(sig, timeout)

    def kill(self, preserve: bool = True) -> None:
        self.stop(preserve=preserve, sig=signal.SIGKILL)

    def restart(self, preserve: bool = True) -> None:
        self.stop(preserve=preserve)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP the server: the port still accepts connections but nothing answers
        (a hung network rather than a refused one). thaw() resumes it."""
        if self.is_running() and not self.frozen:
            os.kill(self.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
            self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.is_running():
            os.kill(self.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        self.frozen = False

    def ensure_running(self) -> None:
        self.thaw()
        if not self.is_running():
            self.start()

    def _terminate(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self.frozen:
                os.kill(proc.pid, signal.SIGCONT)
                self.frozen = False
            os.kill(proc.pid, sig)  # by PID only, never its group or a name
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # The listening socket dies with the process; make sure nothing answers.
        wait_for(lambda: not self.answers(), timeout=5, message=f"port {self.port} to close")

    def close(self) -> None:
        """Session teardown: stop for good, nothing saved."""
        self._snapshot = None
        self._terminate()

    # --- state across restarts ---------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_s3_client(self.url, retries={"total_max_attempts": 1})
        return self._client

    def _take_snapshot(self) -> _Snapshot:
        s3 = self.client
        snap = _Snapshot()
        for b in s3.list_buckets().get("Buckets", []):
            name = b["Name"]
            snap.buckets.append(name)
            for key in helpers.list_keys(s3, name):
                head = s3.head_object(Bucket=name, Key=key)
                etag = head["ETag"]
                parts: list[int] | None = None
                m = re.search(r"-(\d+)\"?$", etag)
                if m:
                    parts = [
                        s3.head_object(Bucket=name, Key=key, PartNumber=n)["ContentLength"]
                        for n in range(1, int(m.group(1)) + 1)
                    ]
                data = s3.get_object(Bucket=name, Key=key)["Body"].read()
                snap.objects.append(
                    (name, key, data, head.get("Metadata", {}), head.get("ContentType"), parts, etag)
                )
        return snap

    def _restore(self, snap: _Snapshot) -> None:
        s3 = self.client
        for name in snap.buckets:
            s3.create_bucket(Bucket=name)
        for bucket, key, data, meta, ctype, parts, etag in snap.objects:
            extra: dict[str, Any] = {"Metadata": meta}
            if ctype:
                extra["ContentType"] = ctype
            if parts is None:
                new = s3.put_object(Bucket=bucket, Key=key, Body=data, **extra)["ETag"]
            else:
                mpu = s3.create_multipart_upload(Bucket=bucket, Key=key, **extra)
                done, start = [], 0
                for n, size in enumerate(parts, start=1):
                    r = s3.upload_part(
                        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=n,
                        Body=data[start : start + size],
                    )
                    done.append({"ETag": r["ETag"], "PartNumber": n})
                    start += size
                new = s3.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=mpu["UploadId"],
                    MultipartUpload={"Parts": done},
                )["ETag"]
            if new != etag:
                raise AssertionError(f"restoring s3://{bucket}/{key}: ETag {new} != {etag}")

    # --- request accounting ------------------------------------------------------

    def mark(self) -> Mark:
        """The current end of the request log."""
        try:
            size = self.recording_path.stat().st_size
        except FileNotFoundError:
            size = 0
        return Mark(self._generation, size)

    def reset_requests(self) -> None:
        """Empty the request log (moto appends with O_APPEND, so this is safe while it
        runs). Marks taken before are invalid afterwards."""
        with open(self.recording_path, "wb"):
            pass
        self._generation += 1

    def requests_since(
        self,
        mark: Mark | None = None,
        *,
        include_tests: bool = False,
        include_internal: bool = False,
        method: str | None = None,
        op: str | None = None,
        bucket: str | None = None,
        key: str | None = None,
    ) -> list[S3Request]:
        """Requests moto received after `mark` (default: since the last reset), in
        order. Left out unless asked for: the tests' own boto3 calls (User-Agent
        marker) and /moto-api/. Filters: method ("GET"), op ("GetObject"), bucket,
        key."""
        if mark is None:
            mark = Mark(self._generation, 0)
        if mark.generation != self._generation:
            raise ValueError("this mark was taken before reset_requests()")
        records, _ = helpers.read_recording(self.recording_path, mark.offset)
        out = []
        for r in records:
            if r.internal and not include_internal:
                continue
            if r.from_tests and not include_tests:
                continue
            if method is not None and r.method != method.upper():
                continue
            if op is not None and r.op != op:
                continue
            if bucket is not None and r.bucket != bucket:
                continue
            if key is not None and r.key != key:
                continue
            out.append(r)
        return out

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 15.0) -> None:
        """Wait until moto has received no request for `quiet` seconds (e.g. until
        the mount's read-ahead has finished) - bounded by `timeout`."""
        last = (self.mark(), time.monotonic())

        def settled() -> bool:
            nonlocal last
            now = self.mark()
            if now != last[0]:
                last = (now, time.monotonic())
                return False
            return time.monotonic() - last[1] >= quiet

        wait_for(settled, timeout=timeout, interval=0.05, message="moto_server to go quiet")


@pytest.fixture(scope="session")
def moto_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """A real moto_server on 127.0.0.1 (free port), for the whole session. Its output
    goes to `.log_path`. Tests may stop()/start()/kill()/freeze() it; the autouse
    guard brings it back after such a test."""
    if not MOTO_SERVER_BIN.exists():
        pytest.fail(f"{MOTO_SERVER_BIN} not found: install moto[server] in the venv", pytrace=False)
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    request.session._s3stashfs_moto = server  # for failure reports
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_proxy(moto_server: MotoServer) -> Iterator[HttpProxy]:
    """A loopback proxy in front of moto (tests/proxy.py): mount with
    ``endpoint_url=s3_proxy.url``, then ``s3_proxy.set_mode("reset" | "blackhole" | "refuse"
    | "pass")``, or break single requests with ``s3_proxy.inject(Fault(...))``. The tests' own
    boto3 client (``s3``) still talks to moto directly."""
    proxy = HttpProxy(moto_server.host, moto_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def s3(moto_server: MotoServer) -> Any:
    """boto3 S3 client on moto_server (path style; its requests are tagged as the
    tests' own, see MotoServer.requests_since)."""
    return make_s3_client(moto_server.url)


@dataclass
class _TestGuard:
    buckets: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def _moto_guard(request: pytest.FixtureRequest) -> Iterator[_TestGuard]:
    """For tests that use moto_server: an empty request log at the start; at the end
    (after every other fixture, mounts included) the server running again (restored
    if the test stopped or froze it) and the test's buckets deleted."""
    guard = _TestGuard()
    uses_moto = "moto_server" in request.fixturenames
    server: MotoServer | None = None
    if uses_moto:
        server = request.getfixturevalue("moto_server")
        server.ensure_running()
        server.reset_requests()
    yield guard
    if server is None:
        return
    server.ensure_running()
    errors = []
    for name in guard.buckets:
        try:
            helpers.empty_and_delete_bucket(server.client, name)
        except Exception as exc:  # noqa: BLE001
            if "NoSuchBucket" not in str(exc):
                errors.append(f"deleting bucket {name}: {exc!r}")
    if errors and not _test_failed(request):
        pytest.fail("\n".join(errors), pytrace=False)


_bucket_counter = itertools.count(1)


@pytest.fixture
def make_bucket(s3: Any, _moto_guard: _TestGuard, request: pytest.FixtureRequest):
    """make_bucket(name=None) -> name: create a bucket (a unique name derived from the
    test's name by default); it is emptied and deleted after the test."""

    def make(name: str | None = None) -> str:
        if name is None:
            slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
            name = f"t{next(_bucket_counter):04d}-{slug}"[:63].rstrip("-")
        s3.create_bucket(Bucket=name)
        _moto_guard.buckets.append(name)
        return name

    return make


@pytest.fixture
def bucket(make_bucket) -> str:
    """A fresh, empty bucket's name."""
    return make_bucket()


# ------------------------------------------------------------------------------ mounts


class MountError(AssertionError):
    pass


@dataclass
class Mount:
    """One s3stashfs mount made by the `mount` fixture.

    Log checking: when the mount is torn down, its log files are scanned for
    WARNING/ERROR/CRITICAL records and tracebacks (helpers.find_log_problems); any
    block not matched by a regex given to `expect_log()` (or the test's
    `expect_log` marker) fails the test. `check_log = False` (or the
    `allow_log_problems` marker) turns that off.
    """

    factory: MountFactory
    path: Path
    cache_dir: Path
    bucket: str | None
    extra_args: tuple[str, ...]
    env: dict[str, str]
    endpoint_url: str | None
    log_files: list[Path] = field(default_factory=list)
    pid: int | None = None
    mounted: bool = False
    check_log: bool = True
    tracebacks_only: bool = False  # set for a failed mount.run(): its errors are the point
    expected_log: list[str] = field(default_factory=list)
    required_log: list[str] = field(default_factory=list)
    last_result: subprocess.CompletedProcess | None = None

    @property
    def log_file(self) -> Path:
        """The log file of the current (latest) mount of this mountpoint."""
        return self.log_files[-1]

    @property
    def lock_file(self) -> Path:
        return self.cache_dir / "mount.lock"

    def expect_log(self, pattern: str, required: bool = False) -> None:
        """Warnings/tracebacks matching regex `pattern` are expected (not a failure).
        With `required`, the pattern must also appear somewhere in the log."""
        self.expected_log.append(pattern)
        if required:
            self.required_log.append(pattern)

    def log_text(self) -> str:
        texts = []
        for f in self.log_files:
            try:
                texts.append(f.read_text(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(texts)

    def unexpected_log_problems(self) -> list[str]:
        problems = helpers.find_log_problems(self.log_text())
        if self.tracebacks_only:
            problems = [p for p in problems if "Traceback (most recent call last)" in p]
        return [
            p for p in problems if not any(re.search(pat, p, re.M) for pat in self.expected_log)
        ]

    def missing_required_log(self) -> list[str]:
        text = self.log_text()
        return [pat for pat in self.required_log if not re.search(pat, text, re.M)]

    def is_mounted(self) -> bool:
        return bool(helpers.mounted_at(self.path))

    def read_pid(self) -> int | None:
        try:
            return int(self.lock_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def daemon_alive(self) -> bool:
        return self.pid is not None and helpers.pid_alive(self.pid)

    def unmount(self, timeout: float = UNMOUNT_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """`s3stashfs unmount PATH`. With `check`: it must exit 0, the mountpoint must
        be gone from /proc/mounts and the daemon must have exited (contract: unmount
        waits for it) - otherwise the mount is cleaned up by force and this fails."""
        result = self.factory._run_cli(["unmount", str(self.path)], self.env, timeout)
        still_mounted = self.is_mounted()
        alive = self.daemon_alive()
        ok = result.returncode == 0 and not still_mounted and not alive
        if ok:
            self.mounted = False
        elif check:
            forced = self.force_cleanup()
            raise MountError(
                f"s3stashfs unmount {self.path}: exit {result.returncode}, "
                f"still mounted: {still_mounted}, daemon {self.pid} alive: {alive}\n"
                f"stderr: {result.stderr.decode(errors='replace')}\n"
                f"forced cleanup: {forced or 'ok'}\n"
                f"log tail:\n{helpers.tail(self.log_file)}"
            )
        return result

    def remount(self, *, extra_args: Sequence[str] | None = None,
                env: Mapping[str, str | None] | None = None, timeout: float = MOUNT_TIMEOUT) -> Mount:
        """Unmount (if mounted) and mount again: same mountpoint, cache dir and bucket;
        a new log file. `extra_args`/`env` replace/update the previous ones."""
        if self.mounted or self.is_mounted():
            self.unmount()
        if extra_args is not None:
            self.extra_args = tuple(extra_args)
        if env is not None:
            self.env = _merge_env(self.env, env)
        self.factory._do_mount(self, timeout=timeout, check=True)
        return self

    def force_cleanup(self) -> list[str]:
        """Unmount by any means and make sure the daemon is gone. Returns problems
        (empty if all went well); never raises."""
        problems: list[str] = []
        try:
            if self.is_mounted():
                r = self.factory._run_cli(["unmount", str(self.path)], self.env, UNMOUNT_TIMEOUT)
                if self.is_mounted():
                    problems.append(
                        f"s3stashfs unmount failed ({r.returncode}): "
                        f"{r.stderr.decode(errors='replace').strip()}"
                    )
                    for args in (["-u"], ["-uz"]):
                        if not self.is_mounted():
                            break
                        helpers.run(["fusermount3", *args, str(self.path)], timeout=30)
            pid = self.pid or self.read_pid()
            if pid is not None and helpers.pid_alive(pid):
                try:
                    wait_for(lambda: not helpers.pid_alive(pid), timeout=10)
                except AssertionError:
                    problems.append(f"daemon {pid} still alive after unmount: terminated")
                    helpers.terminate_pid(pid, timeout=5, must_contain="s3stashfs")
            if self.is_mounted():
                helpers.run(["fusermount3", "-uz", str(self.path)], timeout=30)
        except Exception as exc:  # noqa: BLE001 - teardown must go on
            problems.append(f"cleanup error: {exc!r}")
        self.mounted = False
        return problems


def _merge_env(base: Mapping[str, str], changes: Mapping[str, str | None] | None) -> dict[str, str]:
    env = dict(base)
    for k, v in (changes or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


_DEFAULT = object()


class MountFactory:
    """The `mount` fixture: call it to mount; everything is cleaned up at teardown."""

    def __init__(self, request: pytest.FixtureRequest, moto_server: MotoServer, s3env: dict[str, str],
                 workdir: Path, mnt_root: Path):
        self.request = request
        self.moto_server = moto_server
        self.s3env = s3env
        self.workdir = workdir
        self.mnt_root = mnt_root
        self.mounts: list[Mount] = []
        self.command: list[str] = [str(S3STASHFS_BIN)]  # how to run s3stashfs
        marker_patterns = [p for m in request.node.iter_markers("expect_log") for p in m.args]
        self.expected_log = marker_patterns
        self.check_log = request.node.get_closest_marker("allow_log_problems") is None
        self._n = itertools.count()

    def __call__(
        self,
        bucket: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        endpoint_url: Any = _DEFAULT,
        timeout: float = MOUNT_TIMEOUT,
    ) -> Mount:
        """Mount (daemonised) and return the Mount once it answers; fail the test
        with the command's stderr and the log tail if it does not.

        bucket: "NAME" or "NAME/PREFIX" (None: the root lists buckets);
        extra_args: more CLI arguments (they come last, so they override);
        env: changes to s3env (a value of None removes the variable);
        cache_dir: reuse a cache directory (default: a new one);
        endpoint_url: default moto_server.url; None leaves --endpoint-url out."""
        m = self._new(bucket, extra_args, env, cache_dir, endpoint_url)
        self._do_mount(m, timeout=timeout, check=True)
        return m

    def run(
        self,
        bucket: str | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str | None] | None = None,
        cache_dir: str | os.PathLike | None = None,
        *,
        endpoint_url: Any = _DEFAULT,
        timeout: float = MOUNT_TIMEOUT,
    ) -> tuple[Mount, subprocess.CompletedProcess]:
        """Like calling the fixture, but nothing is asserted: for tests of failing
        mounts (exit codes, stderr). If it did mount, teardown still unmounts. When
        it failed, WARNING/ERROR lines in its log are fine, tracebacks are not."""
        m = self._new(bucket, extra_args, env, cache_dir, endpoint_url)
        result = self._do_mount(m, timeout=timeout, check=False)
        m.tracebacks_only = result.returncode != 0
        return m, result

    def _new(self, bucket, extra_args, env, cache_dir, endpoint_url) -> Mount:
        n = next(self._n)
        mnt = Path(tempfile.mkdtemp(prefix=f"m{n}-", dir=self.mnt_root))
        if cache_dir is None:
            cache_dir = self.workdir / f"cache{n}"
        m = Mount(
            factory=self,
            path=mnt,
            cache_dir=Path(cache_dir),
            bucket=bucket,
            extra_args=tuple(str(a) for a in extra_args),
            env=_merge_env(self.s3env, env),
            endpoint_url=self.moto_server.url if endpoint_url is _DEFAULT else endpoint_url,
            check_log=self.check_log,
            expected_log=list(self.expected_log),
        )
        self.mounts.append(m)
        self.request.node._s3stashfs_mounts = self.mounts
        return m

    def argv(self, m: Mount, log_file: Path) -> list[str]:
        args = [*self.command, "mount", str(m.path)]
        if m.endpoint_url is not None:
            args += ["--endpoint-url", m.endpoint_url]
        args += ["--cache-dir", str(m.cache_dir), "--log-file", str(log_file)]
        if m.bucket is not None:
            args += ["--bucket", m.bucket]
        return args + list(m.extra_args)

    def _run_cli(self, args: list[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
        """Run `s3stashfs ARGS` with output to files: a daemon that keeps an inherited
        pipe open must not make us wait for EOF."""
        n = next(self._n)
        out_path, err_path = self.workdir / f"cli{n}.stdout", self.workdir / f"cli{n}.stderr"
        cmd = [*self.command, *args]
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env))
            except OSError as exc:
                return subprocess.CompletedProcess(cmd, 127, b"", f"cannot run {cmd[0]}: {exc}".encode())
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                rc = None
        stderr = err_path.read_bytes()
        if rc is None:
            stderr += f"\n[fixture] {' '.join(args[:1])} did not finish within {timeout:g}s: killed".encode()
            rc = -9
        return subprocess.CompletedProcess(cmd, rc, out_path.read_bytes(), stderr)

    def _do_mount(self, m: Mount, timeout: float, check: bool) -> subprocess.CompletedProcess:
        log_file = self.workdir / (
            f"{m.path.name}.log" if not m.log_files else f"{m.path.name}-{len(m.log_files)}.log"
        )
        m.log_files.append(log_file)
        argv = self.argv(m, log_file)
        started = time.monotonic()
        result = self._run_cli(argv[len(self.command):], m.env, timeout)
        elapsed = time.monotonic() - started
        m.last_result = result
        m.pid = None
        if result.returncode == 0:
            try:
                m.pid = wait_for(m.read_pid, timeout=5, message=f"a PID in {m.lock_file}")
            except AssertionError:
                m.pid = None
        m.mounted = m.is_mounted()

        if check:
            problem = None
            if result.returncode != 0:
                problem = f"exited {result.returncode}"
            elif not m.mounted:
                problem = "exited 0 but the mountpoint is not in /proc/mounts"
            elif m.pid is None:
                problem = f"exited 0 but {m.lock_file} holds no PID (contract)"
            elif not helpers.pid_alive(m.pid):
                problem = f"exited 0 but the daemon PID {m.pid} from {m.lock_file} is not running"
            if problem:
                forced = m.force_cleanup()
                server = self.moto_server
                pytest.fail(
                    f"s3stashfs mount {problem} (after {elapsed:.1f}s)\n"
                    f"command: {' '.join(argv)}\n"
                    f"stderr: {result.stderr.decode(errors='replace').strip() or '<empty>'}\n"
                    f"stdout: {result.stdout.decode(errors='replace').strip() or '<empty>'}\n"
                    f"log {log_file} (tail):\n{helpers.tail(log_file)}\n"
                    f"moto_server: {'running' if server.is_running() else 'NOT running'} "
                    f"at {server.url}\n"
                    f"cleanup: {forced or 'ok'}",
                    pytrace=False,
                )
        elif m.mounted and m.pid is None:
            m.pid = m.read_pid()
        return result

    def teardown(self) -> None:
        errors: list[str] = []
        # A server left frozen (SIGSTOP) would make a clean unmount wait on S3; a
        # stopped one is left stopped: unmounting offline is a case of its own.
        self.moto_server.thaw()
        for m in reversed(self.mounts):
            if m.mounted or m.is_mounted() or m.daemon_alive():
                errors += [f"{m.path}: {p}" for p in m.force_cleanup()]
        left = [row for row in helpers.proc_mounts() if row[1].startswith(str(self.mnt_root) + "/")]
        for _, mp, _ in left:
            helpers.run(["fusermount3", "-uz", mp], timeout=30)
        if left:
            errors.append(f"still in /proc/mounts after teardown (lazily unmounted now): {left}")
        for m in self.mounts:
            try:
                m.path.rmdir()
            except OSError:
                pass
        failed = _test_failed(self.request)
        for m in self.mounts:
            if m.check_log and not failed:
                for block in m.unexpected_log_problems():
                    errors.append(f"unexpected in the log of {m.path.name}:\n{block}")
            if not failed:
                for pat in m.missing_required_log():
                    errors.append(f"expected log pattern {pat!r} never appeared ({m.path.name})")
        if errors:
            pytest.fail(
                "mount teardown:\n" + "\n".join(errors)
                + "\n(expected warnings: m.expect_log(regex) or @pytest.mark.expect_log; "
                "to ignore all: m.check_log = False or @pytest.mark.allow_log_problems)",
                pytrace=False,
            )


@pytest.fixture(scope="session")
def _mnt_root() -> Iterator[Path]:
    """Mountpoints live in their own directory, outside pytest's tmp tree: pytest
    deletes old tmp trees recursively, which must never walk into a live mount."""
    root = Path(tempfile.mkdtemp(prefix="s3stashfs-test-mnt-"))
    try:
        yield root
    finally:
        for _, mp, _ in helpers.proc_mounts():
            if mp.startswith(str(root) + "/"):
                helpers.run(["fusermount3", "-uz", mp], timeout=30)
        for d in root.iterdir():
            try:
                d.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass


@pytest.fixture
def mount(request: pytest.FixtureRequest, moto_server: MotoServer, s3env: dict[str, str], tmp_path: Path,
          _mnt_root: Path) -> Iterator[MountFactory]:
    """Factory: mount(bucket=None, extra_args=(), env=None, cache_dir=None) -> Mount
    (.path .cache_dir .log_file .pid .unmount() .remount() .expect_log()).
    mount.run(...) -> (Mount, CompletedProcess) for mounts expected to fail."""
    factory = MountFactory(request, moto_server, s3env, tmp_path, _mnt_root)
    try:
        yield factory
    finally:
        factory.teardown()


# ---------------------------------------------------------------------------- biodata


@pytest.fixture(scope="session")
def bam_files(tmp_path_factory: pytest.TempPathFactory) -> biodata.BamFiles:
    """A coordinate-sorted, indexed BAM of ~3.6 MB (chr1, chr2), made once per session."""
    if not biodata.HAVE_SAMTOOLS:
        pytest.skip("samtools is not installed")
    return biodata.make_bam(tmp_path_factory.mktemp("bam"))


@pytest.fixture(scope="session")
def vcf_files(tmp_path_factory: pytest.TempPathFactory) -> biodata.VcfFiles:
    """A bgzipped, tabix-indexed VCF of ~1.4 MB (plain text beside it), made once."""
    if not biodata.HAVE_HTSLIB_TOOLS:
        pytest.skip("bgzip/tabix are not installed")
    return biodata.make_vcf(tmp_path_factory.mktemp("vcf"))
