"""The sums S3 keeps of an object, computed here from bytes: MD5, CRC32, CRC32C, CRC64NVME,
SHA-1, SHA-256; the multipart ETag and the composite checksums that join per-part sums; the
part sizes a multipart object may have been uploaded with.

Pure functions and small digest objects: no S3, no cache, safe in worker threads. CRC32C comes
from the ``crc32c`` package (hardware-accelerated) and CRC64NVME from ``awscrt`` (what botocore
uses); when one cannot be imported, ``new_digest`` answers None and callers say that the
object is not verified by that sum rather than pretend.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import zlib
from types import ModuleType
from typing import Any

_crc32c: ModuleType | None
try:
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - a declared dependency
    _crc32c = None
try:
    from awscrt import checksums as _crt
except ImportError:  # pragma: no cover - a declared dependency
    _crt = None

MiB = 1 << 20
# S3's checksum algorithms, in the order a check prefers them (fastest first)
ALGOS = ("CRC64NVME", "CRC32C", "CRC32", "SHA256", "SHA1")
PIECE = 8 << 20  # bytes read from a cache file at a time
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")
# Part sizes uploaders use, most common first: boto3, the AWS CLI and mountpoint-s3 use 8 MiB;
# rclone, goofys and S3's minimum 5 MiB; s3fs 10, s3cmd 15, MinIO's client 16 MiB; then round
# sizes people configure. s3transfer doubles its 8 MiB while a file would need more than
# 10,000 parts (see ``candidate_part_sizes``).
COMMON_PART_SIZES = tuple(n * MiB for n in (8, 5, 16, 10, 15, 32, 64, 100, 128, 25, 50, 256,
                                            512, 1024, 2048, 4096))
MAX_PART_SIZE_TRIES = 6  # each try reads the whole file again


UNVERIFIABLE = "unverifiable:"  # Row.verified_by of a complete object nothing can check
_LABELS = {"md5": "MD5", "multipart-etag": "multipart ETag", "upload": "uploaded from here"}


def label(how: str | None) -> str:
    """How an object was verified (``Row.verified_by``), for people: "MD5", "multipart ETag",
    "per-part CRC32C", "CRC64NVME"."""
    if not how:
        return "S3"
    if how.startswith("parts-"):
        return f"per-part {how[6:].upper()}"
    return _LABELS.get(how, how.upper())


def describe_verified(verified: bool, how: str | None, etag: str) -> str:
    """The verification part of ``user.s3.cache`` for a complete object."""
    if verified:
        return f"verified ({label(how or ('md5' if re.fullmatch('[0-9a-f]{32}', etag) else ''))})"
    if how and how.startswith(UNVERIFIABLE):
        return f"not verifiable ({how[len(UNVERIFIABLE):]})"
    return "not yet verified"


class _Crc:
    """zlib-style running CRC with S3's big-endian digest."""

    def __init__(self, fn, width: int):
        self._fn, self._width, self.value = fn, width, 0

    def update(self, data) -> None:
        self.value = self._fn(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self._width, "big")


def available(algo: str) -> bool:
    algo = algo.upper()
    if algo == "CRC32C":
        return _crc32c is not None
    if algo == "CRC64NVME":
        return _crt is not None
    return algo in ("CRC32", "SHA1", "SHA256", "MD5")


def new_digest(algo: str):
    """A running digest (``update``, ``digest``) of S3's algorithm ``algo``, or None when this
    installation cannot compute it."""
    algo = algo.upper()
    if algo == "CRC32":
        return _Crc(zlib.crc32, 4)
    if algo == "CRC32C":
        return _Crc(lambda d, v: _crc32c.crc32c(d, v), 4) if _crc32c is not None else None
    if algo == "CRC64NVME":
        return _Crc(lambda d, v: _crt.crc64nvme(d, v), 8) if _crt is not None else None
    if algo in ("SHA1", "SHA256", "MD5"):
        return hashlib.new(algo.lower(), usedforsecurity=False)
    return None


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def split_composite(value: str) -> tuple[str, int | None]:
    """S3's checksum header value as (base64 value, parts): "abc==-3" is a composite of 3
    parts' sums, "abc==" may be either (the type header says which)."""
    head, sep, tail = value.strip().rpartition("-")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return value.strip(), None


