"""The direct GET/HEAD data path: signed (or unsigned) requests straight through urllib3."""
from __future__ import annotations

import email.utils
import logging
import re
import threading
import urllib.parse
from collections.abc import Callable

import botocore.exceptions as bexc
import botocore.httpsession
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.utils import get_environ_proxies

from ..errors import Denied, StoreError
from .classify import _classify
from .credentials import TOKEN_CODES
from .routes import Route, Routes, region_in_answer
from .types import CHECKSUMS, Timeouts

log = logging.getLogger(__name__)

class _Direct:
    """Signed GET and HEAD requests sent straight through urllib3, for the data path.

    botocore spends about 1 ms of CPU on each call in generic machinery (endpoint rules, event
    hooks, response parsing): more than the request itself on a fast network, and the daemon's
    one Python core is the limit when a directory of small files is read. A GET or HEAD of one
    key needs none of it: the URL is the bucket's route (``routes``: its region's host, or the
    endpoint, plus the quoted key), signed with SigV4 for the bucket's region by botocore's own
    signer, or not signed at all for public buckets (--no-sign-request). Connections are made as
    botocore's URLLib3Session makes them: the same CA bundle (or none checked), and the proxy of
    HTTPS_PROXY / HTTP_PROXY unless NO_PROXY names the host. A redirect naming the bucket's
    region moves the bucket there and is tried once more; anything else unusual (no credentials,
    a redirect without a region) is left to botocore
    (``None`` is returned, or ``Fallback`` raised)."""

    class Fallback(Exception):
        pass

    def __init__(self, session, routes: Routes, find_route: Callable[[str], Route],
                 timeouts: Timeouts, pool_size: int, verify: bool | str | None,
                 unsigned: bool = False, requester_pays: bool = False):
        self._session = session
        self._routes = routes
        self._find_route = find_route  # a HeadBucket, the first time a bucket is met
        self._unsigned = unsigned  # --no-sign-request: sent as they are, no credentials
        # the session's one credentials object, which the clients refresh too; asked for once
        # (with none found, asking again per request would run the whole chain every time)
        self._creds = None if unsigned else session.get_credentials()
        # --requester-pays: the header S3 wants, signed like the others (x-amz-* always are)
        self._extra = {"User-Agent": _USER_AGENT}
        if requester_pays:
            self._extra["x-amz-request-payer"] = "requester"
        self._slow_buckets: set[str] = set()
        self._timeouts = {"GET": urllib3.Timeout(connect=timeouts.connect, read=timeouts.data),
                          "HEAD": urllib3.Timeout(connect=timeouts.connect, read=timeouts.meta)}
        self.enabled = True
        if verify is False:
            tls: dict = {"cert_reqs": "CERT_NONE"}
        else:
            tls = {"cert_reqs": "CERT_REQUIRED",
                   "ca_certs": botocore.httpsession.get_cert_path(verify or True)}
        self._pool_kw = dict(num_pools=16, maxsize=pool_size, retries=False, block=False,
                             timeout=self._timeouts["HEAD"], **tls)
        self._pool = urllib3.PoolManager(**self._pool_kw)
        self._via: dict[str, urllib3.PoolManager] = {}  # origin -> its pool manager
        self._proxies: dict[str, urllib3.PoolManager] = {}  # proxy URL -> its ProxyManager
        self._lock = threading.Lock()

    def _manager(self, origin: str) -> urllib3.PoolManager:
        """The pool manager for requests to ``origin``: through the proxy the environment
        names for it, as botocore decides (NO_PROXY bypasses), or straight."""
        with self._lock:
            manager = self._via.get(origin)
            if manager is not None:
                return manager
            proxies = botocore.httpsession.ProxyConfiguration(get_environ_proxies(origin))
            proxy = proxies.proxy_url_for(origin)
            if proxy is None:
                manager = self._pool
            else:
                manager = self._proxies.get(proxy)
                if manager is None:
                    manager = self._proxies[proxy] = urllib3.proxy_from_url(
                        proxy, proxy_headers=proxies.proxy_headers_for(proxy), **self._pool_kw)
                log.debug("direct requests to %s go through the proxy %s", origin,
                          botocore.httpsession.mask_proxy_url(proxy))
            self._via[origin] = manager
            return manager

    def request(self, method: str, bucket: str, key: str, headers: dict[str, str]):
        """The urllib3 response (body not read), or None when botocore must do this call."""
        if not self.enabled or bucket in self._slow_buckets:
            return None
        if not self._unsigned and self._creds is None:
            return None
        route = self._routes.known.get(bucket) or self._find_route(bucket)
        path = urllib.parse.quote(key, safe="/~")
        for attempt in (0, 1):
            url = route.base + path
            token = None
            if self._unsigned:
                send = {**headers, **self._extra}
            else:
                assert self._creds is not None
                frozen = self._creds.get_frozen_credentials()  # refreshed first when near expiry
                token = frozen.token
                req = AWSRequest(method=method, url=url, headers={**headers, **self._extra})
                S3SigV4Auth(frozen, "s3", route.region).add_auth(req)
                send = dict(req.headers.items())
            manager = self._via.get(route.origin) or self._manager(route.origin)
            r = manager.request(method, url, headers=send,
                                preload_content=False, decode_content=False, redirect=False,
                                timeout=self._timeouts[method])
            if r.status not in (301, 302, 307, 400):
                return r
            body = None
            if r.status == 400 and token and not r.headers.get("x-amz-bucket-region"):
                body = _raise_if_token_refused(r, method)  # not a reason to leave the direct path
            region = _answered_region(r, method, body)
            if attempt == 0 and region is not None and region != route.region:
                route = self._routes.learn(bucket, region, f"S3 answered {r.status} to a {method}")
                continue
            if r.status != 400:  # a 400 naming no region is an error botocore will tell
                self._slow_buckets.add(bucket)
                log.debug("s3://%s: answered %d to a direct request; using botocore", bucket,
                          r.status)
            raise self.Fallback()
        raise AssertionError("unreachable")


    def knock(self, bucket: str | None) -> int:
        """An unsigned HEAD of the bucket's URL (or of the endpoint's root): its status, whatever
        it is (403 to an unsigned request is S3 answering). For the probe when no credentials
        can be had: is S3 there at all? A network failure is raised, as for any request."""
        route = (self._routes.known.get(bucket) or self._routes.default(bucket)) if bucket \
            else self._routes.default("probe")
        url = route.base if bucket else route.origin + "/"
        manager = self._via.get(route.origin) or self._manager(route.origin)
        r = manager.request("HEAD", url, headers=self._extra, preload_content=False,
                            redirect=False, timeout=self._timeouts["HEAD"])
        r.release_conn()
        return r.status

