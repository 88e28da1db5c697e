"""AWS credentials that expire: what a failure of them is, the one forced refresh, the state shown
by ``status``.

boto3's provider chain refreshes temporary credentials (SSO, assume-role, web identity, instance
metadata, container endpoints, credential_process) by itself, 15 minutes before they expire; the
clients and the direct path share the session's one credentials object, so both see each
refresh. What is left to do here: S3 refusing a token botocore still thinks good (revoked, a
clock off) gets one forced refresh and one retry; a provider that fails becomes EACCES with a
line that says what to run, never "S3 is unreachable" (see docs/SEMANTICS.md, "Credentials that
expire"). No message made here carries a key, a secret or a token.
"""
from __future__ import annotations

import logging
import math
import re
import threading
import time

import botocore.exceptions as bexc

from ..errors import CredentialsFailed, StoreError

log = logging.getLogger(__name__)

# S3's words for a session token it will not take; a refresh may cure them
TOKEN_CODES = {"ExpiredToken", "InvalidToken", "TokenRefreshRequired", "ExpiredTokenException"}
# a bodiless 400 to a HEAD may be an expired token; when a refresh did not cure one, the next
# such 400s are not taken for one for this long (a forced refresh each would be costly)
MAYBE_EVERY = 60.0
_SSO_ERRORS = (bexc.SSOError, bexc.TokenRetrievalError)
_PROVIDER_ERRORS = (bexc.NoCredentialsError, bexc.PartialCredentialsError,
                    bexc.CredentialRetrievalError, bexc.RefreshWithMFAUnsupportedError,
                    bexc.MetadataRetrievalError, *_SSO_ERRORS)
# modules whose frames in a traceback mean "raised while getting credentials": a network error
# there is the credential endpoint's, not S3's
_PROVIDER_MODULES = {"botocore.credentials", "botocore.tokens"}
# botocore's METHOD names, as users know the sources
_KINDS = {"custom-process": "credential_process", "container-role": "container credentials endpoint",
          "iam-role": "instance metadata (IMDS)", "assume-role": "assume-role",
          "assume-role-with-web-identity": "web identity", "sso": "SSO",
          "env": "environment variables", "shared-credentials-file": "shared credentials file",
          "config-file": "AWS config file"}
_SECRETISH = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b|[A-Za-z0-9/+=_-]{32,}")


def is_provider_failure(e: BaseException) -> bool:
    """Did ``e`` come from getting credentials (a botocore credential error, or any error raised
    inside a provider, such as a refused connection to an SSO, STS or container endpoint)?"""
    if isinstance(e, _PROVIDER_ERRORS):
        return True
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") in _PROVIDER_MODULES:
            return True
        tb = tb.tb_next
    return False


