"""Every S3 call. The only module that imports boto3.

boto3 is synchronous, so each call runs in a worker thread (``trio.to_thread.run_sync``) behind a
``CapacityLimiter``: one for metadata calls and one for data transfers, so a large read cannot
starve ``ls``. Errors are classified here, once: unreachable (no answer at all) / interrupted (an
answer that broke off) / not found / changed / denied / throttled / other, as the domain
exceptions of ``errors.py``. Retries with exponential backoff and full jitter live here too; the
callers never retry. While offline, a call probes S3 on demand before failing (``recheck``).

Threads only get bucket/key strings, file descriptors and bytes, and hand back values; they never
touch the mount's tables. Progress during a download is reported through ``progress(offset)``,
which the caller makes safe to call from a thread.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import http.client
import logging
import os
import random
import re
import socket
import time
import urllib.parse
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

import boto3
import botocore.exceptions as bexc
import botocore.httpsession
import trio
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from . import checksums, crashpoints
from .connectivity import Connectivity
from .errors import (ChecksumMismatch, Changed, Conflict, Denied, Interrupted, MountError,
                     NotFound, S3StashError, StoreError, Throttled, Unreachable, first_error)

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes read from a response body between progress reports
COPY_MAX = 5 << 30  # the largest object CopyObject copies in one request
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_CHANGED = {"412", "PreconditionFailed"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "ExpiredToken", "InvalidToken"}
_RETRY = {"429", "500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
          "RequestTimeout", "Throttling", "ThrottlingException", "ThrottledException",
          "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
          "BandwidthLimitExceeded", "RequestThrottled"}
# a plain OSError (not a ConnectionError) that still means "no way to S3"
_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}


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


def _conditions(base: str | None) -> dict[str, str]:
    """The condition a change based on version ``base`` is sent with: If-Match that ETag,
    If-None-Match: * for a new file (''), nothing when the base is unknown (None)."""
    if base is None:
        return {}
    return {"IfMatch": f'"{base}"'} if base else {"IfNoneMatch": "*"}


def _answered_etag(what: str, r: dict) -> str:
    """The ETag of a change S3 answered; none means the answer's head was cut short."""
    etag = strip_etag(r.get("ETag") or "")
    if not etag:
        raise Interrupted(f"{what}: S3's answer has no ETag")
    return etag


def _conditional(what: str, base: str | None, e: S3StashError) -> S3StashError:
    """A failed condition is a conflict, not a changed download: S3 moved on (412), or the
    object the change was based on is gone (404 to If-Match)."""
    if base is not None and (isinstance(e, Changed) or (base and isinstance(e, NotFound))):
        return Conflict(f"{what}: S3 no longer has the version this change was based on "
                        f"({'ETag ' + base if base else 'a new file'}): {e}")
    return e

