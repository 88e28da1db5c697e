"""Data files on disk: opening, making durable, sweeping strays, the space reserve, hashing.

Everything here runs in worker threads or touches nothing but paths and descriptors: no
catalog, no objects in use.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
from pathlib import Path

from .objects import SIDECARS

log = logging.getLogger(__name__)


def open_data_file(path: Path, size: int, mode: int) -> tuple[int, bool]:
    """Open or create a data file of ``size`` bytes (sparse). Returns (fd, size_was_wrong).
    Safe in a worker thread: it touches nothing but this path."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    st = os.fstat(fd)
    wrong = st.st_size != size
    if wrong:
        os.ftruncate(fd, size)
    if st.st_mode & 0o777 != mode:
        os.fchmod(fd, mode)
    return fd, wrong


def _syncfs_function():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_function()


def fsync_all(fds: list[int], dir_fd: int) -> None:
    """Make the data of ``fds`` durable. Many files: one syncfs (one journal commit) costs far
    less than an fsync each, which would also stall every file creation behind the journal."""
    if len(fds) > 4 and _SYNCFS is not None:
        if _SYNCFS(dir_fd) == 0:
            return
        log.debug("syncfs failed (errno %d); fsyncing each file", ctypes.get_errno())
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise



def sweep_files(cache_dir: Path, known: set[str], before: float) -> int:
    """Delete data files older than ``before`` that no catalog row names (a crash between
    creating a file and recording it). Runs in a thread; only sees paths and a set of names.
    Plain strings and scandir, no Path per file: with 100,000 objects cached, pathlib made this
    1.5 s of CPU (holding the GIL against the mount's requests) after every mount."""
    removed = 0
    try:
        subs = os.scandir(cache_dir / "data")
    except (FileNotFoundError, NotADirectoryError):
        return 0
    with subs:
        for sub in subs:
            if not sub.is_dir():
                continue
            head = f"data/{sub.name}/"
            with os.scandir(sub.path) as files:
                for f in files:
                    owner = f.name
                    for x in SIDECARS:
                        if owner.endswith(x):
                            owner = owner[:-len(x)]
                            break
                    if head + owner in known:
                        continue
                    try:
                        if f.stat().st_mtime < before:
                            os.unlink(f.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
    return removed


def unlink_all(paths: list[str]) -> None:
    """In a worker thread: delete these files (gone already is fine)."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def reserve_bytes(fs_total: int) -> int:
    return min(64 << 20, max(4 << 20, fs_total // 100))


def check_reserve(fd: int) -> None:
    """Before writing into the cache (a worker thread between pieces of a download, or a write
    through the mount): fail with ENOSPC when the cache's disk is nearly full, so that the
    catalog can still record what is cached and dirty (SQLite needs room to commit). The
    reserve is 1% of the disk, at least 4 MiB and at most 64 MiB; downloads running in
    parallel may each write one more piece (1 MiB) into it."""
    st = os.fstatvfs(fd)
    if st.f_bavail * st.f_frsize < reserve_bytes(st.f_blocks * st.f_frsize):
        raise OSError(errno.ENOSPC, "No space left on device (the rest is kept for the cache's "
                                    "catalog)")


def md5_of(fd: int, size: int) -> str:
    """The MD5 of the first ``size`` bytes of ``fd`` (in a worker thread)."""
    h = hashlib.md5(usedforsecurity=False)
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(8 << 20, size - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()
