"""Integrity: every block served from the cache is checked against the sum stored for it.

Beside a data file, ``<file>.crc32c`` holds a CRC32C of each 64 KiB block fetched from S3, or
of a local file's bytes once S3 has exactly them (4 bytes little-endian at offset 4 * block;
0 = no sum, so a block whose CRC32C is 0 is stored as 1). A worker thread writes a block's sum
before the block is reported present, and the sidecar is fsync'ed with the data file. Every
read that reaches the daemon reads the whole blocks it touches, checks each (``check_blocks``)
and returns a slice of exactly those checked bytes; ``verify`` uses the same check.

CRC32C (the ``crc32c`` package: SSE4.2 / ARMv8 instructions, 8-16 GB/s here, against 2 GB/s for
zlib's CRC32) costs about a memcpy of the bytes. ``<file>.crc`` sidecars written by earlier
versions hold zlib CRC32s: still checked, block by block, where no CRC32C was written since.
Blocks with no sum at all (small single-part objects fetched whole by earlier versions) are
checked once against the object's MD5 ETag, which then gives them their sums; other blocks
without one are not served: they are dropped and fetched again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from crc32c import crc32c

from ..errors import Damaged
from ..store import is_md5_etag
from .catalog import Candidate
from .files import md5_of
from .objects import BLOCK_SIZE, OLD_SUMS_SUFFIX, SIDECARS, SUMS_SUFFIX, CachedObject
from .ranges import RangeSet

if TYPE_CHECKING:
    from .catalog import Catalog

log = logging.getLogger(__name__)

CHUNK_BLOCKS = 128  # blocks a thread reads at once when it goes through a whole file (8 MiB)
CHECKSUM_ERROR = "cached bytes failed their checksum: dropped, fetched again from S3"
NO_SUM = "cached bytes with no checksum to check them against: dropped, fetched again from S3"


class IntegrityMixin:
    """The Cache's sums and their checks (see ``Cache`` for the state it uses).

    ``_damaged``: data file -> blocks dropped by a failed check during this mount, so that a
    read of them while S3 is unreachable fails with EIO (bad bytes) rather than ENETUNREACH
    (not cached), and so that a damaged object is logged once, not per block or per read."""

    # set by Cache.__init__
    catalog: Catalog
    dir: Path
    origin: str
    file_mode: int
    _busy_files: set[str]
    _objects: dict[tuple[str, str], CachedObject]
    _damaged: dict[str, set[int]]

    if TYPE_CHECKING:  # Cache's and SpaceMixin's
        def ensure_open(self, obj: CachedObject) -> int: ...
        def release_if_idle(self, obj: CachedObject) -> None: ...
        def record_error(self, bucket: str, key: str, message: str) -> None: ...
        def _fill_now(self) -> None: ...

    # ------------------------------------------------------------ the sidecars
    def ensure_sums(self, obj: CachedObject) -> int:
        """The sums sidecar's descriptor, for a worker thread to write block sums into."""
        if obj.sums_fd is None:
            obj.sums_fd = os.open(str(obj.path) + SUMS_SUFFIX,
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
        return obj.sums_fd

    def _old_sums(self, obj: CachedObject) -> int:
        """An earlier version's CRC32 sidecar, read-only; -1 when there is none."""
        if obj.old_sums_fd is None:
            try:
                obj.old_sums_fd = os.open(str(obj.path) + OLD_SUMS_SUFFIX,
                                          os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                obj.old_sums_fd = -1
        return obj.old_sums_fd

    def adopt_sums(self, obj: CachedObject, fd: int) -> None:
        """Take a sidecar descriptor a fetching thread opened and wrote: ``Cache.sync`` fsyncs
        it with the data file before the catalog records the blocks."""
        if obj.sums_fd is None:
            obj.sums_fd = fd
        else:  # the same file: fsyncing the one held flushes what this one wrote
            os.close(fd)

    def _close_sums(self, obj: CachedObject) -> None:
        for fd in (obj.sums_fd, obj.old_sums_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        obj.sums_fd = obj.old_sums_fd = None

    def _drop_sums(self, obj: CachedObject) -> None:
        """The object's bytes are no longer the ones summed (a local change): no sums at all."""
        self._close_sums(obj)
        obj.summed_gen = 0
        for suffix in SIDECARS:
            try:
                os.unlink(str(obj.path) + suffix)
            except FileNotFoundError:
                pass

    # ------------------------------------------------------------ reads
    async def read_checked(self, obj: CachedObject, off: int, size: int) -> bytes | memoryview:
        """Bytes [off, off + size) of ``obj``, whose blocks are present: the whole blocks are
        read, each checked against its sum, and a slice of exactly those bytes returned.

        A block that fails is dropped (no longer present), recorded for ``status`` and logged
        once per object; Damaged is raised, and the caller fetches it again. Local changes
        not yet in S3 are the user's bytes and have no sums: served as they are."""
        obj.last_access = time.time()  # recorded with the object's next catalog update
        b0, b1 = off // BLOCK_SIZE, (off + size - 1) // BLOCK_SIZE + 1
        for sealed in (False, True):
            fd = self.ensure_open(obj)
            if obj.local_bytes:
                return os.pread(fd, size, off)
            # On this thread: a worker thread's hand-offs cost more than the check itself
            # (measured: +45% CPU per GB re-read, against +3-8% for the check done here).
            data, bad, unsummed = read_blocks(fd, self.ensure_sums(obj), self._old_sums(obj),
                                              obj.size, b0, b1)
            if bad:
                self._lose(obj, bad, CHECKSUM_ERROR)
                raise Damaged(f"s3://{obj.bucket}/{obj.key}: {CHECKSUM_ERROR}")
            if not unsummed:
                skip = off - b0 * BLOCK_SIZE
                if skip == 0 and len(data) == size:
                    return data
                return memoryview(data)[skip:skip + size]
            if sealed or not (obj.complete and is_md5_etag(obj.etag)):
                break
            await self._seal(obj)  # sums from the MD5-checked whole, then read again
            if not obj.local_bytes and not obj.present.covers(b0, b1):  # failed its MD5
                raise Damaged(f"s3://{obj.bucket}/{obj.key}: cached bytes failed their MD5")
        self._lose(obj, unsummed, None)
        raise Damaged(f"s3://{obj.bucket}/{obj.key}: {NO_SUM}")

    def _lose(self, obj: CachedObject, blocks: list[int], error: str | None) -> None:
        """Blocks that failed their check (``error``) or could not be checked (None) are no
        longer present; the object is logged once (per mount) and, for a failure, recorded."""
        if not blocks:
            return
        for b in blocks:
            obj.present.discard(b, b + 1)
        obj.row.verified = False
        obj.row.verified_by = None
        obj.unsynced = obj.row_changed = True
        obj.wake()
        seen = self._damaged.setdefault(obj.row.file, set())
        first = not seen
        seen.update(blocks)
        if error is not None:
            self.record_error(obj.bucket, obj.key, error)
        if first:
            log.log(logging.ERROR if error else logging.INFO,
                    "s3://%s/%s: %d block(s) from offset %d: %s (while S3 cannot be reached, "
                    "reads of them fail with EIO)", obj.bucket, obj.key, len(blocks),
                    blocks[0] * BLOCK_SIZE, error or NO_SUM)

    def note_damaged(self, obj: CachedObject, b0: int, b1: int) -> None:
        """Blocks [b0, b1) were dropped by a check made elsewhere (verify.py, whole objects and
        parts): while S3 is unreachable, reads of them fail with EIO as for a block's own sum."""
        self._damaged.setdefault(obj.row.file, set()).update(range(b0, b1))

    def damaged(self, obj: CachedObject, b0: int, b1: int) -> bool:
        """Some block of [b0, b1) not present was dropped by a failed check in this mount."""
        seen = self._damaged.get(obj.row.file)
        if not seen:
            return False
        return any(b in seen and b not in obj.present for b in range(b0, b1))

    async def _seal(self, obj: CachedObject) -> None:
        """A complete single-part object with blocks lacking sums (fetched whole by an earlier
        version): check it whole against its MD5 ETag once, in a worker thread, and store the
        CRC32C of the bytes checked. A mismatch drops it all."""
        if obj.summing is not None:  # another reader is at it
            await obj.summing.wait()
            return
        obj.summing = done = trio.Event()
        gen = obj.gen
        try:
            fd, sums_fd = os.dup(self.ensure_open(obj)), os.dup(self.ensure_sums(obj))
            digest = await trio.to_thread.run_sync(_seal_closing, fd, sums_fd, obj.size, obj.etag)
            if obj.dirty or obj.gen != gen:
                self._drop_sums(obj)  # changed locally meanwhile: not S3's bytes to seal
            elif digest == obj.etag:
                obj.row.verified = True
                obj.unsynced = True  # the sidecar is fsync'ed by the next sync
                log.info("s3://%s/%s: cached without checksums: checked against its MD5 ETag, "
                         "checksums stored", obj.bucket, obj.key)
            else:
                self._lose(obj, [b for s, e in obj.present for b in range(s, e)],
                           f"cached bytes had MD5 {digest}, not the ETag {obj.etag}: dropped, "
                           "fetched again from S3")
        finally:
            obj.summing = None
            done.set()
            self.release_if_idle(obj)

    # ------------------------------------------------------------ local changes
    async def sum_local(self, obj: CachedObject, gen: int) -> None:
        """While generation ``gen`` of a local object is uploaded (its lock held, so no write
        changes it): sum its bytes, so that once S3 has exactly them, reads after a remount are
        checked like any other. ``uploaded`` keeps the sums only for the generation S3 got."""
        if obj.dirty and obj.gen == gen and obj.summed_gen != gen:
            fd, sums_fd = os.dup(self.ensure_open(obj)), os.dup(self.ensure_sums(obj))
            try:
                await trio.to_thread.run_sync(_sum_closing, fd, sums_fd, obj.size)
            except OSError as e:  # the object is then read as unsummed: checked another way
                log.warning("s3://%s/%s: cannot store the checksums of the local copy: %s",
                            obj.bucket, obj.key, e)
                return
            if obj.gen == gen:
                obj.summed_gen = gen

    # ------------------------------------------------------------ cache verify
    async def verify(self, progress=None) -> dict:
        """Re-check every cached object's bytes: each present block against its sum (the same
        check as every read, ``check_blocks``), or, for blocks without one, a complete
        single-part object against its MD5 ETag. Bad blocks are dropped, so they are fetched
        again. Dirty objects are not touched. ``progress(objects_done, bytes_done)`` is called
        after each object. Hashing runs in worker threads."""
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
                    check_file, self.dir / row.file, row.size, list(present), md5)
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
        row = None
        if obj is not None and obj.row.file == file and not obj.dirty:
            present, size = obj.present, obj.size
        elif obj is None:
            row = self.catalog.get(c.origin, c.bucket, c.key)
            if row is None or row.file != file or row.dirty:
                return 0
            present, size = RangeSet.from_bytes(row.ranges), row.size
        else:
            return 0
        lost = 0
        for b in bad:
            if b in present:
                present.discard(b, b + 1)
                lost += min(BLOCK_SIZE, size - b * BLOCK_SIZE)
        if obj is not None:
            obj.row.verified = False
            obj.row.verified_by = None
            obj.unsynced = obj.row_changed = True
            obj.wake()
            self._damaged.setdefault(file, set()).update(bad)  # offline: EIO, not "not cached"
        else:
            # obj is None: ``row`` is the catalog's, and rows read from the catalog have an id
            assert row is not None and row.id is not None
            self.catalog.drop_blocks(row.id, present.to_bytes() if len(present) else None)
        return lost



def check_blocks(data: bytes, first: int, end: int, size: int, sums: bytes,
                 old_sums: bytes = b"") -> tuple[list[int], list[int]]:
    """Check blocks [first, end) of an object of ``size`` bytes, read into ``data``, against
    their sums: the CRC32C in ``sums`` (4 bytes a block, from block ``first``), else the zlib
    CRC32 in ``old_sums`` (an earlier version's). Returns (bad, unsummed) block numbers; a block
    shorter than it should be is bad. The one check of cached bytes: reads and ``verify`` both
    use it."""
    view = memoryview(data)
    n = max(min(end, (size + BLOCK_SIZE - 1) // BLOCK_SIZE) - first, 0)
    want = _unpack(sums, n)
    old = _unpack(old_sums, n) if old_sums and 0 in want else None
    bad: list[int] = []
    unsummed: list[int] = []
    for i in range(n):
        blk = first + i
        piece = view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        if len(piece) < min(BLOCK_SIZE, size - blk * BLOCK_SIZE):
            bad.append(blk)
        elif want[i]:
            # keeping the GIL: released and taken back per block, the event loop's thread
            # would queue behind fetching threads 16 times per MiB read
            if (crc32c(piece, 0, 0) or 1) != want[i]:
                bad.append(blk)
        elif old is not None and old[i]:
            if zlib.crc32(piece) != old[i]:
                bad.append(blk)
        else:
            unsummed.append(blk)
    return bad, unsummed


def _unpack(sums: bytes, n: int) -> tuple[int, ...]:
    return struct.unpack(f"<{n}I", sums[:4 * n].ljust(4 * n, b"\0"))


def block_sums(data: bytes | memoryview) -> bytes:
    """The stored sums of the blocks in ``data`` (whole blocks; the last may be short)."""
    view = memoryview(data)
    return struct.pack(f"<{(len(view) + BLOCK_SIZE - 1) // BLOCK_SIZE}I",
                       *((crc32c(view[i:i + BLOCK_SIZE]) or 1)
                         for i in range(0, len(view), BLOCK_SIZE)))


def read_blocks(fd: int, sums_fd: int, old_fd: int, size: int, b0: int,
                b1: int) -> tuple[bytes, list[int], list[int]]:
    """Read blocks [b0, b1) of a data file and their sums, and check them: (bytes, bad,
    unsummed). Only descriptors in, values out: safe in a worker thread."""
    start = b0 * BLOCK_SIZE
    data = os.pread(fd, min(b1 * BLOCK_SIZE, size) - start, start)
    sums = os.pread(sums_fd, 4 * (b1 - b0), 4 * b0)
    old = os.pread(old_fd, 4 * (b1 - b0), 4 * b0) if old_fd >= 0 else b""
    bad, unsummed = check_blocks(data, b0, b1, size, sums, old)
    return data, bad, unsummed


def _seal_closing(fd: int, sums_fd: int, size: int, md5: str) -> str:
    """In a worker thread: the MD5 of the whole data file; when it is ``md5``, the sums of the
    bytes it was computed from are stored."""
    try:
        h = hashlib.md5(usedforsecurity=False)
        sums = []
        pos = 0
        while pos < size:
            chunk = os.pread(fd, min(CHUNK_BLOCKS * BLOCK_SIZE, size - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            sums.append(block_sums(chunk))
            pos += len(chunk)
        digest = h.hexdigest()
        if pos == size and digest == md5:
            os.pwrite(sums_fd, b"".join(sums), 0)
        return digest
    finally:
        os.close(fd)
        os.close(sums_fd)


def _sum_closing(fd: int, sums_fd: int, size: int) -> None:
    try:
        write_sums(fd, sums_fd, size, 0, (size + BLOCK_SIZE - 1) // BLOCK_SIZE)
    finally:
        os.close(fd)
        os.close(sums_fd)


def check_file(path: Path, size: int, present: list[tuple[int, int]],
               md5: str | None) -> tuple[list[int] | None, int]:
    """In a worker thread: the present blocks of one data file that fail their sum, and the
    bytes checked. Blocks without a sum are checked, when the object is complete and
    single-part, against its MD5 (``md5``): all blocks are bad if it differs. (None, 0):
    nothing to check it against."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        sums = _read_all(str(path) + SUMS_SUFFIX)
        old = _read_all(str(path) + OLD_SUMS_SUFFIX)
        nblocks = (size + BLOCK_SIZE - 1) // BLOCK_SIZE
        bad: list[int] = []
        unsummed: list[int] = []
        checked = 0
        for start, end in present:
            b = start
            while b < end:
                n = min(end - b, CHUNK_BLOCKS)
                data = os.pread(fd, n * BLOCK_SIZE, b * BLOCK_SIZE)
                got_bad, got_none = check_blocks(data, b, b + n, size, sums[4 * b:4 * (b + n)],
                                                 old[4 * b:4 * (b + n)])
                bad += got_bad
                unsummed += got_none
                checked += (sum(_nbytes(x, size) for x in range(b, min(b + n, nblocks)))
                            - sum(_nbytes(x, size) for x in got_none))
                b += n
        if unsummed and md5 is not None:
            checked = size
            if md5_of(fd, size) != md5:
                bad = list(range(nblocks))
        return (bad, checked) if checked else (None, 0)
    finally:
        os.close(fd)


def _nbytes(block: int, size: int) -> int:
    return min(BLOCK_SIZE, size - block * BLOCK_SIZE)


def _read_all(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def write_sums(fd: int, sums_fd: int, size: int, first: int, end: int,
               written: bytes | memoryview = b"", written_at: int = 0) -> None:
    """In the worker thread that wrote blocks [first, end) of a data file (or holds a local
    file's lock): store their CRC32Cs in the sidecar, before the blocks are reported present.

    ``written`` is what that thread just wrote at ``written_at``: the blocks it holds whole are
    summed from it (the bytes that went into the file), not read back; the others are read."""
    if written:
        lo = -(-written_at // BLOCK_SIZE)  # first block starting inside ``written``
        hi = min(end, (written_at + len(written)) // BLOCK_SIZE)
        if written_at + len(written) >= size:  # the object's last block may be short
            hi = min(end, (size + BLOCK_SIZE - 1) // BLOCK_SIZE)
        lo = max(lo, first)
        if lo < hi:
            write_sums(fd, sums_fd, size, first, lo)
            view = memoryview(written)[lo * BLOCK_SIZE - written_at:]
            os.pwrite(sums_fd, block_sums(view[:min(hi * BLOCK_SIZE, size) - lo * BLOCK_SIZE]),
                      4 * lo)
            first = hi
    while first < end:
        n = min(end - first, CHUNK_BLOCKS)
        data = os.pread(fd, n * BLOCK_SIZE, first * BLOCK_SIZE)
        os.pwrite(sums_fd, block_sums(data), 4 * first)
        first += n
