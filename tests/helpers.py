"""Small test utilities: polling, deterministic data, checksums, processes, mounts.

Nothing here sleeps for a fixed time to synchronise: `wait_for` polls a condition
until a deadline, so a test can fail instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB
BLOCK_SIZE = 64 * KiB  # the cache's block size (contract)

# Requests made by the tests' own boto3 clients carry this in their User-Agent, so
# request accounting can tell them from the mount's requests.
TEST_USER_AGENT_EXTRA = "pytest-fixture-client"


# --------------------------------------------------------------------------- polling


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `predicate` until it returns something truthy; return that value.

    Raises AssertionError after `timeout` seconds, naming `message` (a string or a
    function that builds one, e.g. to include a log tail) and the last value or the
    last ignored exception. Exceptions listed in `ignore` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            last = predicate()
            last_exc = None
            if last:
                return last
        except ignore as exc:  # noqa: PERF203 - polling
            last_exc = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f"last exception: {last_exc!r}" if last_exc else f"last value: {last!r}"
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for "
                f"{text or getattr(predicate, '__name__', 'condition')} ({detail})"
            )
        time.sleep(interval)


# ----------------------------------------------------------------- data and checksums


def random_bytes(size: int, seed: int | str = 0) -> bytes:
    """Deterministic pseudo-random bytes (64 MiB in about 0.2 s)."""
    return random.Random(seed).randbytes(size)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def md5_file(path: str | os.PathLike, chunk_size: int = 4 * MiB) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def s3_etag(data: bytes, part_size: int | None = None) -> str:
    """The ETag S3 gives `data` (quoted): MD5 for a single PUT, or the multipart form
    md5(concat(md5(part)...))-N when uploaded in parts of `part_size` bytes."""
    if part_size is None:
        return f'"{md5_hex(data)}"'
    digests = [
        hashlib.md5(data[i : i + part_size]).digest() for i in range(0, max(len(data), 1), part_size)
    ]
    return f'"{hashlib.md5(b"".join(digests)).hexdigest()}-{len(digests)}"'


def read_range(path: str | os.PathLike, offset: int, length: int) -> bytes:
    """pread `length` bytes at `offset` with a plain open(), like a random-access reader."""
    with open(path, "rb", buffering=0) as f:
        return os.pread(f.fileno(), length, offset)


# ------------------------------------------------------------------------- S3 objects


@dataclass
class PutObject:
    bucket: str
    key: str
    data: bytes
    etag: str  # quoted, as S3 returns it

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def md5(self) -> str:
        return md5_hex(self.data)


def put_random_object(
    s3: Any,
    bucket: str,
    key: str,
    size: int,
    seed: int | str | None = None,
    **put_kwargs: Any,
) -> PutObject:
    """PUT `size` deterministic pseudo-random bytes (seeded by `seed`, default: the key)."""
    data = random_bytes(size, key if seed is None else seed)
    return put_object(s3, bucket, key, data, **put_kwargs)


def put_object(s3: Any, bucket: str, key: str, data: bytes, **put_kwargs: Any) -> PutObject:
    resp = s3.put_object(Bucket=bucket, Key=key, Body=data, **put_kwargs)
    return PutObject(bucket, key, data, resp["ETag"])


def put_multipart_object(
    s3: Any, bucket: str, key: str, data: bytes, part_size: int = 5 * MiB, **create_kwargs: Any
) -> PutObject:
    """Upload `data` in parts of `part_size` (the last may be smaller); ETag ends in -N."""
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key, **create_kwargs)
    parts = []
    for number, start in enumerate(range(0, max(len(data), 1), part_size), start=1):
        resp = s3.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=mpu["UploadId"],
            PartNumber=number,
            Body=data[start : start + part_size],
        )
        parts.append({"ETag": resp["ETag"], "PartNumber": number})
    resp = s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
    )
    return PutObject(bucket, key, data, resp["ETag"])


def put_multipart_with_checksums(
    s3: Any, bucket: str, key: str, data: bytes, part_size: int, algorithm: str | None = None
) -> str:
    """Upload `data` in parts, each part and the upload with S3 checksums of `algorithm`
    ('CRC32C', 'CRC32', 'SHA256', 'CRC64NVME'; None: none). Returns the ETag, unquoted."""
    kw = {"ChecksumAlgorithm": algorithm} if algorithm else {}
    mpu = s3.create_multipart_upload(Bucket=bucket, Key=key, **kw)
    parts = []
    for n, start in enumerate(range(0, max(len(data), 1), part_size), start=1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=mpu["UploadId"], PartNumber=n,
                           Body=data[start : start + part_size], **kw)
        sums = {k: v for k, v in r.items() if k.startswith("Checksum") and k != "ChecksumType"}
        parts.append({"ETag": r["ETag"], "PartNumber": n, **sums})
    r = s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=mpu["UploadId"], MultipartUpload={"Parts": parts}
    )
    return r["ETag"].strip('"')


def upload_files(s3: Any, bucket: str, prefix: str, paths: Iterable[str | os.PathLike]) -> list[str]:
    """Upload local files as `<prefix><file name>`; return the keys."""
    keys = []
    for p in paths:
        key = f"{prefix}{Path(p).name}"
        s3.upload_file(str(p), bucket, key)
        keys.append(key)
    return keys


def list_keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def empty_and_delete_bucket(s3: Any, bucket: str) -> None:
    """Abort multipart uploads, delete every object, delete the bucket."""
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for up in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    keys = list_keys(s3, bucket)
    for i in range(0, len(keys), 1000):
        s3.delete_objects(
            Bucket=bucket,
            Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
        )
    s3.delete_bucket(Bucket=bucket)


# -------------------------------------------------------------------------- processes


def run(
    cmd: Sequence[str | os.PathLike],
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    **kwargs: Any,
) -> subprocess.CompletedProcess:
    """Run a command with captured bytes output and a bounded wait."""
    result = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
            f"stderr: {result.stderr.decode(errors='replace')}"
        )
    return result


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the last ')' (the command name may contain spaces/parens).
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


def pid_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def terminate_pid(pid: int, timeout: float = 10.0, must_contain: str | None = None) -> bool:
    """SIGTERM then SIGKILL one process by PID; return True if it is gone.

    With `must_contain`, the process is only signalled while its command line still
    contains that text, so a recycled PID of someone else's process is never hit.
    """

    def ours() -> bool:
        return must_contain is None or any(must_contain in a for a in pid_cmdline(pid))

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return True
        if not ours():
            return not pid_alive(pid)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        try:
            wait_for(lambda: not pid_alive(pid), timeout=wait, interval=0.05)
            return True
        except AssertionError:
            continue
    return not pid_alive(pid)


# ----------------------------------------------------------------------------- mounts


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def proc_mounts() -> list[tuple[str, str, str]]:
    """(source, mountpoint, fstype) for every line of /proc/mounts."""
    rows = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                rows.append(
                    (_unescape_mount_field(parts[0]), _unescape_mount_field(parts[1]), parts[2])
                )
    return rows


def mounted_at(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """/proc/mounts rows whose mountpoint is `path` (stacked mounts give several)."""
    target = os.path.abspath(path)
    return [row for row in proc_mounts() if row[1] == target]


def tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------ request records


@dataclass(frozen=True)
class S3Request:
    """One HTTP request as moto_server's recorder saw it (before handling it)."""

    method: str
    bucket: str | None  # None for service-level calls (ListBuckets)
    key: str | None  # None for bucket-level calls; percent-decoded
    range: str | None  # the Range header as sent, e.g. "bytes=65536-131071"
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    url: str
    offset: int  # where the record starts in the recording file (orders records)

    @property
    def if_match(self) -> str | None:
        return self.headers.get("if-match")

    @property
    def if_none_match(self) -> str | None:
        return self.headers.get("if-none-match")

    @property
    def user_agent(self) -> str:
        return self.headers.get("user-agent", "")

    @property
    def from_tests(self) -> bool:
        """Made by the tests' own boto3 clients (not by the mount)."""
        return TEST_USER_AGENT_EXTRA in self.user_agent

    @property
    def internal(self) -> bool:
        """moto's own API (/moto-api/...), e.g. the fixture's readiness probe."""
        return self.bucket == "moto-api"

    @property
    def content_length(self) -> int:
        """Payload bytes sent (the decoded length for aws-chunked uploads)."""
        value = self.headers.get("x-amz-decoded-content-length") or self.headers.get(
            "content-length", "0"
        )
        return int(value or 0)

    def range_span(self, size: int | None = None) -> tuple[int, int] | None:
        """[start, end) asked for by a single-range Range header; None without one.
        `size` resolves open ("bytes=N-") and suffix ("bytes=-N") ranges."""
        if not self.range:
            return None
        unit, _, spec = self.range.partition("=")
        if unit.strip() != "bytes" or "," in spec:
            raise ValueError(f"unsupported Range header {self.range!r}")
        first, _, last = spec.strip().partition("-")
        if first == "":
            if size is None:
                raise ValueError(f"suffix range {self.range!r} needs the object size")
            return max(size - int(last), 0), size
        start = int(first)
        if last == "":
            if size is None:
                raise ValueError(f"open range {self.range!r} needs the object size")
            return start, size
        end = int(last) + 1
        return start, end if size is None else min(end, size)

    @property
    def op(self) -> str:
        """The S3 operation name, e.g. "GetObject", "HeadObject", "ListObjectsV2"."""
        m, q, h = self.method, self.query, self.headers
        if self.bucket is None:
            return "ListBuckets" if m == "GET" else f"{m} /"
        if self.key is None:
            if m == "GET":
                if q.get("list-type") == "2":
                    return "ListObjectsV2"
                for sub, name in (
                    ("uploads", "ListMultipartUploads"),
                    ("versions", "ListObjectVersions"),
                    ("location", "GetBucketLocation"),
                    ("versioning", "GetBucketVersioning"),
                ):
                    if sub in q:
                        return name
                if set(q) <= {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}:
                    return "ListObjects"
            elif m == "HEAD":
                return "HeadBucket"
            elif m == "PUT" and not q:
                return "CreateBucket"
            elif m == "DELETE" and not q:
                return "DeleteBucket"
            elif m == "POST" and "delete" in q:
                return "DeleteObjects"
            return f"{m} bucket?{'&'.join(sorted(q))}"
        copy = "x-amz-copy-source" in h
        if m == "GET":
            if "uploadId" in q:
                return "ListParts"
            if "tagging" in q:
                return "GetObjectTagging"
            if "attributes" in q:
                return "GetObjectAttributes"
            return "GetObject"
        if m == "HEAD":
            return "HeadObject"
        if m == "PUT":
            if "uploadId" in q:
                return "UploadPartCopy" if copy else "UploadPart"
            if "tagging" in q:
                return "PutObjectTagging"
            return "CopyObject" if copy else "PutObject"
        if m == "POST":
            if "uploads" in q:
                return "CreateMultipartUpload"
            if "uploadId" in q:
                return "CompleteMultipartUpload"
        if m == "DELETE":
            return "AbortMultipartUpload" if "uploadId" in q else "DeleteObject"
        return f"{m} object?{'&'.join(sorted(q))}"

    def __str__(self) -> str:
        where = "/".join(p for p in (self.bucket, self.key) if p is not None)
        extra = f" Range: {self.range}" if self.range else ""
        return f"{self.op} {self.method} /{where}{extra}"


