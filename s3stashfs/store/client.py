"""The Store: boto3 clients, the direct path, and the one place a call is made."""
from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import urllib.parse

from collections.abc import Callable

import boto3
import botocore
import botocore.exceptions as bexc
import trio
from botocore.config import Config

from ..connectivity import Connectivity
from ..errors import ConfigError, Denied, Interrupted, MountError, Throttled, Unreachable, Untrusted
from .classify import _botocore_answered, _classify
from .credentials import Credentials, failure, is_provider_failure
from .direct import _Direct, _direct_result
from .retry import RetryMixin
from .routes import DEFAULT_REGION, Route, Routes, region_in_error
from .types import Timeouts, _parse_timestamp

log = logging.getLogger(__name__)

# Worker threads, and so requests in flight, of each kind. S3 serves thousands of GETs a second
# per prefix, each waiting tens of milliseconds for its first byte: many processes reading
# different files need as many requests in flight as they have reads waiting (32 processes, 32
# GETs), which 12 data threads cut to 12. A thread waiting on a socket costs no CPU and little
# memory (its stack is touched only as deep as it goes); the buffers of ranged GETs are bounded by
# the read-ahead budget (budget.py), not by these numbers.
DATA_THREADS = 64  # GETs of bytes, PUTs and parts
META_THREADS = 32  # HEAD, LIST and the other calls of few bytes: never queued behind data

