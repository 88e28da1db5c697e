"""Values the store hands out (object info, list pages, parts), timeouts, small helpers."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from decimal import Decimal, InvalidOperation

import trio
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from .. import checksums
from ..errors import StoreError, first_error

log = logging.getLogger(__name__)

PIECE = 256 << 10  # bytes read from a response body between progress reports: each reading
# thread holds about twice this (http.client's buffer and its copy), and 64 threads may read
COPY_MAX = 5 << 30  # the largest object CopyObject copies in one request
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long each kind of call waits for S3, in seconds. A read timeout bounds each wait for
    the socket (between two pieces of an answer), not a whole transfer. All scale with the
    ``timeout`` setting (the metadata one, 5 s by default).

    - connect (2 s): loopback, a LAN and the Internet connect in well under a second; 2 s still
      rides out one lost SYN (retransmitted after 1 s).
    - meta (5 s): HEAD, LIST, ListBuckets, the probe, DELETE, starting or aborting a multipart
      upload. S3 answers these in tens of milliseconds; none in 5 s is a hung server or a dead
      link, and the mount should be offline by then.
    - data (10 s): between two reads of a GET's body. A slow link still delivers something
      every few milliseconds, and TCP's retransmissions back off 0.2, 0.4, 0.8... s, so 10 s
      rides out about five losses in a row; a stalled download fails instead of hanging.
    - write (30 s): PUTs, parts, completing a multipart upload, server-side copies. S3 may think
      a while after the last byte of a big part, or while it copies; a false failure costs a
      whole upload again, and nobody but close() and fsync() waits for these.
    """

    connect: float = 2.0
    meta: float = 5.0
    data: float = 10.0
    write: float = 30.0

    @classmethod
    def scaled(cls, meta: float) -> Timeouts:
        return cls(connect=0.4 * meta, meta=meta, data=2 * meta, write=6 * meta)


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What S3 says about one object version. One per file the mount has seen: slots, no
    per-instance dict (48 bytes less each; a listed directory of 100,000 keys keeps 100,000)."""

    etag: str  # without quotes
    size: int
    last_modified_ns: int
    mtime_ns: int  # x-amz-meta-mtime when present (the s3fs convention), else LastModified
    metadata: tuple[tuple[str, str], ...] = ()  # x-amz-meta-* (only known after a HEAD)
    from_head: bool = False
    storage_class: str = "STANDARD"  # listing's StorageClass, HEAD's x-amz-storage-class
    restore: str | None = None  # HEAD's x-amz-restore (see store/archive.py)
    archive_status: str | None = None  # HEAD's x-amz-archive-status (INTELLIGENT_TIERING)


@dataclasses.dataclass
class ListPage:
    prefixes: list[str]
    objects: list[ObjectInfo]
    keys: list[str]
    next_token: str | None


def strip_etag(etag: str) -> str:
    return etag.strip().strip('"')


def is_md5_etag(etag: str) -> bool:
    """Single-part ETags are the MD5 of the content (SSE-KMS aside, checked by the caller)."""
    return bool(_MD5_ETAG.match(etag))


def parse_meta_mtime(value: str | None) -> int | None:
    """x-amz-meta-mtime as s3fs and rclone write it: seconds since the epoch, maybe fractional."""
    if not value:
        return None
    try:
        return int(Decimal(value.strip()) * 1_000_000_000)
    except (InvalidOperation, ValueError):
        return None


def _parse_timestamp(value):
    """ISO 8601 the fast way; anything else (HTTP dates of HEAD) the botocore way."""
    if isinstance(value, str) and len(value) >= 20 and value[4] == "-" and value[10] == "T":
        try:
            dt = datetime.datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
            if dt.tzinfo is not None:
                return dt
        except ValueError:
            pass
    return botocore_parse_timestamp(value)


async def run_all(fn, items) -> None:
    """``fn(i, item)`` for every item, concurrently; the first domain error, not a group."""
    try:
        async with trio.open_nursery() as n:
            for i, item in enumerate(items):
                n.start_soon(fn, i, item)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None


def _pread_all(fd: int, off: int, size: int) -> bytes:
    parts, pos = [], off
    while pos < off + size:
        b = os.pread(fd, off + size - pos, pos)
        if not b:
            raise StoreError(f"cache file is shorter than expected ({pos - off} of {size} bytes)")
        parts.append(b)
        pos += len(b)
    return b"".join(parts)


def meta_mtime(ns: int) -> str:
    """x-amz-meta-mtime as s3fs writes it (whole seconds), with a fraction only when needed."""
    sec, frac = divmod(ns, 1_000_000_000)
    return f"{sec}" if not frac else f"{sec}.{frac:09d}"


def _ns(dt) -> int:
    return int(dt.timestamp() * 1_000_000_000) if dt is not None else 0



CHECKSUMS = checksums.ALGOS

def _checksum_digests(response: dict) -> list[tuple[str, str, object]]:
    """(name, expected, running digest) for each full-object checksum S3 gave that we can check
    ourselves. A COMPOSITE checksum ("...-N", or so typed) joins the parts' sums: it is not of
    the whole, and is checked later from the cached bytes (see verify.py). One this
    installation cannot compute is logged and left out: the object is not verified by it."""
    out = []
    composite = response.get("ChecksumType") == "COMPOSITE"
    for algo in CHECKSUMS:
        expected = response.get(f"Checksum{algo}")
        if not expected or composite or checksums.split_composite(expected)[1] is not None:
            continue
        digest = checksums.new_digest(algo)
        if digest is None:
            log.debug("cannot compute %s here: not verified by it", algo)
            continue
        out.append((algo, expected, digest))
    return out


@dataclasses.dataclass(frozen=True)
class PartsInfo:
    """What S3 says about the parts and sums of one object version (``object_parts``)."""

    etag: str
    parts: int | None = None  # how many parts (from the ETag "-N" or x-amz-mp-parts-count)
    sizes: tuple[int, ...] | None = None  # every part's size (GetObjectAttributes)
    part_size: int | None = None  # part 1's size (HEAD ?partNumber=1): the others but the last
    part_sums: tuple[str, tuple[str, ...]] | None = None  # (algorithm, each part's sum)
    checksum: tuple[str, str] | None = None  # (algorithm, base64 value without "-N")
    checksum_type: str | None = None  # FULL_OBJECT, COMPOSITE, or None: S3 did not say
    encrypted: bool = False  # SSE-KMS or SSE-C: the ETag is not an MD5 of the bytes


def _encrypted(r: dict) -> bool:
    """SSE-KMS or SSE-C: S3's ETag is then no MD5 of the bytes."""
    return bool(str(r.get("ServerSideEncryption") or "").startswith("aws:kms")
                or r.get("SSECustomerAlgorithm"))