def parse_recorded_request(entry: dict, offset: int = 0) -> S3Request:
    """Turn one entry of moto's recording (MOTO_ENABLE_RECORDING) into an S3Request."""
    headers = {str(k).lower(): str(v) for k, v in (entry.get("headers") or {}).items()}
    url = entry.get("url", "")
    parts = urlsplit(url)
    path = parts.path or "/"
    bucket: str | None
    key: str | None
    host = headers.get("host", parts.netloc).rsplit(":", 1)[0]
    # Virtual-hosted style ("<bucket>.localhost:PORT"); botocore uses path style for an
    # IP endpoint such as http://127.0.0.1:PORT, which is what the fixtures hand out.
    if host.endswith(".localhost"):
        bucket = host[: -len(".localhost")]
        key = unquote(path[1:]) if path[1:] else None
    else:
        first, slash, rest = path[1:].partition("/")
        bucket = unquote(first) if first else None
        key = unquote(rest) if slash and rest else None
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return S3Request(
        method=str(entry.get("method", "")).upper(),
        bucket=bucket,
        key=key,
        range=headers.get("range"),
        query=query,
        headers=headers,
        url=url,
        offset=offset,
    )


def read_recording(path: str | os.PathLike, offset: int = 0) -> tuple[list[S3Request], int]:
    """Parse moto's recording file from byte `offset`; return (records, end offset).

    moto appends one JSON object per request from many threads without a lock. A
    small record is one write() and lands whole; a record with a large body is
    written as the JSON and then its newline, so two records can end up glued
    together ("{...}{...}\\n\\n"). raw_decode copes with that. A record still being
    written at the end of the file is left for the next call; damage anywhere else
    is an error, never a silently missing request.
    """
    decoder = json.JSONDecoder()
    records: list[S3Request] = []
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return records, offset
    with f:
        f.seek(offset)
        pos = offset
        while True:
            line = f.readline()
            if not line:
                break
            if not line.endswith(b"\n"):
                break  # being written right now
            text = line.decode("utf-8", errors="replace")
            i = 0
            while i < len(text):
                while i < len(text) and text[i].isspace():
                    i += 1
                if i >= len(text):
                    break
                try:
                    entry, end = decoder.raw_decode(text, i)
                except json.JSONDecodeError as exc:
                    raise AssertionError(
                        f"moto recording {path} is damaged at byte {pos + i}: {exc}"
                    ) from None
                records.append(parse_recorded_request(entry, pos + i))
                i = end
            pos += len(line)
    return records, pos


