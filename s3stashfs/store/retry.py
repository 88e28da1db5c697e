"""Retries with backoff and full jitter, and the offline rules around every call."""
from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

import trio

from ..connectivity import Connectivity
from ..errors import CredentialsFailed, Denied, Interrupted, Throttled, Unreachable
from .credentials import Credentials
from .types import Timeouts

log = logging.getLogger(__name__)

class RetryMixin:
    """Retries, offline checks and on-demand probes for every call of the Store."""

    connectivity: Connectivity
    credentials: Credentials
    timeouts: Timeouts
    _probes: trio.CapacityLimiter
    probe_bucket: str | None

    if TYPE_CHECKING:
        async def probe(self, bucket: str | None, limiter: trio.CapacityLimiter | None = None) -> bool:
            ...

    def _on_denied(self, e: Denied) -> None:
        """Every refusal that leaves ``_run`` passes here (see ``Client._on_denied``)."""

    async def _run(self, what: str, limiter, fn, *args, attempts: int = 5, probe: bool = False,
                   abandon: bool = False):
        """``_tries``, each try through ``Credentials.call`` (a token S3 refused: one forced
        refresh, one more go); the credentials' problem, or its end, is recorded for ``status``.
        When the provider failed, S3 was never asked: the probe (an unsigned knock, then) says
        whether it can be reached, and if it cannot the mount goes offline and this request
        fails as unreachable, not as denied (a laptop off the network with an SSO login to
        renew is offline first). The probe itself records nothing."""
        try:
            r = await self._tries(what, limiter, self.credentials.call, fn, *args,
                                  attempts=attempts, probe=probe, abandon=abandon)
        except CredentialsFailed as e:
            if not probe:
                if not e.rejected and not await self.probe(self.probe_bucket, self._probes):
                    if self.connectivity.online:
                        self.connectivity.unreachable(f"{what}: S3 cannot be reached either "
                                                      "(the credential provider failed)")
                    raise self._offline(what) from e
                self.credentials.failed(e)
            raise
        if not probe:
            self.credentials.ok()
        return r

    async def _tries(self, what: str, limiter, fn, *args, attempts: int = 5, probe: bool = False,
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
            except Denied as e:  # not retried: S3 said no
                self._on_denied(e)
                raise
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

