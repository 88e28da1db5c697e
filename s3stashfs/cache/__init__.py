"""The local cache: hash-named data files, the catalog, and which blocks are present.

A cached object is (bucket, key, ETag): bytes cached under one ETag are never served for another.
The data file holds the object's bytes at their own offsets and is named by a hash of
(origin, bucket, key, ETag), never by the key's text. Beside it, ``<file>.crc`` holds a CRC32 of
each 64 KiB block fetched by ranged GETs (4 bytes at offset 4 * block; 0 = no sum), written by
the worker thread that wrote the block and fsync'ed with it, so that ``verify`` can check a
partly cached object. Nothing is scanned at mount time: rows are checked against their data file
when first used, stray files are swept and the size of an older catalog is computed in the
background.

Size limits: the catalog keeps a running total of the bytes held. When it exceeds
``max_size``, or the disk has less than ``min_free`` free, whole objects are evicted, least
recently accessed first and index files last; never a dirty, pinned or in-use one (in use: in
``_objects``, i.e. open, fetching, syncing or not yet recorded, or a retired version).
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import logging
import os
import sqlite3
import struct
import time
import zlib
from pathlib import Path

import trio

from .. import crashpoints
from ..config import DEFAULT_CACHE_MIN_FREE, Space
from ..store import ObjectInfo, is_md5_etag
from .catalog import Candidate, Catalog, Row
from .ranges import RangeSet

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024
SYNC_INTERVAL = 1.0
LIMITS_INTERVAL = 10.0  # free space is checked this often even when nothing is fetched
EVICT_BATCH = 64  # objects dropped between checkpoints (unlinks run on the trio thread)
FILL_BATCH = 500  # rows of an older catalog sized between checkpoints
SUMS_SUFFIX = ".crc"
INDEX_SUFFIXES = (".bai", ".csi", ".tbi", ".crai", ".fai", ".gzi")


def is_index(key: str) -> bool:
    return key.lower().endswith(INDEX_SUFFIXES)


def data_name(*parts: str) -> str:
    h = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
    return f"data/{h[:2]}/{h}"


ERROR_REPEAT = 60.0  # seconds before the same error about the same file is recorded again

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
        self.sums_fd: int | None = None  # the .crc sidecar, opened for ranged fetches
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
        self.stream = None  # uploads._Stream: parts uploaded while the file is written
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
        self.unsynced = True
        self.wake()

    @property
    def dirty(self) -> bool:
        return self.row.dirty

    def idle(self) -> bool:
        """Nothing holds it in memory: not open, fetching, unsynced, or dirty."""
        return (self.opens == 0 and not self.inflight and not self.unsynced and not self.verifying
                and not self.syncing and not self.row.dirty and not self.row_changed)

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


class Cache:
    """The cache directory: catalog, data files, and the objects in use."""

    def __init__(self, cache_dir: Path, origin: str, file_mode: int = 0o600,
                 max_size: int | None = None, min_free: Space = DEFAULT_CACHE_MIN_FREE):
        self.dir = cache_dir
        self.origin = origin
        self.file_mode = file_mode
        self.max_size = max_size or None
        self.min_free = min_free
        self._limits_wanted = trio.Event()
        self._over_warned = False  # "over the limit, nothing evictable" is logged once
        self._sync_failed = ""  # the last sync error, logged once until a sync succeeds
        self._busy_files: set[str] = set()  # data files verify is reading
        for d in (cache_dir, cache_dir / "data"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.catalog = Catalog(cache_dir / "catalog.sqlite3", file_mode)
        self._dir_fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._objects: dict[tuple[str, str], CachedObject] = {}
        self._retired: set[CachedObject] = set()  # replaced versions still open or syncing
        self._errors_seen: dict[tuple[str, str, str], float] = {}  # record_error's last times

    # ------------------------------------------------------------ objects
    def current(self, bucket: str, key: str) -> CachedObject | None:
        return self._objects.get((bucket, key))

    def open_object(self, bucket: str, key: str, info: ObjectInfo,
                    opening: bool = True) -> tuple[CachedObject, bool]:
        """The cache entry for this version of the object, opened for reading (or, with
        ``opening=False``, only looked up, to be prefetched).

        Returns (object, same_version): ``same_version`` is False when the cache held another
        ETag, whose bytes are now dropped (so the kernel's page cache must be dropped too)."""
        obj = self._objects.get((bucket, key))
        same = True
        if obj is not None and obj.dirty:
            pass  # local changes win over S3's version until they are uploaded
        elif obj is None:
            row = self.catalog.get(self.origin, bucket, key)
            if row is not None and (row.etag == info.etag or row.dirty):
                obj = CachedObject(row, self.dir / row.file)
            else:
                same = False
                obj = self._new_version(bucket, key, info, row)
        elif obj.etag != info.etag:
            self._retire(obj)
            obj = self._new_version(bucket, key, info, obj.row)
            same = False
        self._objects[(bucket, key)] = obj
        if obj.fd is None and len(obj.present):
            self.ensure_open(obj)  # a new version's file is made by the first fetch, off this thread
        obj.opens += opening
        if opening:  # a prefetch is not an access
            obj.last_access = time.time()
        if info.from_head and obj.row.metadata != dict(info.metadata):
            obj.row.metadata, obj.row.mtime_ns = dict(info.metadata), info.mtime_ns
            self.catalog.set_metadata(obj.row.id, info.mtime_ns, obj.row.metadata)
        return obj, same

    # ------------------------------------------------------------ local changes
    def create_local(self, bucket: str, key: str, base_etag: str | None) -> CachedObject:
        """A new, empty local version of ``key`` (create, or open with O_TRUNC), replacing any
        cached one. ``base_etag``: the version in S3 it replaces ('' = none: a new file); its
        upload is conditional on S3 still having that."""
        old = self._objects.get((bucket, key))
        base = old.row if old is not None else self.catalog.get(self.origin, bucket, key)
        row = Row(id=None, origin=self.origin, bucket=bucket, key=key,
                  etag=base.etag if base is not None else "", size=0, mtime_ns=time.time_ns(),
                  metadata=base.metadata if base is not None else None,
                  file=data_name(self.origin, bucket, key, "local", os.urandom(8).hex()),
                  block_size=BLOCK_SIZE, dirty=True, last_access=time.time(),
                  base_etag=base_etag, pinned=self._pinned(bucket, key, base))
        self.catalog.put(row)
        crashpoints.hit("cache.local_created")
        if old is not None:
            self._retire(old)
        if base is not None and base.file != row.file:
            self._unlink(base.file)
        obj = CachedObject(row, self.dir / row.file)
        obj.gen = 1
        obj.seq_end = 0
        self._objects[(bucket, key)] = obj
        self.ensure_open(obj)
        return obj

    def make_local(self, obj: CachedObject) -> None:
        """A complete cached version becomes the local one that writes change. Its file keeps
        its name: the caller makes the row durable (``sync_one``) before changing a byte, or a
        crash would leave changed bytes under a clean row, served as S3's and never uploaded."""
        if not obj.row.dirty:
            obj.row.base_etag = obj.row.etag  # the version the change is based on
            self._drop_sums(obj)  # its bytes will no longer be the ones summed
            obj.row.dirty = True
            obj.row_changed = True
            obj.unsynced = True

    def uploaded(self, obj: CachedObject, gen: int, etag: str) -> None:
        """S3 now has generation ``gen`` of the local bytes, as ``etag``."""
        obj.row.etag = etag
        obj.row.base_etag = etag  # later changes are based on what S3 now has
        obj.uploaded_gen = gen
        if obj.gen == gen:
            obj.row.dirty = False
            obj.row.verified = True
            obj.retry_delay = 0.0
        obj.row_changed = True
        obj.unsynced = True

    def retag(self, bucket: str, key: str, old_etag: str, etag: str, metadata: dict) -> None:
        """The object's metadata changed in place: same bytes, new ETag; keep what is cached."""
        obj = self._objects.get((bucket, key))
        row = obj.row if obj is not None else self.catalog.get(self.origin, bucket, key)
        if row is None or row.etag != old_etag or row.dirty:
            return
        row.etag, row.metadata = etag, dict(metadata)
        if obj is not None:
            obj.row_changed = obj.unsynced = True
        else:
            self.catalog.put(row)

    def move(self, bucket: str, key: str, new_key: str, etag: str | None = None) -> None:
        """The object at ``key`` is now at ``new_key`` (rename): its cached bytes, local changes
        included, move with it; ``etag`` is the copy's (None: unchanged)."""
        self.forget_object(bucket, new_key)
        obj = self._objects.pop((bucket, key), None)
        row = obj.row if obj is not None else self.catalog.get(self.origin, bucket, key)
        if row is None:
            return
        row.key = new_key
        if etag is not None and not row.dirty:
            row.etag = etag
        if row.id is not None:
            self.catalog.rekey(row.id, new_key, row.etag)
            if row.dirty:
                self.catalog.journal_rekey(self.origin, bucket, key, new_key)
        if obj is not None:
            self._objects[(bucket, new_key)] = obj

    async def move_queued(self, obj: CachedObject, new_key: str, base_etag: str | None,
                          delete_base: str | None) -> None:
        """An offline rename (queue mode) of a complete cached version or a local one: ``obj``
        becomes a local change at ``new_key`` based on ``base_etag`` (what S3 has there; ''
        nothing), and the journal gets its upload and then, unless ``delete_base`` is None,
        the delete of the old key on the condition that S3 still has version ``delete_base``.
        Durable when it returns: the bytes are fsync'ed first, then the row and the journal
        change in one catalog transaction."""
        bucket, old_key = obj.bucket, obj.key
        await trio.to_thread.run_sync(os.fsync, self.ensure_open(obj))
        row = dataclasses.replace(obj.row, key=new_key, base_etag=base_etag, dirty=True,
                                  ranges=obj.present.to_bytes(), complete=obj.complete)
        changes = [(new_key, "upload", base_etag)]
        if delete_base is not None:
            changes.append((old_key, "delete", delete_base))
        old_file = self.catalog.move_queued(row, old_key, changes)
        # durable: now the objects in memory follow
        target = self._objects.pop((bucket, new_key), None)
        if target is not None and target is not obj:  # replaced: an open descriptor keeps it
            target.unlinked = True
            target.row.dirty = False
            target.row_changed = False
            self._retire(target)
        if old_file is not None and old_file != row.file:
            self._unlink(old_file)
        if self._objects.get((bucket, old_key)) is obj:
            del self._objects[(bucket, old_key)]
        if not obj.row.dirty:
            self._drop_sums(obj)  # its bytes are a local change now, no longer the ones summed
        for f in ("key", "base_etag", "dirty", "ranges", "complete"):
            setattr(obj.row, f, getattr(row, f))
        obj.changed_meta()  # the new name has nothing in S3 yet
        obj.journaled_gen = obj.gen
        obj.retry_at = 0.0
        self._objects[(bucket, new_key)] = obj

    def describe(self, bucket: str, key: str) -> str:
        """What the cache holds of an object: complete, partial N/M (blocks), dirty, or none."""
        obj = self._objects.get((bucket, key))
        row = obj.row if obj is not None else self.catalog.get(self.origin, bucket, key)
        if row is None:
            return "none"
        if row.dirty:
            return "dirty"
        present = obj.present if obj is not None else RangeSet.from_bytes(row.ranges)
        n = (row.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        have = sum(min(e, n) - min(s, n) for s, e in present)
        return "complete" if have >= n else f"partial {have}/{n}"

    def forget_object(self, bucket: str, key: str) -> None:
        """The object is gone (unlinked): drop its row and data file. An open descriptor keeps
        working on the unlinked file."""
        obj = self._objects.pop((bucket, key), None)
        if obj is not None:
            obj.unlinked = True
            obj.row.dirty = False
            obj.row_changed = False
            self._retire(obj)
        row = self.catalog.get(self.origin, bucket, key)
        if row is not None:
            self.catalog.delete(row.id)
            self._unlink(row.file)
        self.catalog.journal_forget(self.origin, bucket, key, "upload")

    def pending_keys(self, op: str) -> set[tuple[str, str]]:
        """(bucket, key) of the journaled changes ``op`` ('delete', 'mkdir') not yet in S3."""
        return {(j["bucket"], j["key"]) for j in self.catalog.journal(self.origin)
                if j["op"] == op}

    def local_objects(self) -> list[CachedObject]:
        return [o for o in self._objects.values() if o.dirty]

    def load_dirty(self) -> list[CachedObject]:
        """At mount: every object with local changes not yet in S3 (after a crash too). Its
        data file is the truth: a write reaches the file before the periodic sync records the
        new size, so after a crash the row may say less (and opening the file would cut it)."""
        for row in self.catalog.dirty_rows(self.origin):
            if (row.bucket, row.key) not in self._objects:
                obj = CachedObject(row, self.dir / row.file)
                try:
                    size = os.stat(obj.path).st_size
                except FileNotFoundError:
                    size = row.size
                if size != row.size:
                    log.info("s3://%s/%s: the cache file holds %d bytes, the catalog said %d "
                             "(a crash came before it was recorded): the file's are kept",
                             row.bucket, row.key, size, row.size)
                    row.size = size
                    obj.row_changed = obj.unsynced = True
                obj.present = RangeSet([(0, obj.nblocks)])
                obj.gen = obj.journaled_gen = 1  # journaled (or older than the journal)
                self._objects[(row.bucket, row.key)] = obj
        return self.local_objects()

    def _new_version(self, bucket, key, info: ObjectInfo, old: Row | None) -> CachedObject:
        row = Row(id=None, origin=self.origin, bucket=bucket, key=key, etag=info.etag,
                  size=info.size, mtime_ns=info.mtime_ns,
                  metadata=dict(info.metadata) if info.from_head else None,
                  file=data_name(self.origin, bucket, key, info.etag), block_size=BLOCK_SIZE,
                  last_access=time.time(), pinned=self._pinned(bucket, key, old))
        self.catalog.put(row)  # the row now names the new file; the old one is unreferenced
        if old is not None and old.file != row.file:
            log.info("s3://%s/%s changed (ETag %s -> %s): cached bytes dropped", bucket, key,
                     old.etag, info.etag)
            self._unlink(old.file)
        return CachedObject(row, self.dir / row.file)

    def _pinned(self, bucket: str, key: str, old: Row | None) -> bool:
        """A new version of a key keeps the old one's pin (or the key's, if it had no row)."""
        if old is not None:
            return old.pinned
        return self.catalog.is_pinned(self.origin, bucket, key)

    def _retire(self, obj: CachedObject) -> None:
        obj.current = False
        if obj.idle():
            self._close_file(obj)
        else:
            self._retired.add(obj)

    def ensure_open(self, obj: CachedObject) -> int:
        """The data file's descriptor, opening (or creating) the file if need be."""
        if obj.fd is None:
            fd, wrong_size = open_data_file(obj.path, obj.size, self.file_mode)
            if wrong_size and len(obj.present):
                log.warning("cache file for s3://%s/%s has the wrong size: refetching",
                            obj.bucket, obj.key)
                obj.present.clear()
                obj.unsynced = True
            obj.fd = fd
        return obj.fd

    def ensure_sums(self, obj: CachedObject) -> int:
        """The checksum sidecar's descriptor, for a worker thread to write block sums into."""
        if obj.sums_fd is None:
            obj.sums_fd = os.open(str(obj.path) + SUMS_SUFFIX,
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
        return obj.sums_fd

    def _drop_sums(self, obj: CachedObject) -> None:
        if obj.sums_fd is not None:
            os.close(obj.sums_fd)
            obj.sums_fd = None
        try:
            os.unlink(str(obj.path) + SUMS_SUFFIX)
        except FileNotFoundError:
            pass

    def opener(self, obj: CachedObject):
        """A function a worker thread may call to create the data file: it sees only a path."""
        path, size, mode = obj.path, obj.size, self.file_mode
        return lambda: open_data_file(path, size, mode)[0]

    def adopt(self, obj: CachedObject, fd: int) -> None:
        """Take the descriptor a worker thread opened with ``opener``."""
        if obj.fd is None:
            obj.fd = fd
        elif obj.fd != fd:
            os.close(fd)

    def _close_file(self, obj: CachedObject) -> None:
        if obj.fd is not None:
            os.close(obj.fd)
            obj.fd = None
        if obj.sums_fd is not None:
            os.close(obj.sums_fd)
            obj.sums_fd = None

    def _unlink(self, rel: str) -> None:
        for name in (rel, rel + SUMS_SUFFIX):
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass

    def release(self, obj: CachedObject) -> None:
        obj.opens -= 1
        self.release_if_idle(obj)

    def release_if_idle(self, obj: CachedObject) -> None:
        if not obj.idle():
            return
        if obj.current:
            if self._objects.get((obj.bucket, obj.key)) is obj:
                del self._objects[(obj.bucket, obj.key)]
                self.catalog.update_state([(obj.row.id, obj.present.to_bytes(), obj.complete,
                                            obj.row.verified, obj.last_access)])
        else:
            self._retired.discard(obj)
        self._close_file(obj)
        if self._over_warned:  # over the limits with nothing to evict: now there may be
            self._nudge()

    def pread(self, obj: CachedObject, off: int, size: int) -> bytes:
        obj.last_access = time.time()  # recorded with the object's next catalog update
        return os.pread(self.ensure_open(obj), size, off)

    def advise_willneed(self, obj: CachedObject, off: int, size: int) -> None:
        """Start reading this part of the cache file into memory, without waiting."""
        try:
            os.posix_fadvise(self.ensure_open(obj), off, size, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    # ------------------------------------------------------------ durability
    async def sync_one(self, obj: CachedObject) -> None:
        """Make one object's local bytes and row durable now (before an upload is tried)."""
        obj.syncing = True
        try:
            await trio.to_thread.run_sync(os.fsync, self.ensure_open(obj))
            crashpoints.hit("cache.sync_one_fsynced")
            obj.row.ranges = obj.present.to_bytes()
            obj.row.complete = obj.complete
            self.catalog.put(obj.row)
            obj.row_changed = False
        finally:
            obj.syncing = False

    async def sync(self) -> None:
        """fsync the data files with new blocks, then record those blocks in the catalog."""
        # an object whose file a fetching thread has opened but not yet handed over waits for
        # the next round
        objs = [o for o in list(self._objects.values()) + list(self._retired)
                if o.unsynced and o.fd is not None]
        if not objs:
            return
        snaps = []
        for o in objs:
            snaps.append((o, o.present.copy(), o.complete, o.row.verified, o.last_access,
                          o.row_changed))
            o.unsynced = False
            o.row_changed = False
            o.syncing = True  # keep the descriptor open while the thread fsyncs it
        try:
            fds = [o.fd for o in objs] + [o.sums_fd for o in objs if o.sums_fd is not None]
            await trio.to_thread.run_sync(_fsync_all, fds, self._dir_fd)
            crashpoints.hit("cache.sync_fsynced")
            for o, r, c, v, a, whole in snaps:
                if whole and o.current and not o.unlinked:
                    o.row.ranges = r.to_bytes()
                    o.row.complete, o.row.last_access = c, a
                    self.catalog.put(o.row)
            self.catalog.update_state([(o.row.id, r.to_bytes(), c, v, a)
                                       for o, r, c, v, a, whole in snaps
                                       if o.current and not whole and o.row.id is not None])
            crashpoints.hit("cache.sync_recorded")
        except BaseException:
            for o, *_, whole in snaps:
                o.unsynced = True
                o.row_changed |= whole
            raise
        finally:
            for o in objs:
                o.syncing = False
                self.release_if_idle(o)
        if self._excess() > 0:  # new blocks recorded: make room if they took too much
            self._nudge()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: periodic sync, the sweep of data files no row names, sizing an older
        catalog, and keeping the cache within its limits."""
        task_status.started()
        async with trio.open_nursery() as n:
            n.start_soon(self._sweep)
            n.start_soon(self._limits)
            while True:
                await trio.sleep(SYNC_INTERVAL)
                try:
                    await self.sync()
                    self._sync_failed = ""
                except (OSError, sqlite3.Error) as e:  # retried next round; the mount goes on
                    if str(e) != self._sync_failed:  # once, not every second (a full disk)
                        log.error("syncing the cache failed: %s", e)
                    self._sync_failed = str(e)

    # ------------------------------------------------------------ size limits
    def disk_space(self) -> tuple[int, int]:
        """(free, total) bytes of the cache's filesystem, as an unprivileged user sees them."""
        st = os.statvfs(self._dir_fd)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def _excess(self, needed: int = 0) -> int:
        """Bytes to evict so that ``needed`` more fit within both limits (<= 0: none)."""
        free, total = self.disk_space()
        excess = self._min_free(total) + needed - free
        if self.max_size is not None and self.catalog.held_filled():
            excess = max(excess, self.catalog.total_held() + needed - self.max_size)
        return excess

    def _min_free(self, fs_total: int) -> int:
        """The free space eviction keeps: the setting, and never less than the reserve that
        writes into the cache leave for the catalog (see check_reserve)."""
        return max(self.min_free.of(fs_total), reserve_bytes(fs_total))

    def _nudge(self) -> None:
        self._limits_wanted.set()

    async def _limits(self) -> None:
        """Size an older catalog's rows, then keep the cache within its limits: when nudged
        (blocks were recorded) and every LIMITS_INTERVAL (other programs fill disks too)."""
        try:
            last: int | None = 0
            while not self.catalog.held_filled() and last is not None:
                last = self.catalog.fill_held(last, FILL_BATCH)
                await trio.sleep(0)
        except sqlite3.Error as e:
            log.error("sizing the cache failed: %s", e)
        while True:
            try:
                await self.make_room()
            except (OSError, sqlite3.Error) as e:
                log.error("evicting from the cache failed: %s", e)
            with trio.move_on_after(LIMITS_INTERVAL):
                await self._limits_wanted.wait()
            self._limits_wanted = trio.Event()

    async def make_room(self, needed: int = 0) -> int:
        """Evict until ``needed`` more bytes fit within the limits, or nothing more may go.
        Returns the bytes evicted."""
        excess = self._excess(needed)
        if excess <= 0:
            self._over_warned = False
            return 0
        freed = 0
        for indexes in (False, True):  # index files only once nothing else is left
            after = (float("-inf"), 0)
            while freed < excess:
                batch = self.catalog.evictable(after, EVICT_BATCH)
                if not batch:
                    break
                after = (batch[-1].last_access, batch[-1].id)
                for c in batch:
                    if freed >= excess:
                        break
                    if is_index(c.key) == indexes and self._may_drop(c):
                        self._drop(c)
                        freed += c.held
                await trio.sleep(0)
        if freed:
            log.info("cache: evicted %d bytes (least recently read first) to stay within its "
                     "limits", freed)
        if freed < excess and not self._over_warned:
            self._over_warned = True
            free, total = self.disk_space()
            log.warning("cache: over its limits (holds %d bytes, max %s; %d bytes free on its "
                        "disk, min %d) and nothing more can be evicted: the rest is dirty, "
                        "pinned or in use", self.catalog.total_held(), self.max_size, free,
                        self._min_free(total))
        elif freed >= excess:
            self._over_warned = False
        return freed

    def _may_drop(self, c: Candidate) -> bool:
        """Not dirty, and not in use by this mount (open, fetching, syncing, unrecorded)."""
        if c.dirty or c.file in self._busy_files:
            return False
        if c.origin == self.origin and (c.bucket, c.key) in self._objects:
            return False
        return not any(o.row.file == c.file for o in self._retired)

    def _drop(self, c: Candidate) -> None:
        """Forget the row's blocks, then delete its files (a crash in between leaves a file the
        row claims nothing of). The row stays: listings and offline lookups still know it."""
        self.catalog.drop_blocks(c.id)
        crashpoints.hit("cache.evict_dropped")
        self._unlink(c.file)

    # ------------------------------------------------------------ maintenance
    def usage(self) -> dict:
        """What the cache holds (recorded blocks; the last second's fetches may be missing)."""
        self._fill_now()
        free, total = self.disk_space()
        out = self.catalog.usage()
        out.update(bytes=self.catalog.total_held(), max_size=self.max_size,
                   min_free=self._min_free(total), disk_free=free, disk_total=total)
        return out

    def _fill_now(self) -> None:
        last: int | None = 0
        while not self.catalog.held_filled() and last is not None:
            last = self.catalog.fill_held(last, 10 * FILL_BATCH)

    def prune(self, older_than: float) -> dict:
        """Drop the clean, unpinned objects not in use last accessed before ``older_than``
        (epoch seconds), in every origin this cache directory holds."""
        return self._drop_matching(older_than, include_pinned=False)

    def clear(self, include_pinned: bool = False) -> dict:
        """Drop every clean object not in use (and not pinned, unless ``include_pinned``)."""
        return self._drop_matching(float("inf"), include_pinned)

    def _drop_matching(self, before: float, include_pinned: bool) -> dict:
        self._fill_now()
        out = {"objects": 0, "bytes": 0, "kept_dirty": 0, "kept_pinned": 0, "kept_open": 0}
        for c in self.catalog.holding(before):
            if c.dirty:
                out["kept_dirty"] += 1
            elif c.pinned and not include_pinned:
                out["kept_pinned"] += 1
            elif not self._may_drop(c):
                out["kept_open"] += 1
            else:
                self._drop(c)
                out["objects"] += 1
                out["bytes"] += c.held
        return out

    def record_error(self, bucket: str, key: str, message: str) -> None:
        """Keep an error about one file for ``status`` (the same one at most once a minute)."""
        now = time.monotonic()
        seen = (bucket, key, message)
        if now - self._errors_seen.get(seen, -ERROR_REPEAT) < ERROR_REPEAT:
            return
        if len(self._errors_seen) > 1000:
            self._errors_seen.clear()
        self._errors_seen[seen] = now
        self.catalog.add_event(self.origin, bucket, key, "error", message)

    def set_pinned(self, bucket: str, key: str, pinned: bool) -> None:
        """Pin (never evict, prune or clear without include_pinned) or unpin a key of this
        cache's origin. The pin is kept by key: it applies to a row cached later, and to new
        versions. Pinning does not fetch anything."""
        self.catalog.set_pinned(self.origin, bucket, key, pinned)
        obj = self._objects.get((bucket, key))
        if obj is not None:
            obj.row.pinned = pinned  # its next whole-row write must not undo the pin

    async def verify(self, progress=None) -> dict:
        """Re-check every cached object's bytes: each present block against its CRC32 (the
        .crc sidecar), or, without sums, a complete single-part object against its MD5 ETag.
        Bad blocks are dropped, so they are fetched again. Dirty objects are not touched.
        ``progress(objects_done, bytes_done)`` is called after each object. Hashing runs in
        worker threads."""
        self._fill_now()
        out: dict = {"objects": 0, "bytes": 0, "bad_blocks": 0, "bad_objects": [], "skipped": 0}
        for c in self.catalog.holding():
            if c.dirty:
                continue
            obj = self._objects.get((c.bucket, c.key)) if c.origin == self.origin else None
            if obj is not None and obj.dirty:
                continue
            row = obj.row if obj is not None else self.catalog.get(c.origin, c.bucket, c.key)
            if row is None or row.file != c.file:
                continue
            present = (obj.present if obj is not None else RangeSet.from_bytes(row.ranges)).copy()
            if not len(present):
                continue  # evicted since the listing: its file is gone
            md5 = (row.etag if is_md5_etag(row.etag) and present.covers(0, (row.size + BLOCK_SIZE - 1)
                                                                         // BLOCK_SIZE) else None)
            self._busy_files.add(row.file)
            try:
                bad, checked = await trio.to_thread.run_sync(
                    _check_file, self.dir / row.file, row.size, list(present), md5)
            except OSError as e:
                log.warning("cache verify: cannot read the cached bytes of s3://%s/%s: %s",
                            row.bucket, row.key, e)
                bad, checked = None, 0
            finally:
                self._busy_files.discard(row.file)
            if bad is None:
                out["skipped"] += 1
                continue
            out["objects"] += 1
            out["bytes"] += checked
            if bad:
                lost = self._drop_bad(c, row.file, bad)
                if lost:
                    out["bad_blocks"] += len(bad)
                    out["bad_objects"].append({"bucket": c.bucket, "key": c.key,
                                               "bad_bytes": lost})
                    log.error("cache verify: s3://%s/%s: %d cached blocks were damaged: "
                              "dropped, they will be fetched again", c.bucket, c.key, len(bad))
            if progress is not None:
                progress(out["objects"], out["bytes"])
        return out

    def _drop_bad(self, c: Candidate, file: str, bad: list[int]) -> int:
        """Drop blocks ``bad`` of the object whose file is ``file``, if it is still that object
        and still clean; returns the bytes dropped."""
        obj = self._objects.get((c.bucket, c.key)) if c.origin == self.origin else None
        if obj is not None and obj.row.file == file and not obj.dirty:
            present = obj.present
        elif obj is None:
            row = self.catalog.get(c.origin, c.bucket, c.key)
            if row is None or row.file != file or row.dirty:
                return 0
            present = RangeSet.from_bytes(row.ranges)
        else:
            return 0
        size = obj.size if obj is not None else row.size
        lost = 0
        for b in bad:
            if b in present:
                present.discard(b, b + 1)
                lost += min(BLOCK_SIZE, size - b * BLOCK_SIZE)
        if obj is not None:
            obj.row.verified = False
            obj.unsynced = True
            obj.wake()
        else:
            self.catalog.drop_blocks(row.id, present.to_bytes() if len(present) else None)
        return lost

    async def _sweep(self) -> None:
        started = time.time()
        try:
            known = self.catalog.all_files()
            removed = await trio.to_thread.run_sync(_sweep_files, self.dir, known, started)
        except (OSError, sqlite3.Error) as e:
            log.error("sweeping the cache directory failed: %s", e)
            return
        if removed:
            log.info("removed %d cache files no catalog row named", removed)

    async def close(self) -> None:
        await self.sync()
        for obj in list(self._objects.values()) + list(self._retired):
            self._close_file(obj)
        self.catalog.close()
        os.close(self._dir_fd)


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


def _fsync_all(fds: list[int], dir_fd: int) -> None:
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


def _sweep_files(cache_dir: Path, known: set[str], before: float) -> int:
    """Delete data files older than ``before`` that no catalog row names (a crash between
    creating a file and recording it). Runs in a thread; only sees paths and a set of names."""
    removed = 0
    data = cache_dir / "data"
    for sub in data.iterdir() if data.is_dir() else ():
        if not sub.is_dir():
            continue
        for f in sub.iterdir():
            rel = f"data/{sub.name}/{f.name}"
            owner = rel[:-len(SUMS_SUFFIX)] if rel.endswith(SUMS_SUFFIX) else rel
            try:
                if owner not in known and f.stat().st_mtime < before:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    return removed


def _check_file(path: Path, size: int, present: list[tuple[int, int]],
                md5: str | None) -> tuple[list[int] | None, int]:
    """In a worker thread: the present blocks of one data file whose bytes do not match their
    CRC32 in the sidecar, and the bytes checked. Without sums, a complete single-part object is
    checked against its MD5 (``md5``): all blocks are bad if it differs. (None, 0): nothing to
    check it against."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            with open(str(path) + SUMS_SUFFIX, "rb") as f:
                sums = f.read()
        except FileNotFoundError:
            sums = b""
        bad: list[int] = []
        checked = 0
        for start, end in present:
            b = start
            while b < end:
                n = min(end - b, 128)  # 8 MiB at a time
                data = memoryview(os.pread(fd, n * BLOCK_SIZE, b * BLOCK_SIZE))
                for i in range(n):
                    blk = b + i
                    want = sums[4 * blk:4 * blk + 4]
                    stored = struct.unpack("<I", want)[0] if len(want) == 4 else 0
                    if not stored:
                        continue  # no sum for this block
                    piece = data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
                    checked += len(piece)
                    if zlib.crc32(piece) != stored or len(piece) < min(BLOCK_SIZE,
                                                                       size - blk * BLOCK_SIZE):
                        bad.append(blk)
                b += n
        if checked or md5 is None:
            return (bad, checked) if checked else (None, 0)
        nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        return ([] if md5_of(fd, size) == md5 else list(range(nblocks))), size
    finally:
        os.close(fd)


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


def write_sums(fd: int, sums_fd: int, size: int, first: int, end: int) -> None:
    """In the worker thread that wrote blocks [first, end) of a data file: store their CRC32s
    in the sidecar, before the blocks are reported present. A sum of 0 is stored as 0 and
    means "no sum" (one block in 2**32 goes unchecked)."""
    while first < end:
        n = min(end - first, 128)
        data = memoryview(os.pread(fd, n * BLOCK_SIZE, first * BLOCK_SIZE))
        sums = b"".join(struct.pack("<I", zlib.crc32(data[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
                        for i in range(n))
        os.pwrite(sums_fd, sums, 4 * first)
        first += n


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
