"""Checking cached objects against what S3 says about them, in the background.

An object fetched whole is checked before any byte is served (store.fetch_whole). One assembled
from ranged GETs can only be checked once its bytes are here, so it is checked after a fetch
ends: each part as soon as it is complete, where S3 keeps a sum of every part; the whole once
complete. What a check uses, best first (recorded as ``Row.verified_by``):

- ``md5``: a single-part object's ETag is the MD5 of its bytes (not under SSE-KMS or SSE-C).
- ``crc64nvme``, ``crc32c``, ``crc32``, ``sha256``, ``sha1``: S3's full-object checksum.
- ``parts-<algo>``: S3's sum of each part, or the COMPOSITE checksum made of them.
- ``multipart-etag``: the MD5 of the parts' MD5s, "-N". The part size comes from S3 (every
  part's size from GetObjectAttributes, or part 1's from HEAD ?partNumber=1); when S3 does not
  say, the common sizes that give N parts are tried and only an exact match counts.
- ``upload``: the bytes were uploaded from this cache (S3 checked each part's Content-MD5).
- ``unverifiable:<why>``: complete, but nothing S3 gives can check it. Kept, and said so.

A mismatch drops the bytes (the part, or the whole when only the whole can be checked), is
recorded for ``status`` and logged; they are fetched again on the next read. The same mismatch
twice (S3 served the same bytes again) is not dropped again: those bytes are S3's, and the
object is recorded as not verifiable by that method.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import weakref

import trio

from . import checksums
from .checksums import UNVERIFIABLE, label
from .cache import BLOCK_SIZE, Cache, CachedObject, md5_of
from .errors import Changed, NotFound, S3StashError, Throttled, Unreachable
from .store import ObjectInfo, PartsInfo, Store, is_md5_etag

log = logging.getLogger(__name__)

LAYOUTS_KEPT = 10_000  # what S3 said about objects' parts, kept for this mount


@dataclasses.dataclass
class _Finding:
    method: str
    ok: bool
    proof: bool  # a mismatch proves bad bytes (given the parts' sizes, if it needs them)
    detail: str = ""
    bad_parts: list[tuple[int, int]] | None = None  # byte ranges of the parts that failed
    needs_layout: bool = False  # computed with parts whose sizes may be a guess

    def conclusive(self, layout_known: bool) -> bool:
        return self.proof and (layout_known or not self.needs_layout)


class Verifier:
    """Runs the checks of cached objects against S3's ETags and checksums. Owns what S3 said
    about objects' parts (one lookup per object version and mount), the parts found good in
    objects still partly cached, and the mismatches seen (not to drop the same bytes twice)."""

    def __init__(self, store: Store, cache: Cache):
        self.store = store
        self.cache = cache
        self._layouts: dict[tuple[str, str, str], PartsInfo] = {}
        self._parts_ok: weakref.WeakKeyDictionary[CachedObject, set[int]] = \
            weakref.WeakKeyDictionary()
        self._mismatched: dict[tuple[str, str, str, str], str] = {}
        self.on_dropped: list = []  # callbacks(bucket, key): bytes were dropped (fs: page cache)

    # ------------------------------------------------------------ when
    def wanted(self, obj: CachedObject) -> bool:
        """Is there something to check in ``obj`` now (after a fetch ended)? The caller also
        makes sure no check of it is running (``obj.verifying``)."""
        if obj.dirty or obj.row.verified or not obj.current or obj.unlinked:
            return False
        if obj.complete:
            return True
        if checksums.etag_parts(obj.etag) is None:
            return False
        info = self._layouts.get((obj.bucket, obj.key, obj.etag))
        return info is None or info.part_sums is not None

    async def run(self, obj: CachedObject) -> None:
        """The background check of ``obj`` (the caller set ``obj.verifying``): again as long as
        blocks arrived meanwhile, so that the fetch that completed the object is not missed."""
        while True:
            blocks = obj.present.count()
            try:
                if obj.complete:
                    await self.check(obj)
                else:
                    await self.check_parts(obj)
            except OSError as e:
                log.error("s3://%s/%s: cannot verify the cached bytes: %s", obj.bucket, obj.key, e)
                return
            if obj.present.count() == blocks or not self.wanted(obj):
                return

    # ------------------------------------------------------------ what S3 says
    async def layout(self, obj: CachedObject, fresh: bool = False) -> PartsInfo:
        """What S3 says about the object's parts (asked once per version and mount). When S3
        refuses to say (not a network failure, not another version), an answer that knows
        nothing is kept."""
        k = (obj.bucket, obj.key, obj.etag)
        info = None if fresh else self._layouts.get(k)
        if info is None:
            try:
                info = await self.store.object_parts(obj.bucket, obj.key, obj.etag, obj.size)
            except (Unreachable, Changed, NotFound, Throttled):
                raise
            except S3StashError as e:
                log.info("s3://%s/%s: S3 does not say what the object's parts are: %s",
                         obj.bucket, obj.key, e)
                info = PartsInfo(etag=obj.etag, parts=checksums.etag_parts(obj.etag))
            if len(self._layouts) >= LAYOUTS_KEPT:
                self._layouts.clear()
            self._layouts[k] = info
        return info

    # ------------------------------------------------------------ parts of a partial object
    async def check_parts(self, obj: CachedObject) -> None:
        """The parts now complete in the cache, each against S3's sum of it (where S3 has one:
        GetObjectAttributes of an object uploaded with checksums)."""
        try:
            info = await self.layout(obj)
        except S3StashError:
            return  # offline, throttled, or another version now: the whole is checked later
        if info.part_sums is None or info.sizes is None:
            return
        algo, sums = info.part_sums
        bounds = checksums.parts_of(list(info.sizes))
        done = self._parts_ok.setdefault(obj, set())
        todo = [i for i, (s, e) in enumerate(bounds)
                if i not in done and obj.present.covers(s // BLOCK_SIZE, -(-e // BLOCK_SIZE))]
        if not todo:
            return
        gen = obj.gen
        fd = self.cache.ensure_open(obj)
        got = await trio.to_thread.run_sync(_hash_ranges, fd, [bounds[i] for i in todo], algo)
        if obj.dirty or obj.gen != gen:
            return
        bad = [(i, checksums.b64(d)) for i, d in zip(todo, got) if checksums.b64(d) != sums[i]]
        done.update(i for i in todo if i not in dict(bad))
        if bad:
            detail = ", ".join(f"part {i + 1} of {len(bounds)}: {d} != {sums[i]}" for i, d in bad)
            self._mismatch(obj, _Finding(f"parts-{algo.lower()}", False, True, detail,
                                         [bounds[i] for i, _ in bad]), gen)

    # ------------------------------------------------------------ a complete object
    async def check(self, obj: CachedObject, fresh: bool = False) -> str:
        """Check a complete object; returns "verified", "mismatch", "unverifiable", "offline"
        (S3 could not be asked) or "changed" (changed here or in S3 meanwhile)."""
        gen, etag, size = obj.gen, obj.etag, obj.size
        fd = self.cache.ensure_open(obj)
        if is_md5_etag(etag):
            digest = await trio.to_thread.run_sync(md5_of, fd, size)
            if obj.dirty or obj.gen != gen:
                return "changed"
            if digest == etag:
                self._verified(obj, "md5")
                return "verified"
        try:
            info = await self.layout(obj, fresh)
        except (Unreachable, Throttled):
            if is_md5_etag(etag):  # cannot ask whether it is encrypted: drop rather than serve
                return self._mismatch(obj, _Finding("md5", False, True, f"MD5 {digest}"), gen)
            return "offline"
        except (Changed, NotFound):
            return "changed"
        except S3StashError as e:
            info = PartsInfo(etag=etag, parts=checksums.etag_parts(etag))
            log.debug("s3://%s/%s: S3 did not say what its parts are: %s", obj.bucket, obj.key, e)
        if is_md5_etag(etag) and not info.encrypted:
            return self._mismatch(obj, _Finding("md5", False, True, f"MD5 {digest}"), gen)
        findings, why = await self._examine(obj, fd, info)
        if obj.dirty or obj.gen != gen:
            return "changed"
        summed = any(f.ok and f.method != "multipart-etag" for f in findings)
        # bytes that match S3's checksum but not the ETag: the ETag is no MD5 of them
        bad = [f for f in findings if not f.ok and f.proof
               and not (summed and f.method == "multipart-etag")]
        if bad:
            return self._mismatch(obj, bad[0], gen)
        good = [f for f in findings if f.ok]
        if good:
            self._verified(obj, good[0].method)
            return "verified"
        self._unverifiable(obj, why)
        return "unverifiable"

    async def _examine(self, obj: CachedObject, fd: int,
                       info: PartsInfo) -> tuple[list[_Finding], str]:
        """Every check S3's answer allows, from one pass over the cached bytes (a few more when
        the part size must be guessed). Returns the findings, best method first, their
        ``proof`` settled (a mismatch that proves nothing is left out), and why there is
        nothing to check it against when there are none."""
        size, etag = obj.size, obj.etag
        nparts = checksums.etag_parts(etag)
        sizes = info.sizes
        known = sizes is not None
        bounds = (checksums.parts_of(list(sizes)) if sizes is not None else
                  checksums.uniform_parts(size, info.part_size) if info.part_size else None)
        algo, value = info.checksum or (None, None)
        ctype = info.checksum_type
        computable = algo is not None and checksums.available(algo)
        part_algos: set[str] = set()
        if bounds and info.part_sums is not None:
            part_algos.add(info.part_sums[0])
        if bounds and algo is not None and computable and nparts and ctype != "FULL_OBJECT":
            part_algos.add(algo)
        etag_check = nparts is not None and not info.encrypted
        strong = info.part_sums is not None or (computable and ctype is not None)
        if bounds and etag_check and not strong:
            part_algos.add("MD5")
        whole_algos: tuple[str, ...] = ((algo,) if algo is not None and computable
                                        and (ctype != "COMPOSITE" or not nparts) else ())
        parts, whole = await trio.to_thread.run_sync(
            checksums.hash_file, fd, size, bounds, tuple(part_algos), whole_algos)
        findings: list[_Finding] = []
        if algo in whole:
            got = checksums.b64(whole[algo])
            # moto's HEAD gives a COMPOSITE checksum bare and untyped: no proof then
            findings.append(_Finding(algo.lower(), got == value,
                                     ctype == "FULL_OBJECT" or not nparts, f"{got} != {value}"))
        if bounds and info.part_sums is not None:
            a, sums = info.part_sums
            bad = [(b, checksums.b64(p[a]), want) for b, p, want in zip(bounds, parts, sums)
                   if checksums.b64(p[a]) != want]
            findings.append(_Finding(f"parts-{a.lower()}", not bad, True,
                                     "; ".join(f"bytes {b[0]}-{b[1]}: {g} != {w}" for b, g, w in bad),
                                     [b for b, _, _ in bad], needs_layout=True))
        if bounds and algo in part_algos:
            joined = checksums.composite(algo, [p[algo] for p in parts])
            findings.append(_Finding(f"parts-{algo.lower()}", joined == value, ctype == "COMPOSITE",
                                     f"{joined} != {value}", needs_layout=True))
        if bounds and "MD5" in part_algos:
            got = checksums.multipart_etag([p["MD5"] for p in parts])
            findings.append(_Finding("multipart-etag", got == etag, True, f"{got} != {etag}",
                                     needs_layout=True))
        guessed = not known and any(not f.ok and f.needs_layout and f.proof for f in findings)
        if guessed:  # part 1's size was taken for all but the last: proof if the last agrees
            guessed = not await self._last_part_agrees(obj, nparts, bounds)
            known = not guessed
        for f in findings:
            f.proof = f.conclusive(known)
        findings = [f for f in findings if f.ok or f.proof]
        if not findings and etag_check and nparts is not None and not bounds:
            findings = await self._guess_part_size(obj, fd, nparts)
        if info.encrypted and algo is None:
            why = "SSE-KMS or SSE-C (the ETag is no MD5), and no checksum"
        elif algo and not computable:
            why = f"{algo} cannot be computed here" + ("" if bounds else ", part size unknown")
        elif nparts is None:
            why = "the ETag is no MD5, and no checksum"
        elif guessed:
            why = "parts of different sizes, sizes unknown"
        else:
            why = "no checksum, part size unknown" if algo is None else "part size unknown"
        return findings, why

    async def _last_part_agrees(self, obj: CachedObject, nparts: int | None,
                                bounds: list[tuple[int, int]] | None) -> bool:
        if not nparts or not bounds or len(bounds) != nparts:
            return False
        try:
            length = await self.store.part_size(obj.bucket, obj.key, obj.etag, nparts)
        except S3StashError:
            return False
        s, e = bounds[-1]
        return length == e - s

    async def _guess_part_size(self, obj: CachedObject, fd: int, nparts: int) -> list[_Finding]:
        """S3 did not say the part size: try the common ones that give ``nparts`` parts; only an
        exact ETag match counts (a wrong guess proves nothing)."""
        for p in checksums.candidate_part_sizes(obj.size, nparts):
            parts, _ = await trio.to_thread.run_sync(
                checksums.hash_file, fd, obj.size, checksums.uniform_parts(obj.size, p),
                ("MD5",), ())
            if checksums.multipart_etag([d["MD5"] for d in parts]) == obj.etag:
                log.debug("s3://%s/%s: multipart ETag matches with parts of %d bytes",
                          obj.bucket, obj.key, p)
                return [_Finding("multipart-etag", True, False)]
        return []

    # ------------------------------------------------------------ outcomes
    def _verified(self, obj: CachedObject, how: str) -> None:
        obj.row.verified = True
        obj.row.verified_by = how
        obj.row_changed = obj.unsynced = True

    def _unverifiable(self, obj: CachedObject, why: str) -> None:
        if obj.row.verified_by != UNVERIFIABLE + why:
            log.info("s3://%s/%s: complete, but not verifiable against S3: %s", obj.bucket,
                     obj.key, why)
        obj.row.verified_by = UNVERIFIABLE + why
        obj.row_changed = obj.unsynced = True

    def _mismatch(self, obj: CachedObject, f: _Finding, gen: int) -> str:
        """Drop what failed (its parts, or all of it), record and log it once."""
        if obj.dirty or obj.gen != gen:
            return "changed"
        seen = (obj.bucket, obj.key, obj.etag, f.method)
        if self._mismatched.get(seen) == f.detail:
            msg = (f"S3 served the same bytes twice, and they do not match its {label(f.method)} "
                   f"({f.detail}): kept, not verifiable")
            log.error("s3://%s/%s: %s", obj.bucket, obj.key, msg)
            self.cache.record_error(obj.bucket, obj.key, msg)
            self._unverifiable(obj, f"bytes do not match S3's {label(f.method)}")
            return "unverifiable"
        if len(self._mismatched) >= LAYOUTS_KEPT:
            self._mismatched.clear()
        self._mismatched[seen] = f.detail
        what = "parts" if f.bad_parts else "bytes"
        msg = (f"cached {what} do not match S3's {label(f.method)} ({f.detail}): dropped, "
               f"fetched again")
        log.error("s3://%s/%s: %s", obj.bucket, obj.key, msg)
        self.cache.record_error(obj.bucket, obj.key, msg)
        if f.bad_parts:
            for s, e in f.bad_parts:
                self.cache.note_damaged(obj, s // BLOCK_SIZE, -(-e // BLOCK_SIZE))
                obj.present.discard(s // BLOCK_SIZE, -(-e // BLOCK_SIZE))
            obj.row.verified = False
            obj.row.verified_by = None
            obj.row_changed = obj.unsynced = True
            obj.wake()
        else:
            self.cache.note_damaged(obj, 0, obj.nblocks)
            obj.drop_all()
            self._parts_ok.pop(obj, None)
        for fn in self.on_dropped:
            fn(obj.bucket, obj.key)
        return "mismatch"

    # ------------------------------------------------------------ cache verify
    async def recheck(self) -> dict:
        """``cache verify``'s S3 side: check again every complete clean object of this cache's
        endpoint not yet verified against S3 (or found not verifiable before)."""
        out: dict = {"s3_checked": 0, "s3_mismatches": 0, "s3_error": None}
        for r in self.cache.catalog.verification_rows(self.cache.origin):
            if r.verified or not r.complete:
                continue
            obj = self.cache.current(r.bucket, r.key)
            if obj is None:
                obj, _ = self.cache.open_object(r.bucket, r.key, ObjectInfo(
                    etag=r.etag, size=r.size, last_modified_ns=0, mtime_ns=r.mtime_ns),
                    opening=False)
            if (obj.etag != r.etag or obj.verifying or not obj.complete or obj.dirty
                    or obj.row.verified or not obj.current):
                self.cache.release_if_idle(obj)
                continue
            obj.verifying = True
            try:
                result = await self.check(obj, fresh=True)
            except OSError as e:
                log.warning("cache verify: cannot read the cached bytes of s3://%s/%s: %s",
                            obj.bucket, obj.key, e)
                result = "unreadable"
            finally:
                obj.verifying = False
            await self.cache.sync()
            self.cache.release_if_idle(obj)
            if result == "offline":
                out["s3_error"] = "S3 could not be reached"
                break
            out["s3_checked"] += 1
            out["s3_mismatches"] += result == "mismatch"
        return out


def _hash_ranges(fd: int, ranges: list[tuple[int, int]], algo: str) -> list[bytes]:
    """In a worker thread: ``algo`` of each byte range of ``fd``."""
    out = []
    for s, e in ranges:
        d = checksums.new_digest(algo)
        pos = s
        while pos < e:
            chunk = os.pread(fd, min(checksums.PIECE, e - pos), pos)
            if not chunk:
                raise OSError(f"cache file is shorter than expected ({pos} of {e} bytes)")
            d.update(chunk)
            pos += len(chunk)
        out.append(d.digest())
    return out


async def verify_cache(cache: Cache, verifier: Verifier | None, why_not: str = "") -> dict:
    """``cache verify``: every cached block against its sum (Cache.verify), then the S3 side
    (``Verifier.recheck``; without a verifier, ``why_not`` says why it was not run), then how
    each cached object stands against S3."""
    out = await cache.verify()
    if verifier is None:
        out.update(s3_checked=0, s3_mismatches=0, s3_error=why_not or "S3 was not asked")
    else:
        out.update(await verifier.recheck())
    await cache.sync()
    out["against_s3"] = summary(cache)
    return out


def summary(cache: Cache) -> dict:
    """How the objects this cache holds for its endpoint stand against S3: counts of the
    complete ones verified by each method, the complete ones not verifiable (and why) or not
    yet verified, and how many are partly cached (their blocks are checked by their sums)."""
    verified: dict[str, int] = {}
    unverifiable: list[dict] = []
    unverified: list[dict] = []
    partial = 0
    for r in cache.catalog.verification_rows(cache.origin):
        obj = cache.current(r.bucket, r.key)
        complete = r.complete
        if obj is not None and obj.row.file == r.file:
            r, complete = obj.row, obj.complete
        by = r.verified_by or ""
        if not complete:
            partial += 1
        elif r.verified:
            how = r.verified_by or ("md5" if is_md5_etag(r.etag) else "s3")
            verified[how] = verified.get(how, 0) + 1
        elif by.startswith(UNVERIFIABLE):
            unverifiable.append({"bucket": r.bucket, "key": r.key, "why": by[len(UNVERIFIABLE):]})
        else:
            unverified.append({"bucket": r.bucket, "key": r.key})
    return {"verified": verified, "not_verifiable": unverifiable, "not_yet_verified": unverified,
            "partial": partial}
