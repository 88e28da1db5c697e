"""The Store: boto3 clients, the direct path, and the one place a call is made."""
from __future__ import annotations

import logging
import os

from collections.abc import Callable

import boto3
import botocore
import botocore.exceptions as bexc
import trio
from botocore.config import Config

from ..connectivity import Connectivity
from ..errors import Denied, MountError
from .classify import _botocore_answered, _classify
from .credentials import Credentials, failure, is_provider_failure
from .direct import _Direct, _direct_result
from .retry import RetryMixin
from .types import Timeouts, _parse_timestamp

log = logging.getLogger(__name__)

class Client(RetryMixin):
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
        try:  # the first client resolves the credential chain (a credential_process runs)
            self._clients = {kind: session.client(
                "s3", endpoint_url=settings.endpoint_url,
                config=config.merge(Config(read_timeout=getattr(self.timeouts, kind))))
                for kind in ("meta", "data", "write")}
        except Exception as e:
            if not is_provider_failure(e):
                raise
            raise MountError(failure(e, "AWS credentials", profile=session.profile_name).problem) from None
        self.credentials = Credentials(session, unsigned=self.unsigned)
        self._direct = _Direct(self._clients["meta"], session, style, self.timeouts,
                               data_threads + meta_threads + 2, unsigned=self.unsigned,
                               requester_pays=settings.requester_pays)
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
        ``Timeouts``)."""
        if method in self._payer_methods:
            kwargs.setdefault("RequestPayer", "requester")
        try:
            return getattr(self._clients[kind], method)(**kwargs)
        except Exception as e:  # noqa: BLE001 - classified, never swallowed
            err = _classify(e, what, answered=_botocore_answered(e))
            if isinstance(err, Denied) and err.bucket is None:
                err.bucket = kwargs.get("Bucket")
            raise err from e

    def denied_advice(self, e: Denied) -> str | None:
        """What a plain "access denied" from a bucket may mean with these settings: a
        requester-pays bucket (S3 answers its requests without the header with a bare 403
        AccessDenied), or, unsigned, a bucket that is not public. None for other refusals
        (bad or expired credentials, a bad signature) and when --requester-pays is on."""
        b = e.bucket
        if not b or e.code not in ("AccessDenied", "403"):
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