def _answered_region(r, method: str, body: bytes | None = None) -> str | None:
    """The region a redirect answer names (header, or the body of a GET's error, unless read
    already: ``body``); the connection is given back."""
    try:
        if body is None:
            body = r.read(64 * 1024, decode_content=False) if method != "HEAD" else b""
        r.drain_conn()
    except Exception as e:  # noqa: BLE001 - the body broke off: the header may still say
        log.debug("reading a %d answer: %s", r.status, e)
    finally:
        r.release_conn()
    return region_in_answer(r.headers, body or b"")


def _raise_if_token_refused(r, method: str) -> bytes:
    """A 400 that refuses the session token (a HEAD's has no body: maybe) as botocore's error;
    otherwise the body read is returned, and ``r`` left for the caller to release."""
    code, body = None, b""
    if method != "HEAD":
        try:
            body = r.read(64 * 1024, decode_content=False)
            m = re.search(rb"<Code>([^<]+)</Code>", body)
            code = m.group(1).decode() if m else None
        except Exception as e:  # noqa: BLE001 - the body broke off: no code, then
            log.debug("reading the body of a 400 answer: %s", e)
    if code in TOKEN_CODES or (method == "HEAD" and code is None):
        r.drain_conn()
        r.release_conn()
        raise bexc.ClientError({"Error": {"Code": code or "400", "Message": ""},
                                "ResponseMetadata": {"HTTPStatusCode": 400}}, method)
    return body


class _DirectBody:
    """The body of a direct response, read like botocore's StreamingBody."""

    def __init__(self, r):
        self._r = r

    def read(self, n: int) -> bytes:
        return self._r.read(n, decode_content=False)

    def close(self) -> None:
        self._r.release_conn()


def _direct_result(r, what: str, bucket: str | None = None) -> dict:
    """A direct response as the dict botocore would give, or the domain error its status means
    (a refusal names ``bucket``)."""
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
        err = _classify(bexc.ClientError({"Error": {"Code": code, "Message": ""},
                                          "ResponseMetadata": {"HTTPStatusCode": r.status}},
                                         what.split()[0]), what)
        if isinstance(err, Denied):
            err.bucket = bucket
        raise err
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
                         ("x-amz-mp-parts-count", "PartsCount"),
                         ("x-amz-storage-class", "StorageClass"),  # archived objects: archive.py
                         ("x-amz-restore", "Restore"),
                         ("x-amz-archive-status", "ArchiveStatus")):
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


_USER_AGENT = f"s3stashfs (direct; urllib3/{urllib3.__version__})"


