"""Turning local changes into objects: one PUT or a parallel multipart upload, verified, and a
retry queue so that nothing written through the mount is ever lost.

A file written through the mount is uploaded when it is closed (``flush``) or fsync'ed. Before
an upload is tried, its bytes and its catalog row (dirty) are made durable; an upload that fails
leaves the object dirty: it is never evicted or replaced by a remote version, and it is retried
in the background with backoff and jitter, after a remount too.

Every upload is conditional on the version the change was based on (the row's ``base_etag``):
If-Match that ETag, or If-None-Match: * for a new file. When S3 moved on meanwhile, nothing is
overwritten: the local bytes go up beside the object under a conflict name (``conflict_key``),
the original key keeps S3's version, and an event records it for ``status``.

Pending changes live in the catalog's journal, in the order they are to be applied: uploads
(in the order of the closes that made them) and, with ``offline_writes=queue``, the deletes and
directory markers made while offline (a file renamed offline is an upload of the new name then
a delete of the old one; an rmdir, a delete of the directory's marker). They are applied in that
order; a change whose key has an earlier change still failing waits for it.
"""
from __future__ import annotations

import errno
import fnmatch
import hashlib
import logging
import os
import random
import re
import time

import trio

from . import crashpoints
from .cache import Cache, CachedObject
from .errors import Conflict, S3StashError, StoreError, Unreachable
from .store import Store, is_md5_etag, meta_mtime, run_all

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


CONFLICT_TRIES = 100
_EXT = re.compile(r"[A-Za-z0-9]{1,10}")
_COMPRESSED = {"gz", "bgz", "bz2", "xz", "zst", "lz4", "zip", "z", "br"}


