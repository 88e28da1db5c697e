"""Error classification: every boto3/botocore/urllib3/socket failure becomes one domain error.

Unreachable (no answer at all) / interrupted (an answer that broke off) / not found / changed /
denied / throttled / other; see docs/SEMANTICS.md, Faults.
"""
from __future__ import annotations

import errno
import http.client
import logging
import socket
import ssl

import botocore.exceptions as bexc
import urllib3

from ..errors import (
    Archived,
    Changed,
    ChecksumMismatch,
    Conflict,
    CredentialsFailed,
    Denied,
    Interrupted,
    NotFound,
    S3StashError,
    StoreError,
    Throttled,
    Unreachable,
    Untrusted,
)
from .credentials import TOKEN_CODES, failure, is_provider_failure
from .types import strip_etag

log = logging.getLogger(__name__)

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_CHANGED = {"412", "PreconditionFailed"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_RETRY = {"429", "500", "502", "503", "504", "SlowDown", "InternalError", "ServiceUnavailable",
          "RequestTimeout", "Throttling", "ThrottlingException", "ThrottledException",
          "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
          "BandwidthLimitExceeded", "RequestThrottled"}
# a plain OSError (not a ConnectionError) that still means "no way to S3"
_NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN}
# an archived object that is not restored: a GET's 403, a copy's source refused
_ARCHIVED = {"InvalidObjectState", "ObjectNotInActiveTierError"}


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


def _untrusted(e: BaseException) -> str | None:
    """Why the server's certificate was refused, when ``e`` is (or wraps: botocore's SSLError,
    urllib3's SSLError and MaxRetryError) a failed certificate check; else None. Other TLS
    failures (a handshake cut off) stay network failures."""
    chain: list[BaseException] = []
    todo: list[object] = [e]
    while todo and len(chain) < 20:
        x = todo.pop(0)
        if not isinstance(x, BaseException) or any(x is c for c in chain):
            continue
        chain.append(x)
        if isinstance(x, ssl.SSLCertVerificationError):
            return x.verify_message or str(x)
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args,
                 *(getattr(x, "kwargs", None) or {}).values()]
    for x in chain:
        if isinstance(x, (ssl.SSLError, urllib3.exceptions.SSLError, bexc.SSLError)) \
                and "CERTIFICATE_VERIFY_FAILED" in str(x):
            return str(x)
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
        maybe = code == status == "400" and e.operation_name in ("HeadObject", "HeadBucket", "HEAD")
        if code in TOKEN_CODES or maybe:  # a HEAD's 400 has no body to say why
            return CredentialsFailed(what, f"S3 rejected the session token ({code})", rejected=True,
                                     certain=not maybe)
        if code in _ARCHIVED:  # a 403, but no refused credential: before _DENIED
            return Archived(msg, storage_class=err.get("StorageClass") or None)
        for names, cls in ((_NOT_FOUND, NotFound), (_CHANGED, Changed), (_DENIED, Denied),
                           (_RETRY, Throttled)):
            if code in names or status in names:
                return _coded(cls(msg), code or status)
        if code == "304" or status == "304":
            return Changed(msg)
        return _coded(StoreError(msg), code or status)
    if is_provider_failure(e):  # before the network errors: its endpoint is not S3
        return failure(e, what)
    if isinstance(e, bexc.FlexibleChecksumError):
        return ChecksumMismatch(f"{what}: {e}")
    reason = _untrusted(e)
    if reason is not None:
        return Untrusted(what, reason)
    net = _interrupted(e, what) if answered else _unreachable(e, what)
    if net is not None:
        return net
    if isinstance(e, bexc.BotoCoreError):
        return StoreError(f"{what}: {e}")
    if isinstance(e, OSError):  # writing the cache file failed (ENOSPC, EIO): not S3's fault
        raise e
    return StoreError(f"{what}: {type(e).__name__}: {e}")


def _coded(e: S3StashError, code: str) -> S3StashError:
    """``e`` with S3's error code (its HTTP status when the answer had no body: a HEAD's), for
    the callers that tell codes of one status apart."""
    e.s3_code = code
    return e


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