def _method_in(e: BaseException) -> str | None:
    """The METHOD of the credentials object whose refresh raised ``e``, from its traceback."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__") in _PROVIDER_MODULES:
            method = getattr(tb.tb_frame.f_locals.get("self"), "method", None)
            if isinstance(method, str):
                return method
        tb = tb.tb_next
    return None


def scrub(text: str, limit: int = 160) -> str:
    """A provider's words fit for a log and ``status``: the first line, anything that looks like
    a key, secret or token cut out, at most ``limit`` characters."""
    line = (text.strip().splitlines() or [""])[0]
    line = _SECRETISH.sub("[…]", line)
    return line if len(line) <= limit else line[:limit - 1] + "…"


def kind_of(method: str | None) -> str:
    return _KINDS.get(method or "", method or "credential provider")


def failure(e: BaseException, what: str, method: str | None = None,
            profile: str | None = None) -> CredentialsFailed:
    """``e``, raised while getting credentials from the source ``method``, as the error a user
    reads: what to run for SSO, or which provider failed and why."""
    if isinstance(e, _SSO_ERRORS):
        login = "aws sso login" + (f" --profile {profile}" if profile and profile != "default" else "")
        return CredentialsFailed(what, f"credentials expired: run `{login}`", sso=True)
    if isinstance(e, bexc.RefreshWithMFAUnsupportedError):
        return CredentialsFailed(what, "credentials expired: the role needs a new MFA code, which a "
                                       "mount cannot ask for: get fresh credentials and remount")
    if isinstance(e, bexc.NoCredentialsError):
        return CredentialsFailed(what, "no AWS credentials found")
    kwargs = getattr(e, "kwargs", None) or {}
    if isinstance(e, RuntimeError):  # botocore: "the refreshed credentials are still expired"
        reason = "it handed out credentials that are already expired (is the clock right?)"
    elif isinstance(e, (bexc.CredentialRetrievalError, bexc.MetadataRetrievalError)):
        reason = str(kwargs.get("error_msg") or e)
    else:
        reason = f"{type(e).__name__}: {e}"
    kind = kind_of(kwargs.get("provider") or method or _method_in(e))
    return CredentialsFailed(what, f"the credential provider failed: {kind}: {scrub(reason)}")


class Credentials:
    """The mount's credentials: boto3's object (shared by every client and the direct path), the
    forced refresh after S3 refused its token, and the problem ``status`` shows.

    ``call`` runs in worker threads; ``failed``/``ok``/``status`` on the trio thread only."""

    def __init__(self, session, unsigned: bool = False):
        self.profile = session.profile_name
        # resolved once: never the whole chain per request; none at all for unsigned requests
        self.creds = None if unsigned else session.get_credentials()
        self.method = getattr(self.creds, "method", None)
        self.problem: str | None = None
        self.since = 0.0
        self.refreshes = 0  # forced ones
        self._lock = threading.Lock()
        self._renewed = -math.inf  # time.monotonic() of the last forced refresh
        self._no_maybe_until = -math.inf  # a refresh did not cure a HEAD's 400: none till then
        # botocore logs each failed refresh as a warning with a traceback, whose text is the
        # provider's (a credential_process's stderr): we say it once, in our words, scrubbed
        logging.getLogger("botocore.credentials").setLevel(logging.CRITICAL)

    # -------------------------------------------------------------- worker threads
    def call(self, fn, *args):
        """``fn(*args)``; when S3 refuses the session token, refresh the credentials once and
        try once more."""
        started = time.monotonic()
        try:
            return fn(*args)
        except CredentialsFailed as e:
            if not e.rejected:
                raise self._advised(e) from e.__cause__
            first = e
        if not self._renew(first, started):
            raise self._stuck(first, refreshed=False) from None
        log.info("%s: S3 refused the session token; retrying with refreshed credentials", first.what)
        try:
            return fn(*args)
        except CredentialsFailed as e:
            if not e.rejected:
                raise self._advised(e) from e.__cause__
            if not e.certain:  # no token at fault, it seems (an SSE-C object's HEAD, say)
                self._no_maybe_until = time.monotonic() + MAYBE_EVERY
            raise self._stuck(e, refreshed=True) from None

    def _renew(self, e: CredentialsFailed, started: float) -> bool:
        """Force the credentials to refresh (unless another request did since this one began).
        False when they cannot: static keys, or a mere maybe (see MAYBE_EVERY).

        botocore has no public way to force a refresh; ``_protected_refresh`` under
        ``_refresh_lock`` is what its own ``_refresh`` does inside the mandatory window."""
        refresh = getattr(self.creds, "_protected_refresh", None)
        lock = getattr(self.creds, "_refresh_lock", None)
        if refresh is None or lock is None:
            return False
        with self._lock:
            if self._renewed > started:
                return True  # refreshed after this request was signed: just try again
            if not e.certain and time.monotonic() < self._no_maybe_until:
                return False
            try:
                with lock:
                    refresh(is_mandatory=True)
            except Exception as x:  # noqa: BLE001 - every provider failure is one answer
                raise failure(x, e.what, self.method, self.profile) from None
            self._renewed = time.monotonic()
            self.refreshes += 1
        return True

    def _advised(self, e: CredentialsFailed) -> CredentialsFailed:
        """``e`` with this mount's profile and provider in its words."""
        cause = e.__cause__
        if cause is not None and is_provider_failure(cause):
            return failure(cause, e.what, self.method, self.profile)
        return e

    def _stuck(self, e: CredentialsFailed, refreshed: bool):
        """S3 refused the token, and a refresh could not be had or did not help."""
        if not e.certain:  # a bodiless 400 to a HEAD, not cured: not taken for a token after all
            return StoreError(f"{e.what}: 400 Bad Request")
        kind = kind_of(self.method)
        if refreshed:
            return CredentialsFailed(e.what, f"credentials expired: {e.problem} even after a "
                                             f"refresh from the {kind}")
        return CredentialsFailed(e.what, f"credentials expired: {e.problem}, and credentials "
                                         f"from the {kind} do not refresh: renew them and remount")

    # -------------------------------------------------------------- the trio thread
    def failed(self, e: CredentialsFailed) -> None:
        if e.problem != self.problem:
            log.warning("AWS credentials: %s; requests that need S3 fail with EACCES until "
                        "fresh credentials come", e.problem)
            self.problem, self.since = e.problem, time.time()

    def ok(self) -> None:
        if self.problem is not None:
            log.info("AWS credentials work again")
            self.problem = None

    def status(self) -> dict | None:
        return None if self.problem is None else {"problem": self.problem, "since": self.since}
