"""Online / offline: noticed from the calls that fail, left by a probe that succeeds.

A call that finds S3 unreachable (refused, reset or unresolvable after the store's two quick
retries; or not answering within its timeout) switches the mount to offline. A server that
answers, even with an error or a broken body, is not unreachable. Calls still waiting on S3 at
that moment stop waiting (``waiting`` scopes, ``on_offline`` callbacks). While offline, a
background probe asks S3 again, with a growing interval, until it answers; and a request that
needs S3 probes at once (``recheck``) when the last probe is more than RECHECK_AFTER old, so that
a user retrying right after the network came back is served; otherwise it fails at once with
Unreachable instead of waiting on a dead network.
"""
from __future__ import annotations

import logging
import time

import trio

log = logging.getLogger(__name__)

PROBE_FIRST = 0.5
PROBE_MAX = 10.0
RECHECK_AFTER = 1.0  # a request while offline probes at once if the last probe is older


class Connectivity:
    def __init__(self):
        self.online = True
        self.since = time.time()
        self._changed = trio.Event()
        self.on_online: list = []  # called (no arguments) when S3 answers again
        self.on_offline: list = []  # called (no arguments) when the mount goes offline
        # cancelled when the mount goes offline: calls that only wait for S3's answer, which
        # another call has just found will not come (see Store._run)
        self.waiting: set[trio.CancelScope] = set()
        # trio.current_time() when the last on-demand probe ended (or the mount went offline);
        # the background probe keeps its own pace and does not count
        self.last_probe = float("-inf")
        self._probing: trio.Event | None = None  # set when the on-demand probe under way ends

    def unreachable(self, why: str) -> None:
        if self.online:
            self.online = False
            self.since = time.time()
            self._probed()  # a request has just failed to reach S3: as good as a failed probe
            log.warning("S3 is unreachable (%s): offline, serving what is cached", why)
            self._changed.set()
            for cs in self.waiting:
                cs.cancel()
            for fn in self.on_offline:
                fn()

    def reachable(self) -> None:
        if not self.online:
            self.online = True
            self.since = time.time()
            log.info("S3 answers again: back online")
            self._changed.set()
            for fn in self.on_online:
                fn()

    def _probed(self) -> None:
        try:
            self.last_probe = trio.current_time()
        except RuntimeError:  # outside trio (a mount that starts offline)
            pass

    async def recheck(self, probe, limit: float) -> bool:
        """Offline, and a request needs S3: ``await probe()`` now, for at most ``limit`` seconds
        (the probe's thread must be abandonable), and go online if it answers. True when online.

        One probe at a time: requests arriving while it runs wait for it, and for RECHECK_AFTER
        after a failed one they fail at once. So a hung server costs at most ``limit`` seconds
        per RECHECK_AFTER of wall time, however many requests come, and reads of cached data
        never get here (they need no S3)."""
        if self.online:
            return True
        if self._probing is not None:
            await self._probing.wait()
            return self.online
        if trio.current_time() - self.last_probe < RECHECK_AFTER:
            return False
        done = self._probing = trio.Event()
        try:
            with trio.move_on_after(limit):
                if await probe():
                    self.reachable()
        finally:
            self._probed()
            self._probing = None
            done.set()
        return self.online

    async def run(self, probe, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: while offline, ``await probe()`` with backoff until it succeeds."""
        task_status.started()
        while True:
            while self.online:
                self._changed = trio.Event()
                await self._changed.wait()
            delay = PROBE_FIRST
            while not self.online:
                await trio.sleep(delay)
                if await probe():
                    self.reachable()
                delay = min(delay * 2, PROBE_MAX)