class Client(RetryMixin):
    """boto3 clients shared by all worker threads (clients are thread-safe), one for each kind
    of call because a client has one read timeout (see ``Timeouts``): ``meta``, ``data`` (GETs
    that the direct path leaves to botocore) and ``write``; and a direct path for GET and HEAD
    of keys (see ``_Direct``)."""

    def __init__(self, settings, data_threads: int = DATA_THREADS,
                 meta_threads: int = META_THREADS):
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
        # public buckets: no credentials are looked for, no request is signed
        self.unsigned = settings.no_sign_request
        if self.unsigned:
            config = config.merge(Config(signature_version=botocore.UNSIGNED))
        try:
            session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
        except bexc.ProfileNotFound as e:
            raise MountError(f"AWS profile not found: {e}", exit_code=2) from None
        # botocore parses every LastModified of a listing with dateutil: more than half the
        # CPU of listing a large directory. S3 sends ISO 8601 there; parse that directly.
        session._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp)
        if not self.unsigned:
            _check_credentials(session)
        self._session, self._config, self._verify = session, config, _verify(settings, session)
        self._endpoint_url = settings.endpoint_url
        try:  # the first client resolves the credential chain (a credential_process runs)
            self._clients = self._new_clients(settings.region)  # the session's region
        except Exception as e:
            if not is_provider_failure(e):
                raise
            raise MountError(failure(e, "AWS credentials", profile=session.profile_name).problem) from None
        self.credentials = Credentials(session, unsigned=self.unsigned)
        region = self._clients["meta"].meta.region_name
        endpoint, direct = _endpoint(settings.endpoint_url, self._clients["meta"].meta.endpoint_url)
        self.routes = Routes(region if region not in (None, "aws-global") else DEFAULT_REGION,
                             endpoint, style)
        self._regional: dict[str, dict] = {}  # region -> clients, for buckets outside the default
        self._regional_lock = threading.Lock()
        self._direct = _Direct(session, self.routes, self._route, self.timeouts,
                               data_threads + meta_threads + 2, self._verify,
                               unsigned=self.unsigned, requester_pays=settings.requester_pays)
        self._direct.enabled = direct
        # requester-pays: RequestPayer on every operation whose input has it (GET, HEAD, PUT,
        # COPY, DELETE, LIST, multipart...: botocore's model says which), none on the others
        self.requester_pays = settings.requester_pays
        self._payer_methods = _request_payer_methods(self._clients["meta"]) \
            if settings.requester_pays else frozenset()
        # the first "access denied" of each bucket is explained once (``_on_denied``), in the
        # log and to each ``on_hint(bucket, message)`` (the mount records it for ``status``)
        self.on_hint: list[Callable[[str, str], None]] = []
        self._hinted: set[str] = set()
        self.connectivity = Connectivity()
        self._data = trio.CapacityLimiter(data_threads)
        self._meta = trio.CapacityLimiter(meta_threads)
        # on-demand probes: their threads are abandoned after the connect timeout and end by
        # the metadata one, so at most two linger, and metadata calls never wait for them
        self._probes = trio.CapacityLimiter(2)
        self.probe_bucket = settings.bucket

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
                return _direct_result(r, what, bucket)
            finally:
                r.release_conn()
        return _direct_result(r, what, bucket)

    def _call(self, what: str, method: str, kind: str = "meta", **kwargs):
        """One botocore call on the client of its ``kind`` ("meta", "data", "write"; see
        ``Timeouts``) and of the region of its bucket (``Bucket=``; found at first use). A
        redirect to another region (301, 400 naming it) updates the bucket's route and the
        call is made once more there. With --requester-pays, RequestPayer goes with every
        operation that takes it."""
        if method in self._payer_methods:
            kwargs.setdefault("RequestPayer", "requester")
        bucket = kwargs.get("Bucket")
        route = self.routes.known.get(bucket) if bucket else None
        if bucket and route is None:
            route, answer = self._discover(bucket)
            if method == "head_bucket" and answer is not None:  # that HeadBucket was this one
                if isinstance(answer, Exception):
                    raise _error(answer, what, bucket) from answer
                return answer
        if route is None:
            clients = self._clients
        else:
            clients = self._clients if route.region == self.routes.region \
                else self._clients_in(route.region)
        try:
            return getattr(clients[kind], method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            region = _redirected_to(e) if route is not None else None
            if route is None or region is None or region == route.region:
                raise _error(e, what, bucket) from e
            route = self.routes.learn(route.bucket, region, f"S3 redirected {method}")
        try:
            return getattr(self._clients_in(route.region)[kind], method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            raise _error(e, what, bucket) from e

    def denied_advice(self, e: Denied) -> str | None:
        """What a plain "access denied" from a bucket may mean with these settings: a
        requester-pays bucket (S3 answers its requests without the header with a bare 403
        AccessDenied), or, unsigned, a bucket that is not public. None for other refusals
        (bad or expired credentials, a bad signature) and when --requester-pays is on."""
        b = e.bucket
        if not b or e.s3_code not in ("AccessDenied", "403"):
            return None
        if self.unsigned:
            return f"{b} may not be public: mount without --no-sign-request to use AWS credentials"
        if not self.requester_pays:
            return (f"if {b} is a requester-pays bucket, mount with --requester-pays "
                    "(S3STASHFS_REQUESTER_PAYS=1)")
        return None

    def _on_denied(self, e: Denied) -> None:
        """Called (in trio's thread) by ``_run`` for every refusal: the first of each bucket
        that ``denied_advice`` explains is logged as a WARNING and handed to ``on_hint``; the
        others only reach their callers (EACCES)."""
        advice = self.denied_advice(e)
        if advice is None or not e.bucket or e.bucket in self._hinted:
            return
        self._hinted.add(e.bucket)
        unsigned = " to an unsigned request" if self.unsigned else ""
        hint = f"s3://{e.bucket}: access denied{unsigned}; {advice}"
        log.warning("%s", hint)
        for fn in self.on_hint:
            fn(e.bucket, hint)


    # ------------------------------------------------------------- regions and clients
    def _new_clients(self, region: str | None) -> dict:
        return {kind: self._session.client(
            "s3", region_name=region, endpoint_url=self._endpoint_url, verify=self._verify,
            config=self._config.merge(Config(read_timeout=getattr(self.timeouts, kind))))
            for kind in ("meta", "data", "write")}

    def _clients_in(self, region: str) -> dict:
        """The clients of ``region``: the default ones, or made at the first bucket there
        (a boto3 session must not make clients in two threads at once)."""
        if region == self.routes.region:
            return self._clients
        clients = self._regional.get(region)
        if clients is None:
            with self._regional_lock:
                clients = self._regional.get(region)
                if clients is None:
                    clients = self._regional[region] = self._new_clients(region)
        return clients

    def _route(self, bucket: str) -> Route:
        return self.routes.known.get(bucket) or self._discover(bucket)[0]

    def _discover(self, bucket: str) -> tuple[Route, object]:
        """Find the region of ``bucket`` with a HeadBucket (once: remembered), and return its
        route, with the HeadBucket's answer (the response, or its ClientError) when that is
        the bucket's own answer rather than a redirect, for a head_bucket call to take as its
        own. S3 names the region in ``x-amz-bucket-region`` even on a 301 or 403; a server
        that does not (some S3-compatible ones) has the default region. A bucket not found,
        or an error, leaves the region unknown (asked again next time); a network failure is
        raised, classified, as the failure of the call that needed the route."""
        with self.routes.finding(bucket):
            route = self.routes.known.get(bucket)
            if route is not None:
                return route, None
            what = f"HEAD bucket {bucket} (its region)"
            try:
                answer: object = self._clients["meta"].head_bucket(Bucket=bucket)
                meta = answer.get("ResponseMetadata", {})  # type: ignore[attr-defined]
                region = (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region")
            except bexc.ClientError as e:
                answer, meta, region = e, e.response.get("ResponseMetadata", {}), region_in_error(e)
            except Exception as e:  # noqa: BLE001 - classified, never swallowed
                err = _classify(e, what, answered=_botocore_answered(e))
                if isinstance(err, (Unreachable, Interrupted, Throttled, Untrusted)):
                    raise err from e
                log.debug("%s: %s; region %s for now", what, err, self.routes.region)
                return self.routes.default(bucket), None
            status = meta.get("HTTPStatusCode")
            if region:
                route = self.routes.learn(bucket, region, f"HeadBucket answered {status}")
            elif status in (200, 403):
                route = self.routes.learn(bucket, self.routes.region,
                                          f"HeadBucket answered {status} without naming one")
            else:
                return self.routes.default(bucket), answer
            if status in (301, 302, 307, 400):  # a redirect: ask again in that region
                return route, None
            return route, answer



def _check_credentials(session) -> None:
    """Fail at once, with one line, when boto3's chain finds no credentials at all (rather than
    at the first request, as a refusal): most likely a public bucket mounted without
    --no-sign-request. The credentials found are kept by the session (and refreshed by it)."""
    try:
        found = session.get_credentials() is not None
    except Exception as e:  # a failing credential_process, SSO login, profile...
        if not is_provider_failure(e):
            raise
        problem = failure(e, "AWS credentials", profile=session.profile_name).problem
        raise MountError(f"AWS credentials could not be loaded: {problem}") from None
    if not found:
        raise MountError("no AWS credentials found (environment, ~/.aws, instance role); "
                         "for a public bucket, mount with --no-sign-request")


def _request_payer_methods(client) -> frozenset[str]:
    """The client's methods whose operation takes RequestPayer, from botocore's S3 model."""
    model = client.meta.service_model
    out = set()
    for method, op in client.meta.method_to_api_mapping.items():
        shape = model.operation_model(op).input_shape
        if shape is not None and "RequestPayer" in shape.members:
            out.add(method)
    return frozenset(out)


def _error(e: BaseException, what: str, bucket: str | None):
    """``e`` classified; a refusal knows its bucket (for the requester-pays hint)."""
    err = _classify(e, what, answered=_botocore_answered(e))
    if isinstance(err, Denied) and err.bucket is None:
        err.bucket = bucket
    return err


_REDIRECTS = {301, 302, 307, 400}


def _redirected_to(e: BaseException) -> str | None:
    """The region a redirect answer (301 PermanentRedirect, 307, 400 AuthorizationHeader-
    Malformed) names, else None."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    if response.get("ResponseMetadata", {}).get("HTTPStatusCode") not in _REDIRECTS:
        return None
    return region_in_error(e)


_AWS_STANDARD = re.compile(r"https://s3(\.[a-z0-9-]+)?\.amazonaws\.com(\.cn)?/?")


def _endpoint(setting: str | None, resolved: str) -> tuple[str | None, bool]:
    """(the one endpoint of every region, or None for AWS's regional hosts; whether the direct
    path can build the URLs). ``resolved`` is botocore's endpoint for the default region: a
    custom one may also come from AWS_ENDPOINT_URL or the profile. FIPS, dual-stack and
    accelerated AWS endpoints are left to botocore."""
    if setting:
        return setting, True
    host = urllib.parse.urlsplit(resolved).hostname or ""
    if not host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return resolved.rstrip("/"), True
    return None, bool(_AWS_STANDARD.fullmatch(resolved))


def _verify(settings, session) -> bool | str | None:
    """What boto3's ``verify`` gets: False (--no-verify-ssl), the CA bundle to trust (the
    setting, else AWS_CA_BUNDLE or the profile's ``ca_bundle``), or None (certifi's). A bundle
    that cannot be loaded stops the mount here rather than failing every request later."""
    if settings.no_verify_ssl:
        log.warning("TLS certificates are not checked (--no-verify-ssl): anyone on the network "
                    "path to S3 can read and change what this mount sends and receives")
        return False
    if settings.ca_bundle is not None:
        path, source = str(settings.ca_bundle), "--ca-bundle"
    else:
        path, source = session._session.get_config_variable("ca_bundle"), \
            "AWS_CA_BUNDLE or the profile's ca_bundle"
        if not path:
            return None
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"CA bundle {path} ({source}) cannot be used: {why}") from None
    log.debug("trusting the CA certificates of %s (%s)", path, source)
    return str(path)