def _failure(e: BaseException) -> str | None:
    """What kind of network failure ``e`` is: "dns", "timeout" or "broken"; None if it is no
    network failure at all (an S3 error, a bug, a local disk error)."""
    # before the timeouts: urllib3's NewConnectionError (refused, no route, and
    # NameResolutionError) subclasses its ConnectTimeoutError, yet comes at once
    if isinstance(e, (urllib3.exceptions.NameResolutionError, socket.gaierror)):
        return "dns"
    if isinstance(e, bexc.EndpointConnectionError):  # botocore's NewConnectionError / gaierror
        dns = isinstance(getattr(e, "kwargs", {}).get("error"),
                         (urllib3.exceptions.NameResolutionError, socket.gaierror))
        return "dns" if dns else "broken"
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return "broken"
    if isinstance(e, (bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                      urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (bexc.ConnectionError, bexc.HTTPClientError, bexc.IncompleteReadError,
                      urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError)):
        return "broken"
    if isinstance(e, OSError) and e.errno in _NET_ERRNOS:
        return "broken"
    return None


def _unreachable(e: BaseException, what: str) -> Unreachable | None:
    """``e``, met before any answer came (no status line), as Unreachable: refused, reset or
    closed, DNS failure, connect timeout, or a server that accepted the connection and said
    nothing within the timeout (hung). None when ``e`` is no network failure. Timeouts and DNS
    failures are not retried: their wait is spent already, or the resolver has retried."""
    kind = _failure(e)
    if kind is None:
        return None
    return Unreachable(f"{what}: {type(e).__name__}: {e}", retry=kind == "broken")


def _interrupted(e: BaseException, what: str) -> Interrupted | None:
    """``e``, met while reading a body after S3's status line came, as Interrupted: the body
    cut short, reset, or stalled past the data timeout. S3 answered, so it is reachable."""
    kind = _failure(e)
    if kind is None:
        return None
    return Interrupted(f"{what}: {type(e).__name__}: {e}", stalled=kind == "timeout")


def _classify(e: BaseException, what: str, answered: bool = False) -> S3StashError:
    """Turn a boto3/botocore/socket exception into a domain error. ``answered``: ``e`` came
    while reading a body, after the status line (a network failure is then Interrupted, not
    Unreachable)."""
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
    net = _interrupted(e, what) if answered else _unreachable(e, what)
    if net is not None:
        return net
    if isinstance(e, bexc.BotoCoreError):
        return StoreError(f"{what}: {e}")
    if isinstance(e, OSError):  # writing the cache file failed (ENOSPC, EIO): not S3's fault
        raise e
    return StoreError(f"{what}: {type(e).__name__}: {e}")


def _botocore_answered(e: BaseException) -> bool:
    """Had S3's status line come when a botocore call raised ``e``? botocore reads the whole
    answer of a call without a streaming body inside its send, and turns any failure there
    into the same errors as a failure to connect or to get an answer's head (ConnectionClosed-
    Error, ReadTimeoutError); what tells them apart is where urllib3 raised the error it wraps:
    in its HTTPResponse, reading a body, or before."""
    if isinstance(e, (bexc.ResponseStreamingError, bexc.IncompleteReadError)):
        return True
    err = (getattr(e, "kwargs", None) or {}).get("error", e)
    tb = getattr(err, "__traceback__", None)
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") == "urllib3.response":
            return True
        tb = tb.tb_next
    return False


class _Direct:
    """Signed GET and HEAD requests sent straight through urllib3, for the data path.

    botocore spends about 1 ms of CPU on each call in generic machinery (endpoint rules, event
    hooks, response parsing): more than the request itself on a fast network, and the daemon's
    one Python core is the limit when a directory of small files is read. A GET or HEAD of one
    key needs none of it: the URL is the endpoint plus the bucket and the quoted key, signed with
    SigV4 by botocore's own signer. Anything unusual (no credentials, a proxy, a redirect to
    another region) is left to botocore (``None`` is returned, or ``Fallback`` raised)."""

    class Fallback(Exception):
        pass

    def __init__(self, client, session, style: str, timeouts: Timeouts, pool_size: int):
        from urllib.request import getproxies, proxy_bypass
        self._session = session
        url = urllib.parse.urlsplit(client.meta.endpoint_url)
        self._scheme, self._host = url.scheme, url.netloc
        self._region = client.meta.region_name or "us-east-1"
        self._path_style = style == "path"
        self._slow_buckets: set[str] = set()
        self._timeouts = {"GET": urllib3.Timeout(connect=timeouts.connect, read=timeouts.data),
                          "HEAD": urllib3.Timeout(connect=timeouts.connect, read=timeouts.meta)}
        self.enabled = not (getproxies() and not proxy_bypass(url.hostname or ""))
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=pool_size, retries=False, block=False,
            timeout=self._timeouts["HEAD"],
            ca_certs=botocore.httpsession.get_cert_path(True))

    def _url(self, bucket: str, key: str) -> str | None:
        if bucket in self._slow_buckets:
            return None
        path = urllib.parse.quote(key, safe="/~")
        virtual = not self._path_style and re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket)
        if virtual:
            return f"{self._scheme}://{bucket}.{self._host}/{path}"
        return f"{self._scheme}://{self._host}/{bucket}/{path}"

    def request(self, method: str, bucket: str, key: str, headers: dict[str, str]):
        """The urllib3 response (body not read), or None when botocore must do this call."""
        url = self._url(bucket, key) if self.enabled else None
        if not url:
            return None
        creds = self._session.get_credentials()
        if creds is None:
            return None
        req = AWSRequest(method=method, url=url, headers={**headers, "User-Agent": _USER_AGENT})
        S3SigV4Auth(creds.get_frozen_credentials(), "s3", self._region).add_auth(req)
        r = self._pool.request(method, url, headers=dict(req.headers.items()),
                               preload_content=False, decode_content=False, redirect=False,
                               timeout=self._timeouts[method])
        if r.status in (301, 302, 307, 400):  # another region, or something botocore handles
            r.drain_conn()
            r.release_conn()
            self._slow_buckets.add(bucket)
            log.debug("s3://%s: answered %d to a direct request; using botocore", bucket, r.status)
            raise self.Fallback()
        return r


class _DirectBody:
    """The body of a direct response, read like botocore's StreamingBody."""

    def __init__(self, r):
        self._r = r

    def read(self, n: int) -> bytes:
        return self._r.read(n, decode_content=False)

    def close(self) -> None:
        self._r.release_conn()


def _direct_result(r, what: str) -> dict:
    """A direct response as the dict botocore would give, or the domain error its status means."""
    h = r.headers
    if r.status not in (200, 206):
        code = str(r.status)
        try:
            body = r.read(64 * 1024, decode_content=False)
            m = re.search(rb"<Code>([^<]+)</Code>", body)
            if m:
                code = m.group(1).decode()
        except Exception as e:  # noqa: BLE001 - the body broke off: the status says enough
            log.debug("%s: reading the body of a %d answer: %s", what, r.status, e)
        finally:
            r.release_conn()
        if r.status == 304:
            code = "304"
        raise _classify(bexc.ClientError({"Error": {"Code": code, "Message": ""},
                                          "ResponseMetadata": {"HTTPStatusCode": r.status}},
                                         what.split()[0]), what)
    meta = {k[len("x-amz-meta-"):].lower(): v for k, v in h.items()
            if k.lower().startswith("x-amz-meta-")}
    out = {"ETag": h.get("ETag", ""), "ContentLength": int(h.get("Content-Length", 0)),
           "ContentRange": h.get("Content-Range"),
           "Metadata": meta, "ServerSideEncryption": h.get("x-amz-server-side-encryption"),
           "SSECustomerAlgorithm": h.get("x-amz-server-side-encryption-customer-algorithm"),
           "Body": _DirectBody(r)}
    lm = h.get("Last-Modified")
    if lm:
        out["LastModified"] = email.utils.parsedate_to_datetime(lm)
    for algo in CHECKSUMS:
        v = h.get(f"x-amz-checksum-{algo.lower()}")
        if v:
            out[f"Checksum{algo}"] = v
    for header, name in (("x-amz-checksum-type", "ChecksumType"),
                         ("x-amz-mp-parts-count", "PartsCount")):
        if h.get(header):
            out[name] = h[header]
    return out


