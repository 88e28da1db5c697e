"""Per-bucket routing: which region a bucket is in, and the URL and signing region of its
requests on the direct path (the boto3 path gets a client of that region).

A bucket's region is asked once (HeadBucket: S3 names it in ``x-amz-bucket-region``, even on a
301 or 403 answer), remembered for the life of the mount, and corrected when S3 answers a
request with a redirect naming another region (301 PermanentRedirect, 400
AuthorizationHeaderMalformed). Callers look a route up in ``Routes.known`` (a plain dict: the
data path pays one lookup per request) and ask for it to be found only when it is missing.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import urllib.parse

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# a name AWS can serve as a host name under a wildcard certificate: no dots, no capitals
_VIRTUAL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_REGION_IN_BODY = re.compile(rb"<Region>([a-z0-9-]{1,40})</Region>")


@dataclasses.dataclass(frozen=True)
class Route:
    """How requests for one bucket are sent: ``base`` + the quoted key is the URL of an
    object, signed (SigV4) for ``region``. ``origin`` (scheme://host) picks the connection
    pool and whether a proxy is used."""

    bucket: str
    region: str
    base: str  # ends with "/"
    origin: str
    path_style: bool


def aws_host(region: str) -> str:
    """S3's regional endpoint host on AWS (the China partition has its own domain)."""
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"s3.{region}.{domain}"


def build_route(bucket: str, region: str, endpoint: str | None, style: str = "auto") -> Route:
    """The route of ``bucket`` in ``region``.

    On AWS (``endpoint`` None): virtual-hosted ``https://BUCKET.s3.REGION.amazonaws.com/``,
    or path style ``https://s3.REGION.amazonaws.com/BUCKET/`` when ``style`` is "path" or the
    name cannot be a host name: a name with dots would not match S3's wildcard certificate
    (*.s3.REGION.amazonaws.com covers one label), so botocore sends those path style too.
    A custom endpoint (MinIO, Ceph, moto, ...) has one host for every region: path style
    unless ``style`` is "virtual"; requests are still signed for the bucket's region."""
    if endpoint:
        url = urllib.parse.urlsplit(endpoint)
        scheme, host, prefix = url.scheme, url.netloc, url.path.rstrip("/")
        path_style = style != "virtual"
    else:
        scheme, host, prefix = "https", aws_host(region), ""
        path_style = style == "path"
    if not path_style and not _VIRTUAL_NAME.fullmatch(bucket):
        path_style = True
    origin = f"{scheme}://{host}"
    if path_style:
        base = f"{origin}{prefix}/{bucket}/"
    else:
        base = f"{scheme}://{bucket}.{host}{prefix}/"
    return Route(bucket, region, base, origin, path_style)


def region_in_answer(headers, body: bytes = b"") -> str | None:
    """The region S3 names in an answer: the ``x-amz-bucket-region`` header (HeadBucket, and
    every redirect), or ``<Region>`` in an error body (AuthorizationHeaderMalformed)."""
    region = headers.get("x-amz-bucket-region")
    if region:
        return str(region)
    m = _REGION_IN_BODY.search(body) if body else None
    return m.group(1).decode() if m else None


def region_in_error(e: BaseException) -> str | None:
    """The region a botocore ClientError names (see ``region_in_answer``), else None."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
    region = headers.get("x-amz-bucket-region") or response.get("Error", {}).get("Region")
    return str(region) if region else None


class Routes:
    """The route of every bucket met so far (``known``), and how to build one.

    ``known`` only grows or has an entry replaced (a redirect), each a single dict store, so
    threads read it without a lock; finding a route (a request to S3) is done once per bucket
    at a time (``finding``)."""

    def __init__(self, region: str, endpoint: str | None, style: str):
        self.region = region  # the default one: the boto3 session's
        self.endpoint = endpoint  # None: AWS's regional hosts
        self.style = style
        self.known: dict[str, Route] = {}
        self._lock = threading.Lock()
        self._finding: dict[str, threading.Lock] = {}

    def default(self, bucket: str) -> Route:
        """The route to use while the bucket's region is not known (not remembered)."""
        return build_route(bucket, self.region, self.endpoint, self.style)

    def learn(self, bucket: str, region: str, why: str) -> Route:
        """Remember that ``bucket`` is in ``region``; the new route."""
        old = self.known.get(bucket)
        if old is not None and old.region == region:
            return old
        route = build_route(bucket, region, self.endpoint, self.style)
        self.known[bucket] = route
        if old is None:
            log.debug("s3://%s is in region %s (%s); requests go to %s", bucket, region, why,
                      route.base)
        else:
            log.debug("s3://%s is in region %s, not %s (%s); requests go to %s", bucket, region,
                      old.region, why, route.base)
        return route

    def finding(self, bucket: str) -> threading.Lock:
        """The lock held while ``bucket``'s region is asked: one request, not one per thread."""
        with self._lock:
            lock = self._finding.get(bucket)
            if lock is None:
                lock = self._finding[bucket] = threading.Lock()
            return lock
