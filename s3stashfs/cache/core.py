"""The Cache: the cache directory, its catalog, and the objects in use.

Nothing is scanned at mount time: rows are checked against their data file when first used,
stray files are swept and the size of an older catalog is computed in the background.
Local changes (writes through the mount) live here until uploaded; blocks fetched reach the
catalog only after an fsync (``sync``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import time
from pathlib import Path

import trio

from .. import crashpoints
from ..checksums import describe_verified
from ..config import DEFAULT_CACHE_MIN_FREE, Space
from ..store import ObjectInfo
from .catalog import Catalog, Row
from .files import fsync_all, open_data_file, sweep_files
from .integrity import IntegrityMixin
from .objects import BLOCK_SIZE, SIDECARS, CachedObject, data_name
from .ranges import RangeSet
from .space import SpaceMixin

log = logging.getLogger(__name__)

SYNC_INTERVAL = 1.0
ERROR_REPEAT = 60.0  # seconds before the same error about the same file is recorded again


class Cache(SpaceMixin, IntegrityMixin):
    """The cache directory: catalog, data files, and the objects in use.

    Owns ``_objects`` ((bucket, key) -> the current CachedObject in use: open, fetching,
    unsynced or dirty) and ``_retired`` (replaced versions still open or syncing); the mixins
    (space.py: limits and eviction; integrity.py: sums and verify) work on the same state."""

    def __init__(self, cache_dir: Path, origin: str, file_mode: int = 0o600,
                 max_size: int | None = None, min_free: Space = DEFAULT_CACHE_MIN_FREE):
        self.dir = cache_dir
        self.origin = origin
        self.file_mode = file_mode
        self.max_size = max_size or None
        self.min_free = min_free
        self._limits_wanted = trio.Event()
        self._sync_lock = trio.Lock()
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
        self._damaged: dict[str, set[int]] = {}  # data file -> blocks dropped by a failed check

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
            assert obj.row.id is not None  # an object's row is read from or put in the catalog
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
            obj.row.verified_by = "upload"
            obj.retry_delay = 0.0
            if obj.summed_gen != gen:  # no sums of exactly these bytes: none rather than wrong
                self._drop_sums(obj)
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
        """What the cache holds of an object: complete (and how it was verified against S3),
        partial N/M (blocks), dirty, or none."""
        obj = self._objects.get((bucket, key))
        row = obj.row if obj is not None else self.catalog.get(self.origin, bucket, key)
        if row is None:
            return "none"
        if row.dirty:
            return "dirty"
        present = obj.present if obj is not None else RangeSet.from_bytes(row.ranges)
        n = (row.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        have = sum(min(e, n) - min(s, n) for s, e in present)
        if have < n:
            return f"partial {have}/{n}"
        if not row.size:
            return "complete (empty)"
        return f"complete, {describe_verified(row.verified, row.verified_by, row.etag)}"

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
            assert row.id is not None  # read from the catalog
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
            if obj.fd is not None and not obj.local_bytes:  # its files go next: keep its sums
                self.ensure_sums(obj)
                self._old_sums(obj)
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
        self._close_sums(obj)

    def _unlink(self, rel: str) -> None:
        self._damaged.pop(rel, None)
        for name in (rel, *(rel + x for x in SIDECARS)):
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass

    def _set_aside(self, rel: str) -> list[str]:
        """Rename a data file and its sidecars, in their directory, to a random name that no
        row has (to be unlinked off the event loop; a crash leaves them to the sweep). Returns
        their new paths."""
        self._damaged.pop(rel, None)
        head, _, _ = rel.rpartition("/")  # data/ab
        new = f"{head}/{head[-2:]}{os.urandom(19).hex()}"
        out = []
        for suffix in ("", *SIDECARS):
            try:
                os.rename(self.dir / (rel + suffix), self.dir / (new + suffix))
            except FileNotFoundError:
                continue
            out.append(str(self.dir / (new + suffix)))
        return out

    def release(self, obj: CachedObject) -> None:
        obj.opens -= 1
        self.release_if_idle(obj)

    def release_if_idle(self, obj: CachedObject) -> None:
        if not obj.idle():
            return
        if obj.current:
            if self._objects.get((obj.bucket, obj.key)) is obj:
                del self._objects[(obj.bucket, obj.key)]
                assert obj.row.id is not None  # an object's row is read from or put in the catalog
                self.catalog.update_state([(obj.row.id, obj.present.to_bytes(), obj.complete,
                                            obj.row.verified, obj.last_access)])
        else:
            self._retired.discard(obj)
        self._close_file(obj)
        if self._over_warned:  # over the limits with nothing to evict: now there may be
            self._nudge()

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
        """fsync the data files with new blocks, then record those blocks in the catalog.
        One at a time: a caller that wants the figures current (``status``, ``pin``) must not
        return while the periodic sync still has its objects' blocks on the way to the catalog."""
        async with self._sync_lock:
            await self._sync()

    async def _sync(self) -> None:
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
            # all of objs: none has closed its file since they were chosen (no await since)
            fds = [o.fd for o in objs if o.fd is not None]
            fds += [o.sums_fd for o in objs if o.sums_fd is not None]
            await trio.to_thread.run_sync(fsync_all, fds, self._dir_fd)
            crashpoints.hit("cache.sync_fsynced")
            for o, r, c, _v, a, whole in snaps:
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

    # ------------------------------------------------------------ errors, pins, closing
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

    async def _sweep(self) -> None:
        started = time.time()
        try:
            known = self.catalog.all_files()
            removed = await trio.to_thread.run_sync(sweep_files, self.dir, known, started)
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