def _check_range(what: str, r: dict, start: int, end: int) -> None:
    """The answer to a ranged GET must be the bytes asked for: written at their offsets, any
    others would be served as the wrong part of the file."""
    cr = r.get("ContentRange")
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", cr.strip()) if cr else None
    if m is not None and (int(m.group(1)), int(m.group(2)) + 1) == (start, end):
        return
    if cr is None and start == 0 and r.get("ContentLength") == end:
        return  # the whole object, which is the range asked for
    r["Body"].close()
    raise StoreError(f"{what}: S3 answered {cr or 'the whole object'} "
                     f"({r.get('ContentLength')} bytes) to a GET of bytes={start}-{end - 1}")


CHECKSUMS = checksums.ALGOS
_USER_AGENT = f"s3stashfs (direct; urllib3/{urllib3.__version__})"


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


class Store:
    """boto3 clients shared by all worker threads (clients are thread-safe), one for each kind
    of call because a client has one read timeout (see ``Timeouts``): ``meta``, ``data`` (GETs
    that the direct path leaves to botocore) and ``write``; and a direct path for GET and HEAD
    of keys (see ``_Direct``)."""

    def __init__(self, settings, data_threads: int = 12, meta_threads: int = 8):
        for k, v in settings.aws_env:
            os.environ.setdefault(k, v)
        style = settings.addressing_style
        if style == "auto" and settings.endpoint_url:
            style = "path"
        self.timeouts = Timeouts.scaled(settings.timeout)
        config = Config(
            retries={"total_max_attempts": 1},  # we retry ourselves, with jitter, in _run
            connect_timeout=self.timeouts.connect,
            read_timeout=self.timeouts.meta,
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
        self._clients = {kind: session.client(
            "s3", endpoint_url=settings.endpoint_url,
            config=config.merge(Config(read_timeout=getattr(self.timeouts, kind))))
            for kind in ("meta", "data", "write")}
        self._direct = _Direct(self._clients["meta"], session, style, self.timeouts,
                               data_threads + meta_threads + 2)
        self.connectivity = Connectivity()
        self._data = trio.CapacityLimiter(data_threads)
        self._meta = trio.CapacityLimiter(meta_threads)
        # on-demand probes: their threads are abandoned after the connect timeout and end by
        # the metadata one, so at most two linger, and metadata calls never wait for them
        self._probes = trio.CapacityLimiter(2)
        self.probe_bucket = settings.bucket

    # ---------------------------------------------------------------- retries
    async def _run(self, what: str, limiter, fn, *args, attempts: int = 5, probe: bool = False,
                   abandon: bool = False):
        """Run ``fn`` in a worker thread; retry what is worth retrying, with backoff and full
        jitter. The table of faults is docs/SEMANTICS.md's "Faults".

        S3 answered (Throttled: 5xx, SlowDown, 429; Interrupted: a body cut short, reset or
        stalled): up to ``attempts`` tries, then the error goes to this request alone; the
        mount stays online. A stalled body is tried twice at most, each try having waited out
        the data timeout. ``fn`` must make each try pick up where the last one got to.

        No answer (Unreachable): refused or reset connections are retried twice, quickly; a
        timeout or a DNS failure is not (``retry`` False: its wait is spent); then the mount goes
        offline. A call that finds the mount gone offline meanwhile gives up without retrying,
        and with ``abandon`` (calls that only read S3 and touch no local state: HEAD, LIST)
        stops waiting for its thread at once. While the mount is offline a call first probes
        on demand (``recheck``), and fails at once unless S3 answers it."""
        if not self.connectivity.online and not probe and not await self.recheck():
            raise self._offline(what)
        delay = 0.1
        unreachable = stalls = 0
        for attempt in range(attempts):
            try:
                if abandon and not probe:
                    return await self._until_offline(what, limiter, fn, args)
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter,
                                                     abandon_on_cancel=probe)
            except (Throttled, Interrupted, Unreachable) as e:
                if isinstance(e, Unreachable) and not probe:
                    if not self.connectivity.online:
                        raise  # another call found S3 unreachable: no more waiting
                    unreachable += 1
                    if not e.retry or unreachable >= 3:
                        self.connectivity.unreachable(str(e))
                        raise
                if isinstance(e, Interrupted) and e.stalled:
                    stalls += 1
                    if stalls >= 2:
                        raise
                if attempt == attempts - 1:
                    raise
                log.debug("%s: %s; retrying", what, e)
                await trio.sleep(random.uniform(0, delay))
                delay = min(delay * 3, 5.0)
                if not self.connectivity.online and not probe:
                    raise self._offline(what) from e
        raise AssertionError("unreachable")

    async def recheck(self) -> bool:
        """Offline, and a request needs S3: probe now rather than wait for the background probe
        (bounded by the connect timeout; shared; see ``Connectivity.recheck``). True when
        online."""
        return await self.connectivity.recheck(
            lambda: self.probe(self.probe_bucket, self._probes), self.timeouts.connect)

    def _offline(self, what: str) -> Unreachable:
        since = time.strftime("%H:%M:%S", time.localtime(self.connectivity.since))
        return Unreachable(f"{what}: S3 is unreachable (offline since {since})")

    async def _until_offline(self, what: str, limiter, fn, args):
        """``fn`` in a worker thread, abandoned once the mount goes offline (the thread then
        ends by its own timeout; its result is dropped, and it touches nothing of ours)."""
        cs = trio.CancelScope()
        self.connectivity.waiting.add(cs)
        try:
            with cs:
                return await trio.to_thread.run_sync(fn, *args, limiter=limiter,
                                                     abandon_on_cancel=True)
        finally:
            self.connectivity.waiting.discard(cs)
        raise self._offline(what)

    def _object_call(self, what: str, method: str, bucket: str, key: str,
                     headers: dict[str, str], **kwargs) -> dict:
        """GET or HEAD of one key: the direct path when it can, botocore otherwise. ``headers``
        (direct) and ``kwargs`` (botocore) say the same thing in each one's words."""
        try:
            r = self._direct.request("GET" if method == "get_object" else "HEAD", bucket, key, headers)
        except _Direct.Fallback:
            r = None
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            raise _classify(e, what) from e
        if r is None:
            kind = "data" if method == "get_object" else "meta"
            return self._call(what, method, kind=kind, Bucket=bucket, Key=key, **kwargs)
        if method == "head_object":
            try:
                return _direct_result(r, what)
            finally:
                r.release_conn()
        return _direct_result(r, what)

    def _call(self, what: str, method: str, kind: str = "meta", **kwargs):
        """One botocore call on the client of its ``kind`` ("meta", "data", "write"; see
        ``Timeouts``)."""
        try:
            return getattr(self._clients[kind], method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            raise _classify(e, what, answered=_botocore_answered(e)) from e

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
                return self._info_from_head(self._object_call(what, "head_object", bucket, key, {}))
            except NotFound:
                return None
        return await self._run(what, self._meta, call, abandon=True)

    async def head_bucket(self, bucket: str) -> bool:
        what = f"HEAD bucket {bucket}"

        def call():
            try:
                self._call(what, "head_bucket", Bucket=bucket)
                return True
            except NotFound:
                return False
        return await self._run(what, self._meta, call, abandon=True)

    async def probe(self, bucket: str | None, limiter: trio.CapacityLimiter | None = None) -> bool:
        """Does S3 answer? (One request, no retries: the connectivity probe; its thread is
        abandoned if the caller stops waiting.)"""
        def call():
            if bucket:
                try:
                    self._call("probe", "head_bucket", Bucket=bucket)
                except (NotFound, Denied):
                    pass  # it answered
            else:
                self._call("probe", "list_buckets")
        try:
            await self._run("probe", limiter or self._meta, call, attempts=1, probe=True)
            return True
        except Unreachable:
            return False
        except S3StashError:
            return True

    async def list_buckets(self) -> list[str]:
        r = await self._run("ListBuckets", self._meta,
                            lambda: self._call("ListBuckets", "list_buckets"), abandon=True)
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
        return await self._run(what, self._meta, call, abandon=True)

    # ---------------------------------------------------------------- data
    async def fetch_range(self, bucket: str, key: str, etag: str, start: int, end: int, fd: int,
                          progress: Callable[[int], None]) -> None:
        """GET bytes [start, end) of the version ``etag`` into ``fd`` at the same offsets.

        ``progress(offset)`` is called from the worker thread after each piece is written.
        If-Match pins the version: a changed object raises Changed, never mixes bytes. A try
        that broke off is picked up where it got to: what was written and reported stays."""
        what = f"GET s3://{bucket}/{key} bytes={start}-{end - 1}"
        reached = [start]  # the end of what has been written (and reported), across tries

        def call():
            at = reached[0]
            want = f"bytes={at}-{end - 1}"
            r = self._object_call(what, "get_object", bucket, key,
                                  {"Range": want, "If-Match": f'"{etag}"'},
                                  Range=want, IfMatch=f'"{etag}"')
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                r["Body"].close()
                raise Changed(f"{what}: ETag is now {got}")
            _check_range(what, r, at, end)
            self._drain(what, r["Body"], fd, at, end, progress, reached=reached)
        await self._run(what, self._data, call)

    async def fetch_whole(self, bucket: str, key: str, etag: str, size: int,
                          fd: int | Callable[[], int], progress: Callable[[int], None],
                          checked: list[str] | None = None) -> int:
        """GET a whole (small) object, verify it against its ETag's MD5 (single-part uploads)
        and S3's stored checksum (when it has one) before reporting any byte as present; a try
        that broke off starts again from the first byte.

        ``fd`` may be a function that opens the file, called in the worker thread once S3 has
        answered; the descriptor written to is returned. ``checked`` gets the names of the
        checks that passed ("md5", "crc64nvme", ...)."""
        what = f"GET s3://{bucket}/{key}"
        opened: list[int] = []

        def call():
            r = self._object_call(what, "get_object", bucket, key,
                                  {"If-Match": f'"{etag}"', "x-amz-checksum-mode": "ENABLED"},
                                  IfMatch=f'"{etag}"', ChecksumMode="ENABLED")
            if not opened:
                opened.append(fd() if callable(fd) else fd)
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                r["Body"].close()
                raise Changed(f"{what}: ETag is now {got}")
            md5 = hashlib.md5(usedforsecurity=False)
            checks = _checksum_digests(r)
            self._drain(what, r["Body"], opened[0], 0, size, None, md5, [d for _, _, d in checks])
            kms = r.get("ServerSideEncryption") == "aws:kms" or r.get("SSECustomerAlgorithm")
            if is_md5_etag(etag) and not kms and md5.hexdigest() != etag:
                raise ChecksumMismatch(f"{what}: MD5 {md5.hexdigest()} does not match ETag {etag}")
            for algo, expected, digest in checks:
                if base64.b64encode(digest.digest()).decode() != expected:
                    raise ChecksumMismatch(f"{what}: {algo} does not match S3's {expected}")
            if checked is not None:
                checked[:] = ((["md5"] if is_md5_etag(etag) and not kms else [])
                              + [algo.lower() for algo, _, _ in checks])
            progress(size)
        try:
            await self._run(what, self._data, call)
        except BaseException:
            if opened and callable(fd):
                os.close(opened[0])
            raise
        return opened[0]

    async def object_parts(self, bucket: str, key: str, etag: str, size: int) -> PartsInfo:
        """What S3 says about the parts and sums of version ``etag`` of an object of ``size``
        bytes, in as few calls as the server allows: GetObjectAttributes (every part's size and
        sum in one call, where the server has them), else HEAD ?partNumber=1 (part 1's size and
        the parts count); and the object's own checksum with its type (from the attributes, or a
        HEAD with checksum mode). Changed when S3 has another version now."""
        what = f"parts of s3://{bucket}/{key}"
        nparts = checksums.etag_parts(etag)

        def call():
            info: dict = {"etag": etag, "parts": nparts}
            if nparts is not None:
                self._parts_from_attributes(what, bucket, key, etag, info)
                if info.get("sizes") is None:
                    length, sse = self.head_part(what, bucket, key, etag, 1, nparts)
                    info["encrypted"] = sse
                    if length and -(-size // length) == nparts:
                        info["part_size"] = length
            if info.get("checksum") is None or "encrypted" not in info:
                r = self._call(what, "head_object", Bucket=bucket, Key=key, IfMatch=f'"{etag}"',
                               ChecksumMode="ENABLED")
                info["encrypted"] = _encrypted(r)
                if info.get("checksum") is None:
                    for algo in CHECKSUMS:
                        if r.get(f"Checksum{algo}"):
                            value, n = checksums.split_composite(r[f"Checksum{algo}"])
                            info["checksum"] = (algo, value)
                            info["checksum_type"] = ("COMPOSITE" if n is not None else
                                                     r.get("ChecksumType") or
                                                     (None if nparts else "FULL_OBJECT"))
                            break
            return PartsInfo(**info)
        return await self._run(what, self._meta, call)

    def _parts_from_attributes(self, what: str, bucket: str, key: str, etag: str,
                               info: dict) -> None:
        """GetObjectAttributes into ``info``: sizes and sums of every part, the checksum. A
        server without it (or a policy without s3:GetObjectAttributes) leaves ``info`` alone."""
        sizes: list[int] = []
        sums: dict[str, list[str]] = {}
        marker = 0
        for _ in range(10):  # 1,000 parts a page; S3 allows 10,000 parts
            try:
                r = self._call(what, "get_object_attributes", Bucket=bucket, Key=key,
                               ObjectAttributes=["ETag", "Checksum", "ObjectParts", "ObjectSize"],
                               MaxParts=1000, PartNumberMarker=marker)
            except (StoreError, Denied) as e:
                log.debug("%s: no GetObjectAttributes (%s): asking with HEAD", what, e)
                return
            got = strip_etag(r.get("ETag", etag))
            if got != etag:
                raise Changed(f"{what}: ETag is now {got}")
            c = r.get("Checksum") or {}
            for algo in CHECKSUMS:
                if c.get(f"Checksum{algo}") and info.get("checksum") is None:
                    value, n = checksums.split_composite(c[f"Checksum{algo}"])
                    info["checksum"] = (algo, value)
                    info["checksum_type"] = "COMPOSITE" if n is not None else c.get("ChecksumType")
            op = r.get("ObjectParts") or {}
            for part in op.get("Parts") or []:
                sizes.append(int(part.get("Size", -1)))
                for algo in CHECKSUMS:
                    if part.get(f"Checksum{algo}"):
                        sums.setdefault(algo, []).append(part[f"Checksum{algo}"])
            if not op.get("IsTruncated") or not op.get("NextPartNumberMarker"):
                break
            marker = int(op["NextPartNumberMarker"])
        if sizes and len(sizes) == info["parts"] and min(sizes) >= 0:
            info["sizes"] = tuple(sizes)
            for algo, values in sums.items():
                if len(values) == len(sizes):
                    info["part_sums"] = (algo, tuple(values))
                    break

    async def part_size(self, bucket: str, key: str, etag: str, n: int) -> int | None:
        """The size of part ``n`` of multipart version ``etag`` (None: the server does not say)."""
        what = f"parts of s3://{bucket}/{key}"
        size, _ = await self._run(what, self._meta, self.head_part, what, bucket, key, etag, n,
                                  checksums.etag_parts(etag))
        return size

    def head_part(self, what: str, bucket: str, key: str, etag: str, n: int,
                  nparts: int) -> tuple[int | None, bool]:
        """In a worker thread: (size of part ``n``, encrypted) from HEAD ?partNumber=n; size None
        when the server does not say. moto answers with the part's own ETag (real S3 and
        SeaweedFS with the object's), so If-Match cannot be sent: a multipart ETag other than
        ours, or another parts count, means the object changed."""
        r = self._call(what, "head_object", Bucket=bucket, Key=key, PartNumber=n)
        got = strip_etag(r.get("ETag", etag))
        count = r.get("PartsCount")
        if (got != etag and not is_md5_etag(got)) or (count is not None and int(count) != nparts):
            raise Changed(f"{what}: ETag is now {got} ({count} parts)")
        length = r.get("ContentLength")
        return (int(length) if count is not None and length is not None else None), _encrypted(r)

    def _drain(self, what, body, fd, start, end, progress, digest=None, more_digests=(),
               reached: list[int] | None = None):
        """Write the body into ``fd`` from ``start``; it must be exactly ``end - start`` bytes.
        ``reached[0]`` follows the end of what is written. Failures of the network here come
        after S3's status line: Interrupted, never Unreachable."""
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
                    if reached is not None:
                        reached[0] = pos
                if digest is not None:
                    digest.update(chunk)
                for d in more_digests:
                    d.update(chunk)
                if progress is not None:
                    progress(pos)
        except S3StashError:
            raise
        except Exception as e:  # noqa: BLE001 - classified, or the cache's own disk error
            net = _interrupted(e, what)
            if net is not None:
                raise net from e
            if isinstance(e, OSError):
                raise  # writing the cache file failed (ENOSPC, EIO): not S3's fault
            raise _classify(e, what, answered=True) from e
        finally:
            body.close()
        if pos != end:
            raise Interrupted(f"{what}: the body ended after {pos - start} bytes of {end - start}")

    # ---------------------------------------------------------------- changes
    async def put_file(self, bucket: str, key: str, fd: int, size: int,
                       metadata: dict[str, str], base: str | None = None) -> str:
        """PUT the first ``size`` bytes of ``fd`` as one object. Content-MD5 makes S3 check what
        it received, and the ETag it answers must be that MD5. Returns the new ETag.

        ``base``: the version this change was based on (see ``_conditions``); when S3 no longer
        has it, Conflict is raised and nothing is written."""
        what = f"PUT s3://{bucket}/{key}"

        def call():
            data = _pread_all(fd, 0, size)
            md5 = hashlib.md5(data, usedforsecurity=False)
            try:
                r = self._call(what, "put_object", kind="write", Bucket=bucket, Key=key, Body=data,
                               Metadata=metadata, ContentMD5=base64.b64encode(md5.digest()).decode(),
                               **_conditions(base))
            except S3StashError as e:
                e = _conditional(what, base, e)
                if isinstance(e, Conflict) and self._holds(what, bucket, key, md5.hexdigest(),
                                                           metadata):
                    return md5.hexdigest()
                raise e from None
            etag = _answered_etag(what, r)
            if is_md5_etag(etag) and etag != md5.hexdigest():
                raise ChecksumMismatch(f"{what}: S3 stored MD5 {etag}, we sent {md5.hexdigest()}")
            return etag
        return await self._run(what, self._data, call)

    def _holds(self, what: str, bucket: str, key: str, etag: str,
               metadata: dict[str, str] | None) -> bool:
        """Does S3 now hold exactly this version (ETag, and the metadata when given)? A change
        whose answer was lost (reset after sending, a 500 after S3 had done it) may have been
        made: its retry then fails its own condition (412 to If-None-Match: *, or NoSuchUpload),
        which is our success, not a conflict."""
        try:
            info = self._info_from_head(self._object_call(f"{what} (check)", "head_object",
                                                          bucket, key, {}))
        except NotFound:
            return False
        mine = info.etag == etag and (
            metadata is None or dict(info.metadata) == {k.lower(): v for k, v in metadata.items()})
        if mine:
            log.info("%s: S3 already holds this version (ETag %s): an earlier try's answer was "
                     "lost", what, etag)
        return mine

    async def multipart_upload(self, bucket: str, key: str, fd: int, size: int, part_size: int,
                               metadata: dict[str, str], base: str | None = None) -> str:
        """Upload ``fd`` in parts sent in parallel, each with its Content-MD5; the ETag S3 gives
        the whole must be the one its parts' MD5s make. Aborted on any failure."""
        upload_id = await self.start_multipart(bucket, key, metadata)
        crashpoints.hit("upload.multipart_created")
        starts = list(range(0, size, part_size)) or [0]
        parts: list[tuple[bytes, str]] = [(b"", "")] * len(starts)

        async def part(i: int, start: int) -> None:
            parts[i] = await self.upload_part(bucket, key, upload_id, i + 1, fd, start,
                                              min(part_size, size - start))
        try:
            await run_all(part, starts)
            return await self.complete_multipart(bucket, key, upload_id, parts, base)
        except BaseException:
            await self.abort_multipart(bucket, key, upload_id)
            raise

    async def start_multipart(self, bucket: str, key: str, metadata: dict[str, str]) -> str:
        what = f"multipart upload of s3://{bucket}/{key}"
        r = await self._run(what, self._meta, lambda: self._call(
            what, "create_multipart_upload", Bucket=bucket, Key=key, Metadata=metadata))
        return r["UploadId"]

    async def upload_part(self, bucket: str, key: str, upload_id: str, n: int, fd: int,
                          start: int, length: int) -> tuple[bytes, str]:
        """Part ``n`` = ``length`` bytes of ``fd`` at ``start``, with its Content-MD5; returns
        (MD5 digest, ETag), the ETag checked to be that MD5."""
        what = f"multipart upload of s3://{bucket}/{key}, part {n}"

        def call():
            data = _pread_all(fd, start, length)
            md5 = hashlib.md5(data, usedforsecurity=False)
            rr = self._call(what, "upload_part", kind="write", Bucket=bucket, Key=key,
                            UploadId=upload_id, PartNumber=n, Body=data,
                            ContentMD5=base64.b64encode(md5.digest()).decode())
            crashpoints.hit("upload.part_sent")  # in the worker thread, S3 has the part
            etag = _answered_etag(what, rr)
            if etag != md5.hexdigest():
                raise ChecksumMismatch(f"{what}: S3 stored MD5 {etag}")
            return md5.digest(), etag
        return await self._run(what, self._data, call)

    async def complete_multipart(self, bucket: str, key: str, upload_id: str,
                                 parts: list[tuple[bytes, str]], base: str | None = None) -> str:
        """Join the parts; the ETag S3 gives the whole must be the one the parts' MD5s make.

        ``base`` as for ``put_file``, sent with the completion. An If-Match is also checked with
        a HEAD first: not every S3-compatible server honours it on completion (moto does not),
        and a completed upload cannot be taken back."""
        what = f"multipart upload of s3://{bucket}/{key}"
        listed = [{"ETag": f'"{e}"', "PartNumber": i + 1} for i, (_, e) in enumerate(parts)]
        joined = hashlib.md5(b"".join(d for d, _ in parts), usedforsecurity=False).hexdigest()
        expected = f"{joined}-{len(parts)}"
        if base:
            head = await self.head_object(bucket, key)
            if head is not None and head.etag == expected:
                # an earlier completion of these very parts went through, its answer lost
                log.info("%s: S3 already holds this version (ETag %s)", what, expected)
                await self.abort_multipart(bucket, key, upload_id)
                return expected
            if head is None or head.etag != base:
                raise Conflict(f"{what}: S3 no longer has the version this change was based on "
                               f"(ETag {base}; now {head.etag if head else 'no object'})")

        def call():
            try:
                r = self._call(what, "complete_multipart_upload", kind="write",
                               Bucket=bucket, Key=key,
                               UploadId=upload_id, MultipartUpload={"Parts": listed},
                               **_conditions(base))
            except S3StashError as e:
                e = _conditional(what, base, e)
                # NoSuchUpload: an earlier try completed it (or it was aborted: then not ours)
                if isinstance(e, (Conflict, NotFound)) and self._holds(what, bucket, key,
                                                                       expected, None):
                    return {"ETag": expected, "refused": isinstance(e, Conflict)}
                raise e from None
            return {"ETag": _answered_etag(what, r)}
        crashpoints.hit("upload.before_complete")
        r = await self._run(what, self._meta, call)
        crashpoints.hit("upload.completed")
        if r.get("refused"):  # an earlier upload of the same parts is in S3; not this one
            await self.abort_multipart(bucket, key, upload_id)
        etag = strip_etag(r.get("ETag", ""))
        if etag != expected:
            raise ChecksumMismatch(f"{what}: S3 made ETag {etag}, the parts make {expected}")
        return etag

    async def replace_metadata(self, bucket: str, key: str, etag: str,
                               metadata: dict[str, str]) -> str:
        """Change an object's metadata in place (CopyObject onto itself, REPLACE), only if it is
        still version ``etag``; the content is not uploaded again. Returns the new ETag."""
        what = f"COPY s3://{bucket}/{key} (metadata)"
        r = await self._run(what, self._meta, lambda: self._call(
            what, "copy_object", kind="write", Bucket=bucket, Key=key,
            CopySource={"Bucket": bucket, "Key": key},
            CopySourceIfMatch=f'"{etag}"', MetadataDirective="REPLACE", Metadata=metadata))
        return strip_etag(r.get("CopyObjectResult", {}).get("ETag", ""))

    async def copy(self, bucket: str, src: str, dst: str, etag: str, size: int,
                   part_size: int) -> str:
        """Server-side copy of version ``etag`` of ``src`` to ``dst`` (metadata kept); in parts
        above 5 GiB, CopyObject's limit. Returns the new object's ETag."""
        what = f"COPY s3://{bucket}/{src} to {dst}"
        source = {"Bucket": bucket, "Key": src}
        if size <= COPY_MAX:
            r = await self._run(what, self._meta, lambda: self._call(
                what, "copy_object", kind="write", Bucket=bucket, Key=dst, CopySource=source,
                CopySourceIfMatch=f'"{etag}"', MetadataDirective="COPY"))
            return strip_etag(r.get("CopyObjectResult", {}).get("ETag", ""))
        head = await self._run(what, self._meta, lambda: self._call(
            what, "head_object", Bucket=bucket, Key=src, IfMatch=f'"{etag}"'))
        r = await self._run(what, self._meta, lambda: self._call(
            what, "create_multipart_upload", Bucket=bucket, Key=dst,
            Metadata=head.get("Metadata", {})))
        upload_id = r["UploadId"]
        starts = list(range(0, size, part_size))
        etags = [""] * len(starts)

        async def part(i: int, start: int) -> None:
            end = min(start + part_size, size) - 1
            rr = await self._run(what, self._data, lambda: self._call(
                what, "upload_part_copy", kind="write", Bucket=bucket, Key=dst, UploadId=upload_id,
                PartNumber=i + 1, CopySource=source, CopySourceIfMatch=f'"{etag}"',
                CopySourceRange=f"bytes={start}-{end}"))
            etags[i] = rr["CopyPartResult"]["ETag"]
        try:
            await run_all(part, starts)
            r = await self._run(what, self._meta, lambda: self._call(
                what, "complete_multipart_upload", kind="write", Bucket=bucket, Key=dst,
                UploadId=upload_id,
                MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1}
                                           for i, e in enumerate(etags)]}))
        except BaseException:
            await self.abort_multipart(bucket, dst, upload_id)
            raise
        return strip_etag(r.get("ETag", ""))

    async def list_all(self, bucket: str, prefix: str) -> list[tuple[str, ObjectInfo]]:
        """Every key under ``prefix``, at any depth (for renaming a directory)."""
        what = f"LIST s3://{bucket}/{prefix} (recursive)"
        out: list[tuple[str, ObjectInfo]] = []
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            r = await self._run(what, self._meta, lambda kw=kwargs: self._call(
                what, "list_objects_v2", **kw), abandon=True)
            for o in r.get("Contents", []):
                out.append((o["Key"], ObjectInfo(etag=strip_etag(o.get("ETag", "")),
                                                 size=int(o.get("Size", 0)), last_modified_ns=0,
                                                 mtime_ns=0)))
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            if token is None:
                return out

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        """Best effort, even while being cancelled: no parts left behind to be billed."""
        what = f"abort multipart upload of s3://{bucket}/{key}"
        with trio.CancelScope(shield=True):
            try:
                await self._run(what, self._meta, lambda: self._call(
                    what, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id),
                    attempts=1)
            except Exception as e:  # noqa: BLE001 - best effort
                log.warning("%s: could not abort: %s", what, e)

    async def put_marker(self, bucket: str, key: str, only_new: bool = False) -> None:
        """A directory marker; with ``only_new``, an existing object of that key is left alone
        (If-None-Match: *) and that counts as done."""
        what = f"PUT s3://{bucket}/{key}"

        def call():
            try:
                self._call(what, "put_object", Bucket=bucket, Key=key, Body=b"",
                           **_conditions("" if only_new else None))
            except Changed:
                if not only_new:
                    raise
        await self._run(what, self._meta, call)

    async def delete_object(self, bucket: str, key: str, base: str | None = None) -> None:
        """Delete ``key``; with ``base``, only if it is still that version (If-Match), else
        Conflict. A key already gone counts as deleted."""
        what = f"DELETE s3://{bucket}/{key}"

        def call():
            try:
                self._call(what, "delete_object", Bucket=bucket, Key=key,
                           **({"IfMatch": f'"{base}"'} if base else {}))
            except NotFound:
                pass
            except Changed as e:
                raise _conditional(what, base, e) from None
        await self._run(what, self._meta, call)

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
            err = MountError(f"cannot reach S3: {e}")
            err.unreachable = True
            raise err from None
        except S3StashError as e:
            raise MountError(f"S3 error at mount: {e}") from None
