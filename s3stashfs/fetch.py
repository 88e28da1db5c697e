"""Getting bytes into the cache: ranged GETs pinned by If-Match, read-ahead, one fetch per block.

A read waits only for the blocks it touches. Small objects and index files are fetched whole
(and verified against their MD5 ETag or S3's full-object checksum before any byte is served;
others are checked once here, see verify.py). Larger objects are fetched in
blocks: a random read fetches just the blocks it touches; a sequential reader gets a read-ahead
window that doubles with each sequential read, up to MAX_WINDOW, fetched as parallel ranged GETs
of at most CHUNK bytes that stream into the data file and wake readers as each piece lands.
Concurrent readers of one block share one GET: a block is fetched by at most one Fetch at a time.
When the mount goes offline, readers stop waiting for fetches still under way (they fail with
Unreachable at once, unless an on-demand probe finds S3 back); those fetches end by their own
timeout, and what they did bring is kept. A fetch that broke off after S3 answered is retried
by the store from where it got to; only then does its reader get the error.
Every block written is summed (CRC32C) before it is reported present, and every read is checked
against those sums (``Cache.read_checked``): a block that fails is fetched again, or, while S3
cannot be reached, the read fails with EIO (Damaged).
"""
from __future__ import annotations

import errno
import logging
import os

import trio

from . import crashpoints
from .budget import ReadAheadBudget, Reader
from .cache import (BLOCK_SIZE, SUMS_SUFFIX, Cache, CachedObject, Fetch, check_reserve, is_index,
                    write_sums)
from .config import DEFAULT_READ_AHEAD_MEMORY
from .errors import Changed, Damaged, NoSpace, S3StashError, Unreachable
from .store import Store
from .verify import Verifier

log = logging.getLogger(__name__)

SMALL_OBJECT = 1 << 20  # objects up to this size are fetched whole on first read
INDEX_MAX = 64 << 20  # index files up to this size are fetched whole
CHUNK = 8 << 20  # largest single ranged GET of read-ahead
READ_AHEAD_AFTER = 512 << 10  # a sequential run gets read-ahead once it has read this much
FIRST_WINDOW = 1 << 20
MAX_WINDOW = 64 << 20
SEQ_SLACK_MIN = 128 << 10  # how near the run's end a read must be to continue it...
SEQ_SLACK_MAX = 8 << 20  # ...plus up to this much as the run grows (requests overtake)
TELL_EVERY = 1 << 20  # bytes of a ranged GET between wake-ups of the readers waiting on it
DISK_AHEAD = 16 << 20  # how far ahead a sequential reader has the cache file read from disk
REFETCHES = 2  # times a read fetches blocks again that failed their check before it gives up


class ReadState(Reader):
    """Per open file: where the last read ended, how long the sequential run is, and how far
    ahead of it fetches were started; and, as a ``budget.Reader``, the read-ahead it holds."""

    __slots__ = ("next_off", "streak", "ahead_upto", "disk_upto")

    def __init__(self):
        super().__init__()
        self.next_off = -1  # where the previous read ended; -1 before the first read
        self.streak = 0  # bytes read sequentially in the current run
        self.ahead_upto = 0  # block up to which read-ahead has been issued
        self.disk_upto = 0  # byte up to which the kernel was asked to read the cache file

    def note(self, off: int, end: int) -> bool:
        """Record a read of [off, end); True when it continues a sequential run.

        The kernel sends a sequential reader's requests concurrently, so they may arrive a
        little out of order: "sequential" means near where the run has got to, with a margin
        that grows with the run. A first read, or a jump, starts nothing ahead."""
        slack = SEQ_SLACK_MIN + min(self.streak, SEQ_SLACK_MAX)
        if self.next_off >= 0 and self.next_off - slack <= off <= self.next_off + slack:
            self.streak += end - off
            self.next_off = max(self.next_off, end)
            return True
        self.streak = 0
        self.ahead_upto = 0
        self.next_off = end
        return False

    @property
    def window(self) -> int:
        """Read-ahead: none for a short run (a region query: the kernel's own read-ahead is
        enough), then twice what the run has read so far, up to MAX_WINDOW."""
        if self.streak < READ_AHEAD_AFTER:
            return 0
        return min(MAX_WINDOW, max(FIRST_WINDOW, 2 * self.streak))


