"""Domain exceptions, and the one place where they become errno values.

The core (namespace, cache, fetch, store) raises these; only ``fs.py`` turns them into
``FUSEError`` through :func:`errno_for`, so every errno decision is made here.
"""
from __future__ import annotations

import errno
import sqlite3


class S3StashError(Exception):
    """Base of every domain error; ``errno`` is what a file operation reports."""

    errno = errno.EIO
    s3_code = ""  # S3's error code when S3 answered ("AccessDenied"; "403" for a HEAD, which
    # has no body to say more; set by store/classify.py)


class NotFound(S3StashError):
    errno = errno.ENOENT


class NotADirectory(S3StashError):
    errno = errno.ENOTDIR


class IsADirectory(S3StashError):
    errno = errno.EISDIR


class ReadOnly(S3StashError):
    errno = errno.EROFS


class InvalidName(S3StashError):
    """A name that cannot become a key component (see namespace.valid_name)."""

    errno = errno.EINVAL


class Exists(S3StashError):
    errno = errno.EEXIST


class NotEmpty(S3StashError):
    errno = errno.ENOTEMPTY


class NotSupported(S3StashError):
    errno = errno.ENOTSUP


class Unreachable(S3StashError):
    """S3 could not be reached: no answer at all (connection refused, or reset or closed before
    a status line; DNS failure; no route; connect timeout; no answer within the timeout)."""

    errno = errno.ENETUNREACH

    def __init__(self, message: str = "", *, retry: bool = True):
        super().__init__(message)
        # False for a timeout or a DNS failure: the wait has been spent (or the resolver has
        # retried) already, so the store goes offline at once instead of trying again
        self.retry = retry


class Denied(S3StashError):
    errno = errno.EACCES
    bucket: str | None = None  # the bucket that refused, when the store knows it


class CredentialsFailed(Denied):
    """No usable AWS credentials: the provider chain failed (an SSO session that ended, a
    credential_process or container endpoint that errs), or S3 refused the session token as
    expired and no fresh one came. EACCES, not ENETUNREACH: S3 may well be reachable, and the
    mount stays online. ``problem`` is the part a user acts on (no secrets in it); ``rejected``:
    S3 refused the token (a refresh may help); ``certain``: S3 said so in words (a bodiless 400
    to a HEAD only may mean it); ``sso``: ``aws sso login`` is the cure."""

    def __init__(self, what: str, problem: str, *, rejected: bool = False, certain: bool = True,
                 sso: bool = False):
        super().__init__(f"{what}: {problem}")
        self.what, self.problem = what, problem
        self.rejected, self.certain, self.sso = rejected, certain, sso


class Archived(S3StashError):
    """The object is in an archive storage class (GLACIER, DEEP_ARCHIVE) or an archive tier of
    INTELLIGENT_TIERING, and no restored copy is readable: S3 refuses to GET it (403
    InvalidObjectState) until it is restored, which takes minutes to hours.

    EREMOTE ("Object is remote"), as s3fs gives: the bytes exist but are not here, and waiting
    will not bring them. Not EACCES (mountpoint-s3's choice): that is what a refused credential
    gives, and sends the user to check permissions that are fine. Not EIO: nothing failed, and
    EIO means "retry or call the admin". Not EAGAIN: programs retry it in a loop for hours.
    The mount stays online: S3 answered. ``message`` is the one line for the log and status."""

    errno = errno.EREMOTE

    def __init__(self, message: str = "", *, storage_class: str | None = None):
        super().__init__(message)
        self.storage_class = storage_class  # S3's word, when it said (GET's error has it)


class Throttled(S3StashError):
    """S3 kept answering an error worth retrying (500, 503 SlowDown, 429...) after our retries.

    EIO, not EAGAIN: on a blocking read or write of a regular file, EAGAIN tells a program
    "would block, try again": some retry at once in a tight loop (hammering a server that asked
    us to slow down), most treat it as an error they do not expect. EIO is what a disk that
    fails gives, and every tool reports it. The mount stays online: S3 answered."""

    errno = errno.EIO


class Interrupted(S3StashError):
    """S3 answered, but the transfer broke off after its status line: a body shorter than its
    Content-Length, a connection reset or closed in the middle of a body, or a body that stalled
    longer than the data timeout. Retried; then EIO for that request alone. The mount stays
    online: a server that answers is not unreachable."""

    errno = errno.EIO

    def __init__(self, message: str = "", *, stalled: bool = False):
        super().__init__(message)
        self.stalled = stalled  # the body stopped coming: the data timeout was waited out


class Changed(S3StashError):
    """The object changed under an open file (If-Match failed): that open gets EIO."""

    errno = errno.EIO


class Conflict(S3StashError):
    """A conditional change (If-Match / If-None-Match: *) found S3 no longer holding the version
    the change was based on. The uploader keeps both versions; it never reaches a caller as an
    errno except when that failed too."""

    errno = errno.EIO


class ChecksumMismatch(S3StashError):
    """Downloaded bytes do not match the object's ETag or stored checksum."""

    errno = errno.EIO


class Damaged(ChecksumMismatch):
    """Cached bytes failed their check (or had nothing to check them against): they were
    dropped, and are fetched again while S3 answers. Offline, a read of them gets EIO, never
    ENETUNREACH: the bytes are bad, that is the error."""


class NoSpace(S3StashError):
    errno = errno.ENOSPC


class StoreError(S3StashError):
    """Any other S3 error; the message carries S3's code."""

    errno = errno.EIO


class Untrusted(StoreError):
    """The server's TLS certificate failed the check (not signed by a trusted CA, expired,
    another host's). Not "unreachable": something answered, and it is not known to be S3, so
    the mount neither goes offline nor retries; the user must trust its CA (--ca-bundle,
    AWS_CA_BUNDLE) or fix the endpoint. EIO for a file operation; exit 1 at mount."""

    def __init__(self, what: str, reason: str):
        super().__init__(f"{what}: the server's TLS certificate is not trusted ({reason}); "
                         "give its CA with --ca-bundle or AWS_CA_BUNDLE")
        self.reason = reason


class ConfigError(Exception):
    """A setting, flag or env file is wrong. The message is one line naming the key."""


class MountError(Exception):
    """Mounting cannot proceed (no FUSE, bucket missing, bad credentials, ...)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
        self.unreachable = False  # S3 could not be reached (a cache may still be served)


def errno_for(exc: BaseException) -> int:
    """The errno a file operation reports for ``exc``; anything unknown is EIO."""
    if isinstance(exc, S3StashError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return errno.ENOSPC
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return errno.ENOSPC  # the catalog could not grow: the cache's disk is full
    return errno.EIO


def first_error(group: BaseExceptionGroup) -> BaseException:
    """trio nurseries raise exception groups; a caller wants one error: the first domain error
    (it carries the errno), else the first exception of any kind."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)
    walk(group)
    return next((e for e in leaves if isinstance(e, S3StashError)), leaves[0])
