"""Online / offline: noticed from the calls that fail, left by a probe that succeeds.

A call that finds S3 unreachable (refused, reset or unresolvable after the store's two quick
retries; or not answering within its timeout) switches the mount to offline. Calls still waiting
on S3 at that moment stop waiting (``waiting`` scopes, ``on_offline`` callbacks); while offline,
calls fail at once with Unreachable instead of waiting on a dead network, and a background probe
asks S3 again, with a growing interval, until it answers.
"""
from __future__ import annotations

import logging
import time

import trio

log = logging.getLogger(__name__)

PROBE_FIRST = 0.5
PROBE_MAX = 10.0


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

    def unreachable(self, why: str) -> None:
        if self.online:
            self.online = False
            self.since = time.time()
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