def _split_ext(name: str) -> tuple[str, str]:
    """(stem, extension): the last suffix, and the one before it when the last is a compression
    (``sample.vcf.gz`` -> ``sample``, ``.vcf.gz``). A dot file (``.bashrc``) has none."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or not _EXT.fullmatch(ext):
        return name, ""
    if ext.lower() in _COMPRESSED:
        stem2, dot2, ext2 = stem.rpartition(".")
        if dot2 and stem2 and _EXT.fullmatch(ext2):
            return stem2, f".{ext2}.{ext}"
    return stem, f".{ext}"


def conflict_key(key: str, when: float, n: int = 1) -> str:
    """The key a conflicting local version is uploaded under, beside the original:
    ``dir/sample.conflict-20261121T104233Z.vcf.gz`` (``-N`` after the time for the Nth try).
    The extension stays last so that tools still know the file's type; the name is cut (never
    the extension) to stay within 255 bytes."""
    prefix, name = key[:key.rfind("/") + 1], key[key.rfind("/") + 1:]
    stem, ext = _split_ext(name)
    tag = ".conflict-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
    if n > 1:
        tag += f"-{n}"
    room = 255 - len((tag + ext).encode())
    raw = stem.encode("utf-8", "surrogatepass")
    if len(raw) > room:
        stem = raw[:room].decode("utf-8", "ignore")
    return prefix + stem + tag + ext


def part_size_for(size: int, part_size: int) -> int:
    """The configured part size, grown (in MiB steps) so that ``size`` fits in 10,000 parts."""
    need = -(-size // MAX_PARTS)
    if need <= part_size:
        return part_size
    mib = 1 << 20
    return -(-need // mib) * mib


def local_etag(fd: int, size: int, part_size: int | None) -> str:
    """In a worker thread: the ETag S3 gives the first ``size`` bytes of ``fd`` uploaded in one
    PUT (``part_size`` None: their MD5) or in parts of ``part_size`` (MD5 of the parts' MD5s)."""
    def md5(start: int, n: int):
        h = hashlib.md5(usedforsecurity=False)
        end = start + n
        while start < end:
            chunk = os.pread(fd, min(8 << 20, end - start), start)
            if not chunk:
                raise OSError(errno.EIO, "cache file shorter than its object")
            h.update(chunk)
            start += len(chunk)
        return h
    if part_size is None:
        return md5(0, size).hexdigest()
    digests = [md5(start, min(part_size, size - start)).digest()
               for start in range(0, max(size, 1), part_size)]
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


class _Stream:
    """A multipart upload begun while a file is still being written front to back, so that most
    of its parts are in S3 by the time it is closed. Usable at close only if every change since
    it began was one of those sequential writes (checked with the object's generation)."""

    def __init__(self, key: str, part_size: int, meta: dict[str, str], mtime_ns: int, gen: int):
        self.key = key
        self.part_size = part_size
        self.meta = meta
        self.mtime_ns = mtime_ns
        self.gen = gen  # the object's generation once all writes seen so far are counted
        self.upload_id: str | None = None
        self.ready = trio.Event()
        self.parts: dict[int, tuple[bytes, str]] = {}
        self.next_part = 0
        self.running = 0
        self.changed = trio.Event()
        self.error: BaseException | None = None
        self.broken = False

    def wake(self) -> None:
        ev, self.changed = self.changed, trio.Event()
        ev.set()


class Uploader:
    """Owns the upload of dirty objects and the application of the journal of pending changes.

    Invariants: an object is dirty until S3 holds its current generation (or a conflict copy
    of it does); a journal row is removed only once its change is in S3 (or found superseded);
    journal changes are applied by one task at a time (``_apply_lock``)."""

    def __init__(self, store: Store, cache: Cache, threshold: int, part_size: int,
                 local_only: tuple[str, ...] = (), offline_writes: str = "refuse"):
        self.store = store
        self.cache = cache
        self.threshold = threshold
        self.part_size = part_size
        self.local_only = local_only
        self.queue_offline = offline_writes == "queue"
        self._wake = trio.Event()
        self._apply_lock = trio.Lock()
        self._op_retry: dict[int, tuple[float, float]] = {}  # journal seq -> (retry at, delay)
        self._op_error: dict[int, str] = {}
        self._next_try: float | None = None  # monotonic time the next pending change is due
        self.nursery: trio.Nursery | None = None  # set by run(): part uploads outlive writes

    @property
    def online(self) -> bool:
        return self.store.connectivity.online

    def is_local_only(self, key: str) -> bool:
        """Editor swap and lock files (by default) live in the cache only: never uploaded."""
        name = key.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, g) for g in self.local_only)

    # ------------------------------------------------------------ streaming while writing
    def wrote(self, obj: CachedObject, off: int, n: int) -> None:
        """A write landed in the cache file. A file written front to back gets its complete parts
        uploaded while the writing goes on; anything else stops that (the close uploads all)."""
        st = obj.stream
        if (off != obj.seq_end or self.nursery is None or self.is_local_only(obj.key)
                or not self.online):
            obj.seq_end = -1
            self.break_stream(obj)
            return
        obj.seq_end = off + n
        if st is not None:
            st.gen = obj.gen
        parts = min(obj.seq_end // self.part_size, MAX_PARTS - 1)
        if parts == 0 or obj.seq_end <= self.threshold:
            return
        if st is None:
            meta = dict(obj.row.metadata or {})
            mtime = time.time_ns()
            meta["mtime"] = meta_mtime(mtime)
            st = obj.stream = _Stream(obj.key, self.part_size, meta, mtime, obj.gen)
            self.nursery.start_soon(self._stream_start, obj, st)
        while st.next_part < parts:
            self.nursery.start_soon(self._stream_part, obj, st, st.next_part)
            st.next_part += 1

    def break_stream(self, obj: CachedObject) -> None:
        st, obj.stream = obj.stream, None
        if st is not None and not st.broken:
            st.broken = True
            if self.nursery is not None:
                self.nursery.start_soon(self._stream_abort, obj.bucket, st)

    async def _stream_start(self, obj: CachedObject, st: _Stream) -> None:
        try:
            st.upload_id = await self.store.start_multipart(obj.bucket, st.key, st.meta)
            crashpoints.hit("upload.stream_created")
        except Exception as e:  # noqa: BLE001 - the close then uploads the whole file
            st.error = e
        finally:
            st.ready.set()

    async def _stream_part(self, obj: CachedObject, st: _Stream, i: int) -> None:
        await st.ready.wait()
        if st.broken or st.error is not None or obj.unlinked:
            return
        st.running += 1
        try:
            upload_id = st.upload_id
            # ready with no error: _stream_start set it (it is cancelled only with the whole mount)
            assert upload_id is not None
            st.parts[i] = await self.store.upload_part(
                obj.bucket, st.key, upload_id, i + 1, self.cache.ensure_open(obj),
                i * st.part_size, st.part_size)
            crashpoints.hit("upload.stream_part_sent")
        except Exception as e:  # noqa: BLE001 - the close then uploads the whole file
            st.error = e
        finally:
            st.running -= 1
            st.wake()

    async def _stream_abort(self, bucket: str, st: _Stream) -> None:
        await st.ready.wait()
        while st.running:
            await st.changed.wait()
        if st.upload_id is not None:
            await self.store.abort_multipart(bucket, st.key, st.upload_id)  # never raises

    def _stream_usable(self, obj: CachedObject) -> bool:
        st = obj.stream
        def attrs(meta):
            return {k: v for k, v in (meta or {}).items() if k != "mtime"}
        return (st is not None and not st.broken and st.error is None and st.key == obj.key
                and st.gen == obj.gen and obj.seq_end == obj.size
                and self.threshold < obj.size <= MAX_PARTS * st.part_size
                and attrs(st.meta) == attrs(obj.row.metadata))

    async def _finish_stream(self, obj: CachedObject, fd: int, base: str | None) -> str:
        """Send the parts not sent yet, wait for all, and join them."""
        st = obj.stream
        if st is None:
            # broken since upload() chose it: unlink and an offline rename do not take the
            # object's lock. Unexpected, so close() gets EIO and the traceback is logged.
            raise RuntimeError(f"s3://{obj.bucket}/{obj.key}: its streamed upload was broken "
                               "while the close was uploading it")
        await st.ready.wait()
        last = -(-obj.size // st.part_size)
        try:
            if st.error is not None:
                raise st.error
            upload_id = st.upload_id
            assert upload_id is not None  # as in _stream_part

            async def part(_, i):
                st.parts[i] = await self.store.upload_part(
                    obj.bucket, st.key, upload_id, i + 1, fd, i * st.part_size,
                    min(st.part_size, obj.size - i * st.part_size))
            await run_all(part, range(st.next_part, last))
            while st.running:
                await st.changed.wait()
            if st.error is not None:
                raise st.error
            etag = await self.store.complete_multipart(
                obj.bucket, st.key, upload_id, [st.parts[i] for i in range(last)], base)
        except BaseException:
            self.break_stream(obj)
            raise
        obj.stream = None
        return etag

    # ------------------------------------------------------------ uploads
    async def upload(self, obj: CachedObject, closing: bool = True) -> str | None:
        """Upload the local bytes of ``obj`` if S3 does not have this generation yet, on the
        condition that S3 still has the version the change was based on.

        ``closing``: a close, fsync or setattr asks (the change takes its place at the end of
        the journal's order, and with ``offline_writes=queue`` an unreachable S3 only queues
        it); otherwise the retry loop or ``sync_all`` applies a pending change.

        Returns the conflict key when S3 had moved on and the local version went up beside it
        (nothing is lost either way), else None. Raises the domain error on failure; the object
        then stays dirty and pending."""
        if closing and self.online and (obj.bucket, obj.key) in self.cache.pending_keys("delete"):
            await self._apply_deletes(obj.bucket, obj.key)  # an earlier change of this key first
        async with obj.lock:
            gen = obj.gen
            if obj.unlinked or not obj.dirty or obj.uploaded_gen == gen or self.is_local_only(obj.key):
                return None
            if closing and obj.journaled_gen != gen:
                self.cache.catalog.journal_add(self.cache.origin, obj.bucket, obj.key, "upload",
                                               obj.row.base_etag)
                obj.journaled_gen = gen
            if closing and self.queue_offline and not self.online:
                await self.cache.sync_one(obj)
                log.info("offline: s3://%s/%s queued (%d bytes), uploaded once S3 answers",
                         obj.bucket, obj.key, obj.size)
                return None
            meta = dict(obj.row.metadata or {})
            meta["mtime"] = meta_mtime(obj.row.mtime_ns)
            fd = self.cache.ensure_open(obj)
            base = obj.row.base_etag
            sent: list[str] = []
            errors: list[S3StashError] = []
            streamed = obj.stream if self._stream_usable(obj) else None
            if streamed is None:
                self.break_stream(obj)
            else:
                meta = streamed.meta  # its parts went up with these, mtime included

            async def send():
                try:
                    if streamed is not None:
                        sent.append(await self._finish_stream(obj, fd, base))
                    else:
                        sent.append(await self._put(obj, obj.key, fd, meta, base))
                except S3StashError as e:
                    errors.append(e)  # not raised here: the local copy must become durable

            async def durable():
                await self.cache.sync_one(obj)

            async def summed():  # kept by Cache.uploaded only if S3 gets this generation
                await self.cache.sum_local(obj, gen)

            # The local copy is made durable (and summed) while the upload runs, not before it:
            # whatever happens to the upload, close() returns only once all are done.
            await run_all(lambda _, job: job(), [durable, summed, send])
            if errors and isinstance(errors[0], Conflict):
                same = await self._s3_has_these_bytes(obj, fd)
                if same is None:
                    return await self._conflict(obj, gen, fd, meta, errors[0])
                log.info("s3://%s/%s already has these bytes (ETag %s): an upload that a crash "
                         "kept from being recorded, now recorded", obj.bucket, obj.key, same)
                errors, sent = [], [same]
            if errors:
                e = errors[0]
                if closing and self.queue_offline and isinstance(e, Unreachable):
                    log.info("offline: s3://%s/%s queued (%d bytes), uploaded once S3 answers",
                             obj.bucket, obj.key, obj.size)
                    return None
                self._failed(obj, e)
                raise e
            etag = sent[0]
            crashpoints.hit("upload.sent")
            if streamed is not None:
                obj.row.mtime_ns = streamed.mtime_ns  # what S3 was told when the parts began
            obj.row.metadata = meta
            self._done(obj, gen, etag)
            log.info("uploaded s3://%s/%s (%d bytes, ETag %s)", obj.bucket, obj.key, obj.size, etag)
            return None

    async def _s3_has_these_bytes(self, obj: CachedObject, fd: int) -> str | None:
        """After a conflict: S3's ETag if the object S3 has is byte for byte the local one (an
        upload went through, then a crash came before the catalog recorded it), else None."""
        try:
            info = await self.store.head_object(obj.bucket, obj.key)
        except S3StashError:
            return None
        if info is None or info.size != obj.size:
            return None
        parts = None if is_md5_etag(info.etag) else part_size_for(obj.size, self.part_size)
        mine = await trio.to_thread.run_sync(local_etag, fd, obj.size, parts)
        return info.etag if mine == info.etag else None

    async def _put(self, obj: CachedObject, key: str, fd: int, meta: dict[str, str],
                   base: str | None) -> str:
        crashpoints.hit("upload.before_put")
        if obj.size <= self.threshold:
            return await self.store.put_file(obj.bucket, key, fd, obj.size, meta, base)
        return await self.store.multipart_upload(
            obj.bucket, key, fd, obj.size, part_size_for(obj.size, self.part_size), meta, base)

    def _done(self, obj: CachedObject, gen: int, etag: str) -> None:
        self.cache.uploaded(obj, gen, etag)
        obj.last_error = None
        if obj.gen == gen:
            self.cache.catalog.journal_forget(self.cache.origin, obj.bucket, obj.key, "upload")
            crashpoints.hit("upload.journal_forgotten")
        self.cache.catalog.clear_events(obj.bucket, obj.key, "error")

    async def _conflict(self, obj: CachedObject, gen: int, fd: int, meta: dict[str, str],
                        why: Conflict) -> str:
        """S3 no longer has the version the local change was based on. Neither is lost: the
        local bytes go up under a new conflict key (If-None-Match: *, a counter on collision),
        the original key keeps S3's version, and the cached object moves to the conflict key.
        Until the copy is in S3 the object stays dirty under its own key."""
        key, base, now = obj.key, obj.row.base_etag, time.time()
        for n in range(1, CONFLICT_TRIES + 1):
            ckey = conflict_key(key, now, n)
            try:
                etag = await self._put(obj, ckey, fd, meta, "")
                break
            except Conflict:
                continue  # that name is taken: the next one
            except S3StashError as e:
                self._failed(obj, e)
                raise
        else:
            err = StoreError(f"s3://{obj.bucket}/{key}: no free conflict name after "
                             f"{CONFLICT_TRIES} tries")
            self._failed(obj, err)
            raise err
        obj.row.metadata = meta
        self.cache.move(obj.bucket, key, ckey)
        self._done(obj, gen, etag)
        self.cache.catalog.put(obj.row)  # the move is durable now: no second copy after a crash
        obj.row_changed = False
        self.cache.catalog.journal_forget(self.cache.origin, obj.bucket, key, "upload")
        log.warning("conflict: s3://%s/%s changed in S3 since the local change was based on it "
                    "(%s); S3's version kept, the local version uploaded as s3://%s/%s",
                    obj.bucket, key, why, obj.bucket, ckey)
        self.cache.catalog.add_event(
            self.cache.origin, obj.bucket, key, "conflict",
            f"changed in S3 since the local change was based on it "
            f"({'ETag ' + base if base else 'a new file'}); S3's version kept, the local version "
            f"kept as {ckey}")
        return ckey

    def _failed(self, obj: CachedObject, e: S3StashError) -> None:
        obj.retry_delay = min(max(obj.retry_delay * 2, RETRY_FIRST), RETRY_MAX)
        obj.retry_at = time.monotonic() + random.uniform(obj.retry_delay / 2, obj.retry_delay)
        obj.last_error = str(e)
        log.warning("upload of s3://%s/%s failed (%s); kept in the cache, retrying in %.0f s",
                    obj.bucket, obj.key, e, obj.retry_at - time.monotonic())
        self.cache.record_error(obj.bucket, obj.key, f"upload failed: {e}")
        self._wake.set()

    # ------------------------------------------------------------ the journal
    def queue(self, bucket: str, key: str, op: str, base_etag: str | None) -> None:
        """A namespace change made while offline (``op`` 'delete' or 'mkdir'): journaled,
        applied in order once S3 answers."""
        self.cache.catalog.journal_add(self.cache.origin, bucket, key, op, base_etag)
        log.info("offline: %s of s3://%s/%s queued", op, bucket, key)

    def unqueue(self, bucket: str, key: str, op: str) -> None:
        """A queued change that has become moot (the rmdir of a directory made offline):
        dropped from the journal, so nothing is sent."""
        self.cache.catalog.journal_forget(self.cache.origin, bucket, key, op)
        log.info("offline: the queued %s of s3://%s/%s dropped", op, bucket, key)

    def _entries(self) -> list[tuple[dict, CachedObject | None]]:
        """Every pending change in apply order: (journal row, dirty object for uploads).
        Dirty objects the journal does not name (a catalog older than it) come first."""
        dirty = {(o.bucket, o.key): o for o in self.cache.local_objects()
                 if o.uploaded_gen != o.gen and not self.is_local_only(o.key)}
        out: list[tuple[dict, CachedObject | None]] = []
        named = set()
        for j in self.cache.catalog.journal(self.cache.origin):
            if j["op"] == "upload":
                obj = dirty.get((j["bucket"], j["key"]))
                if obj is None or (j["bucket"], j["key"]) in named:
                    self.cache.catalog.journal_done(j["seq"])  # uploaded, or gone
                    continue
                named.add((j["bucket"], j["key"]))
                out.append((j, obj))
            else:
                out.append((j, None))
        front = [({"seq": None, "bucket": o.bucket, "key": o.key, "op": "upload",
                   "base_etag": o.row.base_etag, "time": o.row.mtime_ns / 1e9}, o)
                 for k, o in dirty.items() if k not in named]
        return front + out

    def pending(self) -> list[dict]:
        """Every change S3 has not got yet, in apply order: dicts with op ('upload', 'delete',
        'mkdir'), bucket, key, size (int for uploads, else None), base_etag (the version the
        change is conditional on; '' = must not exist; None = unconditional), since (epoch
        seconds of the change) and error (the last attempt's error text, or None)."""
        out = []
        for j, obj in self._entries():
            if obj is not None:
                out.append({"op": "upload", "bucket": obj.bucket, "key": obj.key,
                            "size": obj.size, "base_etag": obj.row.base_etag,
                            "since": j["time"], "error": obj.last_error})
            else:
                out.append({"op": j["op"], "bucket": j["bucket"], "key": j["key"], "size": None,
                            "base_etag": j["base_etag"], "since": j["time"],
                            "error": self._op_error.get(j["seq"])})
        return out

    async def sync_all(self) -> dict:
        """Try every pending change now, in order, ignoring backoff, and wait for each attempt.
        Returns {"uploaded": [{bucket, key, op}], "failed": [{bucket, key, op, error}],
        "conflicts": [{bucket, key, conflict_key}]}; never raises for one change's failure.
        Offline, every attempt fails at once and is listed as failed."""
        return await self._apply(force=True)

    async def _apply(self, force: bool) -> dict:
        """Apply the pending changes in order. A change waits while its key has an earlier
        change still failing (or, unless ``force``, backing off), and a delete also waits while
        any earlier upload does: a file renamed offline is deleted under its old name only once
        S3 has it under the new one. Without ``force`` the pass stops at the first sign that S3
        is unreachable."""
        result: dict[str, list] = {"uploaded": [], "failed": [], "conflicts": []}
        async with self._apply_lock:
            blocked: set[tuple[str, str]] = set()
            uploads: set[tuple[str, str]] = set()  # keys of the uploads met so far
            due: list[float] = []  # when what this pass left for later is to be tried
            for j, obj in self._entries():
                where = (j["bucket"], j["key"])
                item = {"bucket": j["bucket"], "key": j["key"], "op": j["op"]}
                if obj is not None:
                    uploads.add(where)
                elif j["op"] == "delete" and uploads & blocked:
                    blocked.add(where)
                    if force:
                        result["failed"].append({**item, "error": "waits for an earlier upload"})
                    continue
                if where in blocked or (obj is not None and obj.unlinked):
                    continue
                if obj is not None and obj.writers > 0:  # its close uploads it
                    blocked.add(where)
                    if force:
                        result["failed"].append({**item, "error": "open for writing: "
                                                 "uploaded when closed"})
                    continue
                retry_at = obj.retry_at if obj is not None else self._op_retry.get(j["seq"], (0, 0))[0]
                if not force and retry_at > time.monotonic():  # (a pass may take a while)
                    blocked.add(where)
                    due.append(retry_at)
                    continue
                try:
                    if obj is not None:
                        ckey = await self.upload(obj, closing=False)
                        if ckey is not None:
                            result["conflicts"].append({"bucket": j["bucket"], "key": j["key"],
                                                        "conflict_key": ckey})
                        else:
                            result["uploaded"].append(item)
                    else:
                        kept = await self._apply_op(j)
                        if kept:
                            result["conflicts"].append({"bucket": j["bucket"], "key": j["key"],
                                                        "conflict_key": j["key"]})
                        else:
                            result["uploaded"].append(item)
                except S3StashError as e:
                    blocked.add(where)
                    result["failed"].append({**item, "error": str(e)})
                    due.append(obj.retry_at if obj is not None
                               else self._op_retry.get(j["seq"], (0.0, 0.0))[0])
                    if isinstance(e, Unreachable) and not force:
                        break
                except OSError as e:
                    blocked.add(where)
                    result["failed"].append({**item, "error": f"cache file unreadable: {e}"})
                    log.error("upload of s3://%s/%s: cache file unreadable: %s", j["bucket"],
                              j["key"], e)
                    if obj is not None:
                        obj.retry_at = time.monotonic() + RETRY_MAX
            if not force:
                self._next_try = min(due, default=None)
        return result

    async def _apply_deletes(self, bucket: str, key: str) -> None:
        """The queued deletes of ``key``, now: a file made again under a name deleted while
        offline is uploaded after that delete, as the journal's order says."""
        async with self._apply_lock:
            for j in self.cache.catalog.journal(self.cache.origin):
                if j["op"] == "delete" and (j["bucket"], j["key"]) == (bucket, key):
                    try:
                        await self._apply_op(j)
                    except S3StashError:
                        return  # logged; the upload then finds out for itself

    async def _apply_op(self, j: dict) -> bool:
        """Apply one journaled namespace change; True when S3 had changed and kept its version
        instead (a conflict, recorded)."""
        bucket, key, seq = j["bucket"], j["key"], j["seq"]
        kept = False
        try:
            if j["op"] == "delete":
                try:
                    await self.store.delete_object(bucket, key, j["base_etag"] or None)
                except Conflict as e:
                    kept = True
                    log.warning("conflict: s3://%s/%s was deleted while offline but changed in "
                                "S3 since (%s); S3's version kept", bucket, key, e)
                    self.cache.catalog.add_event(
                        self.cache.origin, bucket, key, "conflict",
                        f"deleted while offline, but changed in S3 since "
                        f"(ETag {j['base_etag']}); S3's version kept as {key}")
            elif j["op"] == "mkdir":
                await self.store.put_marker(bucket, key, only_new=True)
            else:
                log.error("journal: unknown change %r of s3://%s/%s dropped", j["op"], bucket, key)
        except S3StashError as e:
            _, delay = self._op_retry.get(seq, (0.0, 0.0))
            delay = min(max(delay * 2, RETRY_FIRST), RETRY_MAX)
            self._op_retry[seq] = (time.monotonic() + random.uniform(delay / 2, delay), delay)
            self._op_error[seq] = str(e)
            log.warning("%s of s3://%s/%s failed (%s); kept in the journal, retrying", j["op"],
                        bucket, key, e)
            self.cache.record_error(bucket, key, f"{j['op']} failed: {e}")
            raise
        crashpoints.hit("journal.applied")
        self.cache.catalog.journal_done(seq)
        self._op_retry.pop(seq, None)
        self._op_error.pop(seq, None)
        log.info("applied the queued %s of s3://%s/%s", j["op"], bucket, key)
        return kept

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: apply every pending change no one is writing, in order, when its retry
        time comes (at once for what a previous mount left: the cache loaded those at mount),
        and nothing while offline (``retry_now`` wakes it when S3 answers again)."""
        n = len(self.pending())
        if n:
            log.info("%d change(s) not yet in S3: applying them%s", n,
                     "" if self.online else " once S3 answers")
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await self._retry_loop()

    async def _retry_loop(self) -> None:
        while True:
            self._wake = trio.Event()  # before the pass: a kick during it is not lost
            if self.online:
                await self._apply(force=False)
            if self.online:
                # what was due was tried (or waits behind a change of its key that failed); the
                # rest is due when the pass said, even if that time came while the pass ran
                nxt = self._next_try
                timeout = RETRY_MAX if nxt is None else max(nxt - time.monotonic(), 0.05)
            else:
                timeout = RETRY_MAX  # retry_now() wakes us when S3 answers
            with trio.move_on_after(timeout):
                await self._wake.wait()

    def retry_now(self) -> None:
        """S3 is back: pending changes need not wait out their backoff."""
        for obj in self.cache.local_objects():
            obj.retry_at = 0.0
        self._op_retry = {seq: (0.0, d) for seq, (_, d) in self._op_retry.items()}
        self.kick()

    def kick(self) -> None:
        """Something became uploadable (a writer closed): look now."""
        self._wake.set()
