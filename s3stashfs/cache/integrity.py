"""Integrity: the per-block sums of the data files, writing them and checking them.

Beside a data file, ``<file>.crc`` holds a CRC32 of each 64 KiB block fetched by ranged GETs
(4 bytes at offset 4 * block; 0 = no sum), written by the worker thread that wrote the block and
fsync'ed with it, so that ``verify`` can check a partly cached object.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path

import trio

from ..store import is_md5_etag
from .catalog import Candidate
from .files import md5_of
from .objects import BLOCK_SIZE, SUMS_SUFFIX, CachedObject
from .ranges import RangeSet

log = logging.getLogger(__name__)


class IntegrityMixin:
    """The Cache's sums and their checks (see ``Cache`` for the state it uses)."""

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


def check_file(path: Path, size: int, present: list[tuple[int, int]],
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
