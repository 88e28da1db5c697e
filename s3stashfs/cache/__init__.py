"""The local cache: hash-named data files, the catalog, and which blocks are present.

A cached object is (bucket, key, ETag): bytes cached under one ETag are never served for another.
The data file holds the object's bytes at their own offsets and is named by a hash of
(origin, bucket, key, ETag), never by the key's text. Nothing is scanned at mount time: rows are
checked against their data file when first used, and stray files are swept in the background.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import trio

from ..store import ObjectInfo
from .catalog import Catalog, Row
from .ranges import RangeSet

log = logging.getLogger(__name__)

BLOCK_SIZE = 64 * 1024
SYNC_INTERVAL = 1.0


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

    def __init__(self, cache_dir: Path, origin: str, file_mode: int = 0o600):
        self.dir = cache_dir
        self.origin = origin
        self.file_mode = file_mode
        for d in (cache_dir, cache_dir / "data"):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.catalog = Catalog(cache_dir / "catalog.sqlite3", file_mode)
        self._dir_fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._objects: dict[tuple[str, str], CachedObject] = {}
        self._retired: set[CachedObject] = set()  # replaced versions still open or syncing

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
                  base_etag=base_etag)
        self.catalog.put(row)
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
        """A complete cached version becomes the local one that writes change."""
        if not obj.row.dirty:
            obj.row.base_etag = obj.row.etag  # the version the change is based on
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
        """At mount: every object with local changes not yet in S3 (after a crash too)."""
        for row in self.catalog.dirty_rows(self.origin):
            if (row.bucket, row.key) not in self._objects:
                obj = CachedObject(row, self.dir / row.file)
                obj.present = RangeSet([(0, obj.nblocks)])
                obj.gen = obj.journaled_gen = 1  # journaled (or older than the journal)
                self._objects[(row.bucket, row.key)] = obj
        return self.local_objects()

    def _new_version(self, bucket, key, info: ObjectInfo, old: Row | None) -> CachedObject:
        row = Row(id=None, origin=self.origin, bucket=bucket, key=key, etag=info.etag,
                  size=info.size, mtime_ns=info.mtime_ns,
                  metadata=dict(info.metadata) if info.from_head else None,
                  file=data_name(self.origin, bucket, key, info.etag), block_size=BLOCK_SIZE,
                  last_access=time.time())
        self.catalog.put(row)  # the row now names the new file; the old one is unreferenced
        if old is not None and old.file != row.file:
            log.info("s3://%s/%s changed (ETag %s -> %s): cached bytes dropped", bucket, key,
                     old.etag, info.etag)
            self._unlink(old.file)
        return CachedObject(row, self.dir / row.file)

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

    def _unlink(self, rel: str) -> None:
        try:
            os.unlink(self.dir / rel)
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

    def pread(self, obj: CachedObject, off: int, size: int) -> bytes:
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
            fds = [o.fd for o in objs]
            await trio.to_thread.run_sync(_fsync_all, fds, self._dir_fd)
            for o, r, c, v, a, whole in snaps:
                if whole and o.current and not o.unlinked:
                    o.row.ranges = r.to_bytes()
                    o.row.complete, o.row.last_access = c, a
                    self.catalog.put(o.row)
            self.catalog.update_state([(o.row.id, r.to_bytes(), c, v, a)
                                       for o, r, c, v, a, whole in snaps
                                       if o.current and not whole and o.row.id is not None])
        except BaseException:
            for o, *_, whole in snaps:
                o.unsynced = True
                o.row_changed |= whole
            raise
        finally:
            for o in objs:
                o.syncing = False
                self.release_if_idle(o)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: periodic sync, and a sweep of data files no row names."""
        task_status.started()
        async with trio.open_nursery() as n:
            n.start_soon(self._sweep)
            while True:
                await trio.sleep(SYNC_INTERVAL)
                try:
                    await self.sync()
                except (OSError, sqlite3.Error) as e:  # retried next round; the mount goes on
                    log.error("syncing the cache failed: %s", e)

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
            try:
                if rel not in known and f.stat().st_mtime < before:
                    f.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
    return removed