class _Grant:
    """The part of the budget a read-ahead fetch still holds: ``left`` bytes, for its blocks
    from ``first`` on; given back to ``reader``'s count as those blocks land."""

    __slots__ = ("reader", "left", "first")

    def __init__(self, reader: Reader, left: int, first: int):
        self.reader, self.left, self.first = reader, left, first


class Fetcher:
    def __init__(self, store: Store, cache: Cache, budget: ReadAheadBudget | None = None):
        self.store = store
        self.cache = cache
        self.budget = budget or ReadAheadBudget(DEFAULT_READ_AHEAD_MEMORY)
        self._held: dict[Fetch, _Grant] = {}  # read-ahead fetch -> the budget it holds
        self.nursery: trio.Nursery | None = None  # set by the mount: fetches outlive requests
        self._busy: set[CachedObject] = set()  # objects with fetches under way
        self.verifier = Verifier(store, cache)
        store.connectivity.on_offline.append(self._wake_all)

    def _wake_all(self) -> None:
        """Gone offline: readers waiting on a fetch give up now (see ``_wait``)."""
        for obj in list(self._busy):
            obj.wake()

    def prefetch(self, obj: CachedObject) -> None:
        """At open: a small object is wanted whole, so start its GET now, while the kernel
        is still on its way with the first read."""
        if self.wants_whole(obj) and obj.size and not obj.present.covers(0, obj.nblocks):
            self._ensure(obj, 0, obj.nblocks, whole=True)

    async def fetch_all(self, obj: CachedObject) -> None:
        """Bring all of the object into the cache (before it is changed locally)."""
        if obj.present.covers(0, obj.nblocks):
            return
        whole = self.wants_whole(obj)
        fetches = self._ensure(obj, 0, obj.nblocks, whole=whole, chunk=CHUNK // BLOCK_SIZE)
        await self._wait(obj, 0, obj.nblocks, fetches)

    @staticmethod
    def small(size: int) -> bool:
        return size <= SMALL_OBJECT

    def wants_whole(self, obj: CachedObject) -> bool:
        return obj.size <= SMALL_OBJECT or (is_index(obj.key) and obj.size <= INDEX_MAX)

    async def read(self, obj: CachedObject, state: ReadState, off: int,
                   size: int) -> bytes | memoryview:
        """Bytes [off, off + size) of ``obj``, checked against their sums; blocks that fail
        are fetched again (EIO, Damaged, when S3 cannot be reached)."""
        if off >= obj.size or size <= 0:
            return b""
        end = min(off + size, obj.size)
        b0, b1 = off // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1
        sequential = state.note(off, end)
        missing = not obj.present.covers(b0, b1)  # so waited for a fetch: in memory after
        try:
            if self.wants_whole(obj):
                if missing:
                    await self._wait(obj, b0, b1, self._ensure(obj, 0, obj.nblocks, whole=True))
            else:
                fetches = self._schedule(obj, state, sequential, b0, b1)
                if missing:
                    await self._wait(obj, b0, b1, fetches)
        except Unreachable:
            self._raise_if_damaged(obj, b0, b1)
            raise
        if sequential and not missing and end + DISK_AHEAD // 2 > state.disk_upto:
            # A sequential reader of cached bytes: have the kernel read the cache file ahead,
            # so that our pread finds them in memory instead of waiting for the disk. (Bytes
            # just fetched are in memory already: the advice would cost a system call each.)
            start = max(end, state.disk_upto)
            state.disk_upto = start + DISK_AHEAD
            self.cache.advise_willneed(obj, start, DISK_AHEAD)
        refetched = 0
        while True:
            try:
                return await self.cache.read_checked(obj, off, end - off)
            except Damaged:
                if refetched == REFETCHES or not self.store.connectivity.online:
                    raise
            refetched += 1  # dropped: fetch those blocks again (all of an object fetched whole)
            whole = self.wants_whole(obj)
            try:
                await self._wait(obj, b0, b1, self._ensure(obj, 0 if whole else b0,
                                                           obj.nblocks if whole else b1, whole))
            except Unreachable:
                self._raise_if_damaged(obj, b0, b1)
                raise

    def _raise_if_damaged(self, obj: CachedObject, b0: int, b1: int) -> None:
        """S3 is unreachable: a read of blocks dropped for failing their check is an EIO (the
        bytes are bad), not ENETUNREACH (not cached)."""
        if self.cache.damaged(obj, b0, b1):
            raise Damaged(f"s3://{obj.bucket}/{obj.key}: cached bytes failed their checksum and "
                          "S3 is unreachable to fetch them again") from None

    # ------------------------------------------------------------ scheduling
    def _schedule(self, obj: CachedObject, state: ReadState, sequential: bool, b0: int,
                  b1: int) -> list[Fetch]:
        """Fetch what this read needs, plus read-ahead when the reading is sequential: the
        reader's window, cut to its share of the budget and to what the budget has free."""
        if not sequential:  # random access: only the blocks touched
            return self._ensure(obj, b0, b1)
        window = min(state.window, self.budget.share(state)) if state.window else 0
        if not window:
            return self._ensure(obj, b0, b1)
        target = min(b1 + window // BLOCK_SIZE, obj.nblocks)
        start = max(b0, state.ahead_upto)
        chunk = max(1, min(CHUNK, window) // BLOCK_SIZE)
        # a new batch once a whole chunk of the window is free, so that GETs stay large
        if start < b1 or target - start >= chunk or (target == obj.nblocks and start < target):
            ahead = max(start, b1)
            new = self._unfetched(obj, ahead, target)
            granted = self.budget.grant(state, len(new) * BLOCK_SIZE)
            if granted < len(new) * BLOCK_SIZE:  # as far as the grant goes
                target = new[granted // BLOCK_SIZE]
            started: list[Fetch] = []
            fetches = self._ensure(obj, b0, target, chunk=chunk, started=started)
            state.ahead_upto = max(state.ahead_upto, target)
            for f in started:  # each fetch of read-ahead holds its part of the grant
                n = min(granted, max(0, f.end - max(f.start, b1)) * BLOCK_SIZE)
                if n:
                    self._held[f] = _Grant(state, n, max(f.start, b1))
                    granted -= n
            self.budget.give_back(state, granted)  # blocks found present or in flight meanwhile
            return fetches
        return self._ensure(obj, b0, b1)

    @staticmethod
    def _unfetched(obj: CachedObject, start: int, end: int) -> list[int]:
        """The blocks of [start, end) neither present nor being fetched, in order."""
        return [blk for s, e in obj.present.missing(start, end) for blk in range(s, e)
                if blk not in obj.inflight]

    def _ensure(self, obj: CachedObject, start: int, end: int, whole: bool = False,
                chunk: int | None = None, started: list[Fetch] | None = None) -> list[Fetch]:
        """Make sure every block of [start, end) is present or being fetched; return the
        fetches covering the missing ones (the new ones also in ``started``)."""
        fetches: list[Fetch] = []
        for gap_start, gap_end in obj.present.missing(start, end):
            run_start = None
            for blk in range(gap_start, gap_end + 1):
                f = obj.inflight.get(blk) if blk < gap_end else None
                if f is not None or blk == gap_end:
                    if run_start is not None:
                        new = self._start(obj, run_start, blk, whole, chunk)
                        fetches += new
                        if started is not None:
                            started += new
                        run_start = None
                    if f is not None and (not fetches or fetches[-1] is not f):
                        fetches.append(f)
                elif run_start is None:
                    run_start = blk
        return fetches

    def _start(self, obj: CachedObject, start: int, end: int, whole: bool, chunk: int | None):
        if whole:
            spans = [(start, end)]
        else:
            step = chunk or (end - start)
            spans = [(s, min(s + step, end)) for s in range(start, end, step)]
        out = []
        for s, e in spans:
            f = Fetch(s, e)
            for blk in range(s, e):
                obj.inflight[blk] = f
            self._busy.add(obj)
            # set by the mount before pyfuse3.main() serves the first read
            assert self.nursery is not None
            self.nursery.start_soon(self._run, obj, f, whole)
            out.append(f)
        return out

    async def _run(self, obj: CachedObject, f: Fetch, whole: bool) -> None:
        try:
            try:
                await self._get(obj, f, whole)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # The cache's disk is full: make room once, then try again (what was written
                # and reported stays; the rest is fetched again).
                needed = (f.end - f.start) * BLOCK_SIZE
                if not await self.cache.make_room(needed):
                    raise NoSpace(f"s3://{obj.bucket}/{obj.key}: the cache's disk is full and "
                                  f"nothing in the cache may be evicted") from None
                log.info("s3://%s/%s: the cache's disk was full: made room, fetching again",
                         obj.bucket, obj.key)
                try:
                    await self._get(obj, f, whole)
                except OSError as e2:
                    if e2.errno != errno.ENOSPC:
                        raise
                    raise NoSpace(f"s3://{obj.bucket}/{obj.key}: the cache's disk is full") from None
        except Exception as e:  # noqa: BLE001 - handed to the readers waiting on it
            f.error = e
            if isinstance(e, S3StashError):
                log.debug("%s", e)  # reported by the read that waits for it, if any
            elif not isinstance(e, OSError):
                log.error("fetch of s3://%s/%s failed", obj.bucket, obj.key, exc_info=True)
        finally:
            f.done = True
            held = self._held.pop(f, None)
            if held is not None:
                self.budget.give_back(held.reader, held.left)
            for blk in range(f.start, f.end):
                if obj.inflight.get(blk) is f:
                    del obj.inflight[blk]
            if not obj.inflight:
                self._busy.discard(obj)
            obj.wake()
            if not obj.verifying and self.nursery is not None and self.verifier.wanted(obj):
                obj.verifying = True
                self.nursery.start_soon(self._verify, obj)
            self._release(obj)

    async def _get(self, obj: CachedObject, f: Fetch, whole: bool) -> None:
        """One GET of the fetch's blocks still missing into the data file. Each piece written
        is summed (CRC32C per block, in the worker thread) before it is reported present."""
        token = trio.lowlevel.current_trio_token()
        start = f.start
        while start < f.end and start in obj.present:  # an earlier try got this far
            start += 1
        marked = [start]
        size = obj.size
        if whole:
            # checked against its MD5 ETag and S3's checksum before this is called; summed
            # too, so that reads after a remount are checked
            path = str(obj.path) + SUMS_SUFFIX
            mode = self.cache.file_mode

            def done(pos: int) -> None:  # in the worker thread, once all of it is written
                crashpoints.hit("fetch.whole_written")
                data_fd = held[0]
                assert data_fd is not None  # the file was open, or open_it opened it, to be written
                sums_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
                try:
                    write_sums(data_fd, sums_fd, size, f.start, f.end)
                except BaseException:
                    os.close(sums_fd)
                    raise
                # made durable by the cache's next sync, with the data, before the catalog
                # records the blocks (an fsync here cost each small object a journal commit)
                token.run_sync_soon(self.cache.adopt_sums, obj, sums_fd)
                token.run_sync_soon(self._arrived, obj, f, marked, pos)

            held = [obj.fd]  # the data file's descriptor, once known
            opener = self.cache.opener(obj)

            def open_it() -> int:  # in the worker thread
                data_fd = held[0] = opener()
                return data_fd

            checked: list[str] = []
            fd = await self.store.fetch_whole(obj.bucket, obj.key, obj.etag, size,
                                              held[0] if held[0] is not None else open_it, done,
                                              checked)
            self.cache.adopt(obj, fd)
            if checked:  # verified as it arrived: MD5 ETag, or S3's full-object checksum
                obj.row.verified = True
                obj.row.verified_by = checked[0]
                obj.row_changed = True
        else:
            fd = self.cache.ensure_open(obj)
            sums_fd = self.cache.ensure_sums(obj)
            nblocks = obj.nblocks
            summed = [start]
            told = [start * BLOCK_SIZE]

            def progress(pos: int, piece: bytes) -> None:  # in the worker thread: sum, hand
                crashpoints.hit("fetch.piece_written")  # over, do not wait
                check_reserve(fd)
                upto = min(nblocks if pos >= size else pos // BLOCK_SIZE, f.end)
                if upto > summed[0]:
                    write_sums(fd, sums_fd, size, summed[0], upto, piece, pos - len(piece))
                    summed[0] = upto
                crashpoints.hit("fetch.piece_summed")
                if pos - told[0] >= TELL_EVERY:  # the event loop is the busy part: the
                    told[0] = pos                # readers waiting are woken per MiB
                    token.run_sync_soon(self._arrived, obj, f, marked, pos)

            await self.store.fetch_range(obj.bucket, obj.key, obj.etag, start * BLOCK_SIZE,
                                         min(f.end * BLOCK_SIZE, size), fd, progress)
        self._arrived(obj, f, marked, min(f.end * BLOCK_SIZE, size))

    def _release(self, obj: CachedObject) -> None:
        """A background task is done with ``obj``; its failure must not end the mount."""
        try:
            self.cache.release_if_idle(obj)
        except Exception:  # noqa: BLE001
            log.exception("recording s3://%s/%s in the cache failed", obj.bucket, obj.key)

    def _arrived(self, obj: CachedObject, f: Fetch, marked: list[int], pos: int) -> None:
        upto = obj.nblocks if pos >= obj.size else pos // BLOCK_SIZE
        upto = min(upto, f.end)
        held = self._held.get(f)
        if held is not None and upto > held.first:  # read-ahead landed: its grant is free again
            n = min(held.left, (upto - held.first) * BLOCK_SIZE)
            held.left -= n
            held.first = upto
            self.budget.give_back(held.reader, n)
        if upto > marked[0]:
            obj.mark(marked[0], upto)
            marked[0] = upto

    async def _wait(self, obj: CachedObject, b0: int, b1: int, fetches: list[Fetch]) -> None:
        retried = False
        while not obj.present.covers(b0, b1):
            ev = obj.changed
            failed = [f.error for f in fetches if f.done and f.error is not None]
            if failed:
                raise _fresh_copy(failed[0])
            if not self.store.connectivity.online and not await self.store.recheck():
                raise Unreachable(f"s3://{obj.bucket}/{obj.key}: S3 is unreachable")
            if all(f.done for f in fetches):
                if retried:
                    raise Changed(f"s3://{obj.bucket}/{obj.key}: blocks missing after fetch")
                retried = True
                fetches = self._ensure(obj, b0, b1, whole=self.wants_whole(obj))
                continue
            await ev.wait()

    async def _verify(self, obj: CachedObject) -> None:
        """An object assembled from ranged GETs: check its parts, or all of it once complete,
        against S3's sums (see verify.py)."""
        try:
            await self.verifier.run(obj)
        except S3StashError as e:  # S3 could not say: it stays not yet verified
            log.debug("s3://%s/%s: not verified now: %s", obj.bucket, obj.key, e)
        except Exception:  # noqa: BLE001 - a failed check must not end the mount
            log.exception("verifying s3://%s/%s failed", obj.bucket, obj.key)
        finally:
            obj.verifying = False
            self._release(obj)


def _fresh_copy(e: BaseException) -> BaseException:
    """Each waiting reader raises its own exception object."""
    if isinstance(e, S3StashError):
        return type(e)(str(e))
    if isinstance(e, OSError):
        return OSError(e.errno, e.strerror)
    return e
