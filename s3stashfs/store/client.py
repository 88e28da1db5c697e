"""The Store: boto3 clients, the direct path, and the one place a call is made."""
from __future__ import annotations

import logging
import os

import boto3
import botocore.exceptions as bexc
import trio
from botocore.config import Config

from ..connectivity import Connectivity
from ..errors import MountError
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
        try:
            session = boto3.Session(profile_name=settings.profile, region_name=settings.region)
        except bexc.ProfileNotFound as e:
            raise MountError(f"AWS profile not found: {e}", exit_code=2) from None
        # botocore parses every LastModified of a listing with dateutil: more than half the
        # CPU of listing a large directory. S3 sends ISO 8601 there; parse that directly.
        session._session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_parse_timestamp)
        try:  # the first client resolves the credential chain (a credential_process runs)
            self._clients = {kind: session.client(
                "s3", endpoint_url=settings.endpoint_url,
                config=config.merge(Config(read_timeout=getattr(self.timeouts, kind))))
                for kind in ("meta", "data", "write")}
        except Exception as e:
            if not is_provider_failure(e):
                raise
            raise MountError(failure(e, "AWS credentials", profile=session.profile_name).problem) from None
        self.credentials = Credentials(session)
        self._direct = _Direct(self._clients["meta"], session, style, self.timeouts,
                               data_threads + meta_threads + 2)
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