def etag_parts(etag: str) -> int | None:
    """N of a multipart ETag "<md5 of the parts' MD5s>-N", else None."""
    m = _MULTIPART_ETAG.match(etag)
    return int(m.group(1)) if m else None


def multipart_etag(part_md5s: list[bytes]) -> str:
    """The ETag S3 gives a multipart upload: MD5 of the parts' binary MD5s, then -N."""
    joined = hashlib.md5(b"".join(part_md5s), usedforsecurity=False).hexdigest()
    return f"{joined}-{len(part_md5s)}"


def composite(algo: str, part_digests: list[bytes]) -> str | None:
    """A COMPOSITE checksum (base64, without "-N"): ``algo`` of the parts' binary sums."""
    d = new_digest(algo)
    if d is None:
        return None
    d.update(b"".join(part_digests))
    return b64(d.digest())


def uniform_parts(size: int, part_size: int) -> list[tuple[int, int]]:
    """[start, end) of each part of an object uploaded in parts of ``part_size`` (the last one
    shorter)."""
    if part_size <= 0:
        return [(0, size)]
    return [(s, min(s + part_size, size)) for s in range(0, max(size, 1), part_size)]


def parts_of(sizes: list[int]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for n in sizes:
        out.append((pos, pos + n))
        pos += n
    return out


def candidate_part_sizes(size: int, parts: int) -> list[int]:
    """Part sizes that give an object of ``size`` bytes exactly ``parts`` parts
    (ceil(size / p) == parts), the likeliest first: the common sizes, s3transfer's doubling
    of 8 MiB, then any other whole MiB in range when the range holds few. One part: the size
    does not matter (the ETag is MD5(MD5(all))-1)."""
    if parts <= 0 or size <= 0:
        return []
    if parts == 1:
        return [size]
    lo = -(-size // parts)  # p * parts >= size
    hi = -(-size // (parts - 1)) - 1  # p * (parts - 1) < size
    if lo > hi:
        return []
    doubling = [(8 * MiB) << k for k in range(1, 10)]
    out = [p for p in (*COMMON_PART_SIZES, *doubling) if lo <= p <= hi]
    whole = range(-(-lo // MiB) * MiB, hi + 1, MiB)
    if len(whole) <= 4:
        out += [p for p in whole if p not in out]
    seen: list[int] = []
    for p in out:
        if p not in seen:
            seen.append(p)
    return seen[:MAX_PART_SIZE_TRIES]


def hash_file(fd: int, size: int, bounds: list[tuple[int, int]] | None, part_algos: tuple[str, ...],
              whole_algos: tuple[str, ...]) -> tuple[list[dict[str, bytes]], dict[str, bytes]]:
    """In a worker thread, one pass over the first ``size`` bytes of ``fd``: for each part of
    ``bounds`` its digests of ``part_algos``, and the whole's digests of ``whole_algos``.
    Algorithms this installation cannot compute are left out of the answer."""
    parts: list[dict[str, bytes]] = []
    whole = {a: d for a in whole_algos if (d := new_digest(a)) is not None}
    bounds = bounds or []
    i = 0
    cur: dict[str, Any] | None = None  # the current part's digests
    pos = 0
    while pos < size:
        n = min(PIECE, size - pos)
        if i < len(bounds):
            n = min(n, bounds[i][1] - pos)
        chunk = os.pread(fd, n, pos)
        if len(chunk) != n:
            raise OSError(f"cache file is shorter than the object ({pos + len(chunk)} of {size} bytes)")
        for d in whole.values():
            d.update(chunk)
        pos += n
        if i < len(bounds):
            if cur is None:
                cur = {a: d for a in part_algos if (d := new_digest(a)) is not None}
            for d in cur.values():
                d.update(chunk)
            if pos >= bounds[i][1]:
                parts.append({a: d.digest() for a, d in cur.items()})
                cur, i = None, i + 1
    return parts, {a: d.digest() for a, d in whole.items()}
