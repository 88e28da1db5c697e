"""Crash points: a test hook that kills the mount with SIGKILL at a named place in its code.

Crash safety is tested, not assumed (tests/test_crash.py): the code calls ``hit("NAME")`` at
the places where a crash matters (between an upload and the catalog's record of it, between an
fsync and the SQLite commit, between dropping an object's blocks and deleting its file, ...).
With ``S3STASHFS_CRASH_AT=NAME:N`` in the daemon's environment (read by ``arm`` when the mount
starts), the Nth call of ``hit("NAME")`` logs one line and kills the process with SIGKILL:
deterministic, no timing. Without it (always, outside tests) ``hit`` is one comparison.
Hits may run in worker threads; the count is kept under a lock.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

ENV = "S3STASHFS_CRASH_AT"

_name: str | None = None  # the armed point; None: every hit is a no-op
_nth = 0
_count = 0
_lock = threading.Lock()


def arm(environ=os.environ) -> None:
    """Read ``S3STASHFS_CRASH_AT`` (``NAME`` or ``NAME:N``, N >= 1, default 1)."""
    global _name, _nth, _count
    spec = environ.get(ENV, "").strip()
    if not spec:
        _name = None
        return
    name, _, n = spec.partition(":")
    if not name or not (n or "1").isdigit() or int(n or 1) < 1:
        raise ValueError(f"{ENV}={spec}: expected NAME or NAME:N, N >= 1")
    _name, _nth, _count = name, int(n or 1), 0
    log.info("test hook: %s=%s, this process kills itself there", ENV, spec)


def hit(name: str) -> None:
    """A crash point: the process dies here if it is the armed one, the Nth time."""
    if name != _name:
        return
    global _count
    with _lock:
        _count += 1
        if _count != _nth:
            return
        log.warning("crash point %s:%d reached: SIGKILL (test hook %s)", name, _count, ENV)
        for h in logging.getLogger().handlers:
            h.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()  # never returns: the signal is on its way
