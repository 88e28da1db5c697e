"""Every S3 call. The only module that imports boto3.

boto3 is synchronous, so each call runs in a worker thread (``trio.to_thread.run_sync``) behind a
``CapacityLimiter``: one for metadata calls and one for data transfers, so a large read cannot
starve ``ls``. Errors are classified here, once: unreachable / not found / changed / denied /
throttled / other, as the domain exceptions of ``errors.py``. Retries with exponential backoff and
full jitter live here too; the callers never retry.

Threads only get bucket/key strings, file descriptors and bytes, and hand back values; they never
touch the mount's tables. Progress during a download is reported through ``progress(offset)``,
which the caller makes safe to call from a thread.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import random
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import boto3
import botocore.exceptions as bexc
import trio
from botocore.config import Config
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from .errors import (ChecksumMismatch, Changed, Denied, MountError, NotFound, S3StashError,
                     StoreError, Throttled, Unreachable)

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes read from a response body between progress reports
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_CHANGED = {"412", "PreconditionFailed"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "ExpiredToken", "InvalidToken"}
_RETRY = {"500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
          "RequestTimeout", "Throttling", "ThrottlingException"}


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """What S3 says about one object version."""

    etag: str  # without quotes
    size: int
    last_modified_ns: int
    mtime_ns: int  # x-amz-meta-mtime when present (the s3fs convention), else LastModified
    metadata: tuple[tuple[str, str], ...] = ()  # x-amz-meta-* (only known after a HEAD)
    from_head: bool = False


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


def _ns(dt) -> int:
    return int(dt.timestamp() * 1_000_000_000) if dt is not None else 0


def _classify(e: BaseException, what: str) -> S3StashError:
    """Turn a boto3/botocore/socket exception into a domain error."""
    if isinstance(e, S3StashError):
        return e
    if isinstance(e, bexc.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
        for names, cls in ((_NOT_FOUND, NotFound), (_CHANGED, Changed), (_DENIED, Denied),
                           (_RETRY, Throttled)):
            if code in names or status in names:
                return cls(msg)
        if code == "304" or status == "304":
            return Changed(msg)
        return StoreError(msg)
    if isinstance(e, bexc.NoCredentialsError):
        return Denied(f"{what}: no AWS credentials found")
    if isinstance(e, bexc.FlexibleChecksumError):
        return ChecksumMismatch(f"{what}: {e}")
    if isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError, bexc.ResponseStreamingError,
                      ConnectionError, TimeoutError)):
        return Unreachable(f"{what}: {type(e).__name__}: {e}")
    if isinstance(e, bexc.BotoCoreError):
        return StoreError(f"{what}: {e}")
    if isinstance(e, OSError):  # writing the cache file failed (ENOSPC, EIO): not S3's fault
        raise e
    return StoreError(f"{what}: {type(e).__name__}: {e}")


class Store:
    """One boto3 client shared by all worker threads (clients are thread-safe)."""

    def __init__(self, settings, data_threads: int = 12, meta_threads: int = 8,
                 connect_timeout: float = 3.0, read_timeout: float = 20.0):
        for k, v in settings.aws_env:
            os.environ.setdefault(k, v)
        style = settings.addressing_style
        if style == "auto" and settings.endpoint_url:
            style = "path"
        config = Config(
            retries={"total_max_attempts": 1},  # we retry ourselves, with jitter, in _run
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=data_threads + meta_threads + 2,
            s3={"addressing_style": style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="s3stashfs",
        )
        try:
            session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
        except bexc.ProfileNotFound as e:
            raise MountError(f"AWS profile not found: {e}", exit_code=2) from None
        # botocore parses every LastModified of a listing with dateutil: more than half the
        # CPU of listing a large directory. S3 sends ISO 8601 there; parse that directly.
        session._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp)
        self._client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
        self._data = trio.CapacityLimiter(data_threads)
        self._meta = trio.CapacityLimiter(meta_threads)
        self.requests = 0  # calls made, for status and tests

    # ---------------------------------------------------------------- retries
    async def _run(self, what: str, limiter, fn, *args, attempts: int = 5):
        """Run ``fn`` in a worker thread; retry throttling with backoff and full jitter, and
        an unreachable endpoint twice, quickly (being offline must be noticed fast)."""
        delay = 0.1
        for attempt in range(attempts):
            try:
                self.requests += 1
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
            except (Throttled, Unreachable) as e:
                last = attempt == attempts - 1 or (isinstance(e, Unreachable) and attempt >= 2)
                if last:
                    raise
                log.debug("%s: %s; retrying", what, e)
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 3, 5.0)
        raise AssertionError("unreachable")

    def _call(self, what: str, method: str, **kwargs):
        try:
            return getattr(self._client, method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            raise _classify(e, what) from e

    # ---------------------------------------------------------------- metadata
    def _info_from_head(self, r) -> ObjectInfo:
        meta = {k.lower(): v for k, v in (r.get("Metadata") or {}).items()}
        lm = _ns(r.get("LastModified"))
        mtime = parse_meta_mtime(meta.get("mtime"))
        return ObjectInfo(etag=strip_etag(r.get("ETag", "")), size=int(r.get("ContentLength", 0)),
                          last_modified_ns=lm, mtime_ns=mtime if mtime is not None else lm,
                          metadata=tuple(sorted(meta.items())), from_head=True)

    async def head_object(self, bucket: str, key: str) -> ObjectInfo | None:
        """The object's current version, or None when there is no such key."""
        what = f"HEAD s3://{bucket}/{key}"

        def call():
            try:
                return self._info_from_head(self._call(what, "head_object", Bucket=bucket, Key=key))
            except NotFound:
                return None
        return await self._run(what, self._meta, call)

    async def head_bucket(self, bucket: str) -> bool:
        what = f"HEAD bucket {bucket}"

        def call():
            try:
                self._call(what, "head_bucket", Bucket=bucket)
                return True
            except NotFound:
                return False
        return await self._run(what, self._meta, call)

    async def list_buckets(self) -> list[str]:
        r = await self._run("ListBuckets", self._meta, lambda: self._call("ListBuckets", "list_buckets"))
        return [b["Name"] for b in r.get("Buckets", [])]

    async def list_page(self, bucket: str, prefix: str, token: str | None = None,
                        max_keys: int = 1000) -> ListPage:
        """One ListObjectsV2 page with delimiter '/'."""
        what = f"LIST s3://{bucket}/{prefix}"
        kwargs = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": max_keys}
        if token:
            kwargs["ContinuationToken"] = token

        def call():
            r = self._call(what, "list_objects_v2", **kwargs)
            objs, keys = [], []
            for o in r.get("Contents", []):
                lm = _ns(o.get("LastModified"))
                keys.append(o["Key"])
                objs.append(ObjectInfo(etag=strip_etag(o.get("ETag", "")), size=int(o.get("Size", 0)),
                                       last_modified_ns=lm, mtime_ns=lm))
            prefixes = [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            nxt = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            return ListPage(prefixes, objs, keys, nxt)
        return await self._run(what, self._meta, call)

    # ---------------------------------------------------------------- data
    async def fetch_range(self, bucket: str, key: str, etag: str, start: int, end: int, fd: int,
                          progress: Callable[[int], None]) -> None:
        """GET bytes [start, end) of the version ``etag`` into ``fd`` at the same offsets.

        ``progress(offset)`` is called from the worker thread after each piece is written.
        If-Match pins the version: a changed object raises Changed, never mixes bytes."""
        what = f"GET s3://{bucket}/{key} bytes={start}-{end - 1}"

        def call():
            r = self._call(what, "get_object", Bucket=bucket, Key=key,
                           Range=f"bytes={start}-{end - 1}", IfMatch=f'"{etag}"')
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                raise Changed(f"{what}: ETag is now {got}")
            self._drain(what, r["Body"], fd, start, end, progress)
        await self._run(what, self._data, call)

    async def fetch_whole(self, bucket: str, key: str, etag: str, size: int,
                          fd: int | Callable[[], int], progress: Callable[[int], None]) -> int:
        """GET a whole (small) object, verify it against its ETag's MD5 (single-part uploads)
        and S3's stored checksum (when it has one) before reporting any byte as present.

        ``fd`` may be a function that opens the file, called in the worker thread once S3 has
        answered; the descriptor written to is returned."""
        what = f"GET s3://{bucket}/{key}"
        opened: list[int] = []

        def call():
            r = self._call(what, "get_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"',
                           ChecksumMode="ENABLED")
            if not opened:
                opened.append(fd() if callable(fd) else fd)
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                raise Changed(f"{what}: ETag is now {got}")
            md5 = hashlib.md5(usedforsecurity=False)
            self._drain(what, r["Body"], opened[0], 0, size, None, md5)
            kms = r.get("ServerSideEncryption") == "aws:kms" or r.get("SSECustomerAlgorithm")
            if is_md5_etag(etag) and not kms and md5.hexdigest() != etag:
                raise ChecksumMismatch(f"{what}: MD5 {md5.hexdigest()} does not match ETag {etag}")
            progress(size)
        try:
            await self._run(what, self._data, call)
        except BaseException:
            if opened and callable(fd):
                os.close(opened[0])
            raise
        return opened[0]

    def _drain(self, what, body, fd, start, end, progress, digest=None):
        pos = start
        try:
            while True:
                chunk = body.read(PIECE)
                if not chunk:
                    break
                if pos + len(chunk) > end:
                    raise Changed(f"{what}: more bytes than expected")
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, pos)
                    pos += n
                    view = view[n:]
                if digest is not None:
                    digest.update(chunk)
                if progress is not None:
                    progress(pos)
        except S3StashError:
            raise
        except OSError as e:
            if isinstance(e, (ConnectionError, TimeoutError)):
                raise Unreachable(f"{what}: {e}") from e
            raise
        except Exception as e:  # noqa: BLE001
            raise _classify(e, what) from e
        finally:
            body.close()
        if pos != end:
            raise Changed(f"{what}: got {pos - start} bytes, expected {end - start}")

    # ---------------------------------------------------------------- start-up
    def check_access(self, bucket: str | None, buckets: tuple[str, ...]) -> None:
        """Fail mounting early, with one clear line, when S3 will not serve us."""
        targets = [bucket] if bucket else list(buckets)
        try:
            if targets:
                for b in targets:
                    try:
                        self._call(f"bucket {b}", "head_bucket", Bucket=b)
                    except NotFound:
                        raise MountError(f"bucket not found: {b}") from None
            else:
                self._call("ListBuckets", "list_buckets")
        except Denied as e:
            raise MountError(f"S3 refused access ({e}); check the credentials, profile and bucket") from None
        except Unreachable as e:
            raise MountError(f"cannot reach S3: {e}") from None
        except S3StashError as e:
            raise MountError(f"S3 error at mount: {e}") from None