# ------------------------------------------------------------------------ mount logs

_LEVEL_RE = re.compile(r"(?<![A-Za-z])(WARNING|ERROR|CRITICAL|FATAL)(?![A-Za-z])")
_TB_START = "Traceback (most recent call last)"
_TB_CHAIN = (
    "During handling of the above exception",
    "The above exception was the direct cause",
)


def find_log_problems(text: str) -> list[str]:
    """Blocks of a log that a test should not see unannounced: a WARNING / ERROR /
    CRITICAL record with its continuation lines, and every traceback (attached to the
    record that logged it, or to the line before it)."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    in_tb = False
    prev: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(_TB_START) or stripped.startswith(_TB_CHAIN):
            if current is None:
                current = [prev] if prev is not None else []
                blocks.append(current)
            current.append(line)
            in_tb = stripped.startswith(_TB_START)
            continue
        if in_tb:
            current.append(line)  # type: ignore[union-attr]
            if stripped and not line[:1].isspace():
                in_tb = False  # the exception line ends the traceback
            continue
        if _LEVEL_RE.search(line):
            current = [line]
            blocks.append(current)
        elif current is not None and (not stripped or line[:1].isspace()):
            current.append(line)
        else:
            current = None
        if stripped:
            prev = line
    return ["\n".join(b).strip("\n") for b in blocks]


def read_or_none(path: str | os.PathLike) -> bytes | None:
    """The file's bytes, or None if reading fails (for polling until a mount answers)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


OFFLINE_LOG = "offline, serving what is cached"
ONLINE_LOG = "back online"


def cut_off(m: Any, proxy: Any, mode: str = "refuse") -> None:
    """Make S3 unreachable for mount ``m`` (through the loopback ``proxy``) and wait until the
    mount has noticed: its log says it went offline. A lookup of a name never seen asks S3."""
    n = m.log_text().count(OFFLINE_LOG)
    proxy.set_mode(mode)

    def noticed() -> bool:
        try:
            os.stat(m.path / f".never-there-{time.monotonic_ns()}")
        except OSError:
            pass
        return m.log_text().count(OFFLINE_LOG) > n
    wait_for(noticed, timeout=30, message="the mount to notice that S3 is unreachable")


def reconnect(m: Any, proxy: Any) -> None:
    """S3 answers again; wait until the mount's probe (backing off up to 10 s) has found out."""
    n = m.log_text().count(ONLINE_LOG)
    proxy.set_mode("pass")
    wait_for(lambda: m.log_text().count(ONLINE_LOG) > n, timeout=30,
             message="the mount to come back online")
