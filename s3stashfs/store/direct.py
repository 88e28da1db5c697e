"""The direct GET/HEAD data path: signed (or unsigned) requests straight through urllib3."""
from __future__ import annotations

import email.utils
import logging
import re
import urllib.parse

import botocore.exceptions as bexc
import botocore.httpsession
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from ..errors import Denied, StoreError
from .classify import _classify
from .credentials import TOKEN_CODES
from .types import CHECKSUMS, Timeouts

log = logging.getLogger(__name__)

class _Direct:
    """Signed GET and HEAD requests sent straight through urllib3, for the data path.

    botocore spends about 1 ms of CPU on each call in generic machinery (endpoint rules, event
    hooks, response parsing): more than the request itself on a fast network, and the daemon's
    one Python core is the limit when a directory of small files is read. A GET or HEAD of one
    key needs none of it: the URL is the endpoint plus the bucket and the quoted key, signed with
    SigV4 by botocore's own signer, or not signed at all for public buckets (--no-sign-request).
    Anything unusual (no credentials, a proxy, a redirect to another region) is left to botocore
    (``None`` is returned, or ``Fallback`` raised)."""

    class Fallback(Exception):
        pass

    def __init__(self, client, session, style: str, timeouts: Timeouts, pool_size: int,
                 unsigned: bool = False, requester_pays: bool = False):
        from urllib.request import getproxies, proxy_bypass
        self._session = session
        self._unsigned = unsigned  # --no-sign-request: sent as they are, no credentials
        # the session's one credentials object, which the clients refresh too; asked for once
        # (with none found, asking again per request would run the whole chain every time)
        self._creds = None if unsigned else session.get_credentials()
        # --requester-pays: the header S3 wants, signed like the others (x-amz-* always are)
        self._extra = {"User-Agent": _USER_AGENT}
        if requester_pays:
            self._extra["x-amz-request-payer"] = "requester"
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
        token = None
        if self._unsigned:
            send = {**headers, **self._extra}
        else:
            if self._creds is None:
                return None
            frozen = self._creds.get_frozen_credentials()  # refreshed first when near expiry
            token = frozen.token
            req = AWSRequest(method=method, url=url, headers={**headers, **self._extra})
            S3SigV4Auth(frozen, "s3", self._region).add_auth(req)
            send = dict(req.headers.items())
        r = self._pool.request(method, url, headers=send,
                               preload_content=False, decode_content=False, redirect=False,
                               timeout=self._timeouts[method])
        if r.status == 400 and token and not r.headers.get("x-amz-bucket-region"):
            _raise_if_token_refused(r, method)  # not a reason to leave the direct path
        if r.status in (301, 302, 307, 400):  # another region, or something botocore handles
            r.drain_conn()
            r.release_conn()
            self._slow_buckets.add(bucket)
            log.debug("s3://%s: answered %d to a direct request; using botocore", bucket, r.status)
            raise self.Fallback()
        return r


def _raise_if_token_refused(r, method: str) -> None:
    """A 400 that refuses the session token (a HEAD's has no body: maybe) as botocore's error;
    otherwise nothing, the body read and ``r`` left for the caller to release."""
    code = None
    if method != "HEAD":
        try:
            m = re.search(rb"<Code>([^<]+)</Code>", r.read(64 * 1024, decode_content=False))
            code = m.group(1).decode() if m else None
        except Exception as e:  # noqa: BLE001 - the body broke off: no code, then
            log.debug("reading the body of a 400 answer: %s", e)
    if code in TOKEN_CODES or (method == "HEAD" and code is None):
        r.drain_conn()
        r.release_conn()
        raise bexc.ClientError({"Error": {"Code": code or "400", "Message": ""},
                                "ResponseMetadata": {"HTTPStatusCode": 400}}, method)


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


