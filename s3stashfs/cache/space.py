"""Space: the cache's size limits, eviction, prune and clear, and what it holds.

Size limits: the catalog keeps a running total of the bytes held. When it exceeds
``max_size``, or the disk has less than ``min_free`` free, whole objects are evicted, least
recently accessed first and index files last; never a dirty, pinned or in-use one (in use: in
``_objects``, i.e. open, fetching, syncing or not yet recorded, or a retired version).
"""
from __future__ import annotations

import functools
import logging
import os
import sqlite3
from typing import TYPE_CHECKING

import trio

from .. import crashpoints
from ..errors import first_error
from .catalog import Candidate
from .files import reserve_bytes, unlink_all
from .objects import is_index

if TYPE_CHECKING:
    from ..config import Space
    from .catalog import Catalog
    from .objects import CachedObject

log = logging.getLogger(__name__)

LIMITS_INTERVAL = 10.0  # free space is checked this often even when nothing is fetched
# objects dropped between checkpoints: each drop renames its files on the trio thread (about a
# millisecond on a busy disk), and 64 in a row stalled reads of cached files by 0.15 s. Each
# batch is queried right before it is dropped: no request changes a candidate in between.
EVICT_BATCH = 8
UNLINKERS = 2  # evicted batches whose files are unlinked at once, while the next are dropped
FILL_BATCH = 500  # rows of an older catalog sized between checkpoints


class SpaceMixin:
    """The Cache's limits and eviction (see ``Cache`` for the state it uses)."""

    # set by Cache.__init__
    catalog: Catalog
    origin: str
    max_size: int | None
    min_free: Space
    _dir_fd: int
    _limits_wanted: trio.Event
    _over_warned: bool
    _busy_files: set[str]
    _objects: dict[tuple[str, str], CachedObject]
    _retired: set[CachedObject]

    if TYPE_CHECKING:  # Cache's
        def _unlink(self, rel: str) -> None: ...

        def _set_aside(self, rel: str) -> list[str]: ...

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
        unlinkers = trio.CapacityLimiter(UNLINKERS)
        # returns once the files are gone (the caller wants the space), but the catalog is
        # under the limit sooner: batches are dropped while earlier ones are being unlinked
        try:
            async with trio.open_nursery() as unlinks:
                for indexes in (False, True):  # index files only once nothing else is left
                    after = (float("-inf"), 0)
                    while freed < excess:
                        batch = self.catalog.evictable(after, EVICT_BATCH)
                        if not batch:
                            break
                        after = (batch[-1].last_access, batch[-1].id)
                        chosen: list[Candidate] = []
                        for c in batch:
                            if freed >= excess:
                                break
                            if is_index(c.key) == indexes and self._may_drop(c):
                                chosen.append(c)
                                freed += c.held
                        doomed = self._drop_many(chosen)
                        # freeing a large file's blocks takes the file system a while: not on the
                        # thread that answers every request
                        if doomed:
                            unlinks.start_soon(functools.partial(trio.to_thread.run_sync, unlink_all, doomed,
                                                                 limiter=unlinkers))
                        await trio.sleep(0)  # requests go first
        except BaseExceptionGroup as eg:  # the caller gets the error, as it would without
            raise first_error(eg) from None  # the nursery (OSError, sqlite3.Error, Cancelled)
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

    def _drop(self, c: Candidate, later: bool = False) -> list[str]:
        """Forget the row's blocks, then delete its files (a crash in between leaves a file the
        row claims nothing of). The row stays: listings and offline lookups still know it.

        ``later``: the files are only renamed out of the way (at once, so that a new fetch of
        the same version starts a new file) and their paths returned, for the caller to unlink
        in a worker thread; the sweep at the next mount removes any a crash left."""
        self.catalog.drop_blocks(c.id)
        crashpoints.hit("cache.evict_dropped")
        if not later:
            self._unlink(c.file)
            return []
        return self._set_aside(c.file)

    def _drop_many(self, batch: list[Candidate]) -> list[str]:
        """``_drop(c, later=True)`` of each candidate, their rows in one transaction."""
        if not batch:
            return []
        self.catalog.drop_blocks_many([c.id for c in batch])
        for _ in batch:
            crashpoints.hit("cache.evict_dropped")
        return [p for c in batch for p in self._set_aside(c.file)]

    # ------------------------------------------------------------ maintenance
    def usage(self) -> dict:
        """What the cache holds (recorded blocks; the last second's fetches may be missing)."""
        self._fill_now()
        free, total = self.disk_space()
        out: dict[str, int | None] = dict(self.catalog.usage())
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
