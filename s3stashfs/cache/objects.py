"""A cached object: one (bucket, key, ETag), its data file, and which of its blocks are present.

A cached object is (bucket, key, ETag): bytes cached under one ETag are never served for another.
The data file holds the object's bytes at their own offsets and is named by a hash of
(origin, bucket, key, ETag), never by the key's text (``data_name``).
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .catalog import Row
from .ranges import RangeSet

if TYPE_CHECKING:
    from ..uploads import _Stream

BLOCK_SIZE = 64 * 1024
SUMS_SUFFIX = ".crc32c"  # the sums sidecar: a CRC32C per block (see integrity.py)
OLD_SUMS_SUFFIX = ".crc"  # a zlib CRC32 per block, written by earlier versions: read, never written
SIDECARS = (SUMS_SUFFIX, OLD_SUMS_SUFFIX)
INDEX_SUFFIXES = (".bai", ".csi", ".tbi", ".crai", ".fai", ".gzi")


def is_index(key: str) -> bool:
    return key.lower().endswith(INDEX_SUFFIXES)


def data_name(*parts: str) -> str:
    h = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
    return f"data/{h[:2]}/{h}"


class Fetch:
    """One GET in flight, covering blocks [start, end) of one object."""

    __slots__ = ("start", "end", "done", "error")

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.done = False
        self.error: BaseException | None = None


class CachedObject:
    """One (bucket, key, ETag) in the cache.

    Owns: the data file's descriptor, the blocks present (``present``, served at once), the blocks
    fetched but not yet fsync'ed (``unsynced``), and the fetches in flight (``inflight``, block ->
    Fetch). Invariant: a block is in ``present`` only once its bytes are in the data file, and it
    reaches the catalog only after an fsync. ``changed`` is replaced and set whenever blocks
    arrive or a fetch ends, waking every reader waiting on this object.
    """

    def __init__(self, row: Row, path: Path):
        self.row = row
        self.path = path
        self.present = RangeSet.from_bytes(row.ranges)
        self.unsynced = False
        self.inflight: dict[int, Fetch] = {}
        self.changed = trio.Event()
        self.fd: int | None = None
        self.sums_fd: int | None = None  # the sums sidecar, opened by fetches and checked reads
        self.old_sums_fd: int | None = None  # an earlier version's sidecar (-1: there is none)
        self.summing: trio.Event | None = None  # set while a thread sums the whole file
        self.summed_gen = 0  # the local generation whose sums the sidecar holds (uploads)
        self.opens = 0
        self.current = True  # False once a newer version replaced it in the cache
        self.verifying = False
        self.syncing = False
        self.last_access = row.last_access
        # local changes (writes through the mount): see Cache.make_local
        self.gen = 0  # bumped by every change to the local bytes
        self.uploaded_gen = 0  # the generation S3 has
        self.writers = 0  # handles open for writing
        self.row_changed = False  # the row itself (size, dirty, etag) must be written
        self.unlinked = False  # deleted while open: its later flushes upload nothing
        self.lock = trio.Lock()  # an upload reads the file: writes wait for it
        self.retry_at = 0.0
        self.retry_delay = 0.0
        self.seq_end = -1  # where the next write must land to keep the file "front to back"
        self.stream: _Stream | None = None  # parts uploaded while the file is written
        self.journaled_gen = 0  # the generation whose close put it in the journal's order
        self.last_error: str | None = None  # why its last upload failed

    bucket = property(lambda self: self.row.bucket)
    key = property(lambda self: self.row.key)
    etag = property(lambda self: self.row.etag)
    size = property(lambda self: self.row.size)

    @property
    def nblocks(self) -> int:
        return (self.row.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    @property
    def complete(self) -> bool:
        return self.present.covers(0, self.nblocks)

    def mark(self, start: int, end: int) -> None:
        """Blocks [start, end) are now in the data file."""
        self.present.add(start, end)
        self.unsynced = True
        self.wake()

    def wake(self) -> None:
        ev, self.changed = self.changed, trio.Event()
        ev.set()

    def drop_all(self) -> None:
        """Forget every present block (bad checksum): they will be fetched again."""
        self.present.clear()
        self.row.verified = False
        self.row.verified_by = None
        self.unsynced = self.row_changed = True
        self.wake()

    @property
    def dirty(self) -> bool:
        return self.row.dirty

    @property
    def local_bytes(self) -> bool:
        """Its bytes are the user's, written through the mount: not in S3 yet (dirty), or no
        longer anyone's (unlinked while open). They have no sums to check them against."""
        return self.row.dirty or (self.unlinked and self.gen > 0)

    def idle(self) -> bool:
        """Nothing holds it in memory: not open, fetching, unsynced, or dirty."""
        return (self.opens == 0 and not self.inflight and not self.unsynced and not self.verifying
                and not self.syncing and not self.row.dirty and not self.row_changed
                and self.summing is None)

    def changed_locally(self, new_size: int) -> None:
        """The local bytes changed (a write, a truncate): all of it is present by definition."""
        self.row.size = new_size
        self.present = RangeSet([(0, self.nblocks)])
        self.row.mtime_ns = time.time_ns()
        self.changed_meta()

    def changed_meta(self) -> None:
        """Something S3 must learn changed locally (bytes, or metadata of a dirty file)."""
        self.row.dirty = True
        self.gen += 1
        self.row_changed = True
        self.unsynced = True
