"""Turning local changes into objects: one PUT or a parallel multipart upload, verified, and a
retry queue so that nothing written through the mount is ever lost.

A file written through the mount is uploaded when it is closed (``flush``) or fsync'ed. Before
an upload is tried, its bytes and its catalog row (dirty) are made durable; an upload that fails
leaves the object dirty: it is never evicted or replaced by a remote version, and it is retried
in the background with backoff and jitter, after a remount too.
"""
from __future__ import annotations

import fnmatch
import logging
import random
import time

import trio

from .cache import Cache, CachedObject
from .errors import S3StashError
from .store import Store, meta_mtime, run_all

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


def part_size_for(size: int, part_size: int) -> int:
    """The configured part size, grown (in MiB steps) so that ``size`` fits in 10,000 parts."""
    need = -(-size // MAX_PARTS)
    if need <= part_size:
        return part_size
    mib = 1 << 20
    return -(-need // mib) * mib


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
    def __init__(self, store: Store, cache: Cache, threshold: int, part_size: int,
                 local_only: tuple[str, ...] = ()):
        self.store = store
        self.cache = cache
        self.threshold = threshold
        self.part_size = part_size
        self.local_only = local_only
        self._wake = trio.Event()
        self.nursery: trio.Nursery | None = None  # set by run(): part uploads outlive writes

    def is_local_only(self, key: str) -> bool:
        """Editor swap and lock files (by default) live in the cache only: never uploaded."""
        name = key.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, g) for g in self.local_only)

    # ------------------------------------------------------------ streaming while writing
    def wrote(self, obj: CachedObject, off: int, n: int) -> None:
        """A write landed in the cache file. A file written front to back gets its complete parts
        uploaded while the writing goes on; anything else stops that (the close uploads all)."""
        st = obj.stream
        if off != obj.seq_end or self.nursery is None or self.is_local_only(obj.key):
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
            st.parts[i] = await self.store.upload_part(
                obj.bucket, st.key, st.upload_id, i + 1, self.cache.ensure_open(obj),
                i * st.part_size, st.part_size)
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

    async def _finish_stream(self, obj: CachedObject, fd: int) -> str:
        """Send the parts not sent yet, wait for all, and join them."""
        st = obj.stream
        await st.ready.wait()
        last = -(-obj.size // st.part_size)
        try:
            if st.error is not None:
                raise st.error
            async def part(_, i):
                st.parts[i] = await self.store.upload_part(
                    obj.bucket, st.key, st.upload_id, i + 1, fd, i * st.part_size,
                    min(st.part_size, obj.size - i * st.part_size))
            await run_all(part, range(st.next_part, last))
            while st.running:
                await st.changed.wait()
            if st.error is not None:
                raise st.error
            etag = await self.store.complete_multipart(
                obj.bucket, st.key, st.upload_id, [st.parts[i] for i in range(last)])
        except BaseException:
            self.break_stream(obj)
            raise
        obj.stream = None
        return etag

    # ------------------------------------------------------------ uploads
    async def upload(self, obj: CachedObject) -> None:
        """Upload the local bytes of ``obj`` if S3 does not have this generation yet. Raises
        the domain error on failure; the object then stays dirty and queued for a retry."""
        async with obj.lock:
            gen = obj.gen
            if obj.unlinked or not obj.dirty or obj.uploaded_gen == gen or self.is_local_only(obj.key):
                return
            meta = dict(obj.row.metadata or {})
            meta["mtime"] = meta_mtime(obj.row.mtime_ns)
            fd = self.cache.ensure_open(obj)
            sent: list[str] = []
            streamed = obj.stream if self._stream_usable(obj) else None
            if streamed is None:
                self.break_stream(obj)
            else:
                meta = streamed.meta  # its parts went up with these, mtime included

            async def send():
                if streamed is not None:
                    sent.append(await self._finish_stream(obj, fd))
                elif obj.size <= self.threshold:
                    sent.append(await self.store.put_file(obj.bucket, obj.key, fd, obj.size, meta))
                else:
                    sent.append(await self.store.multipart_upload(
                        obj.bucket, obj.key, fd, obj.size, part_size_for(obj.size, self.part_size),
                        meta))

            async def durable():
                await self.cache.sync_one(obj)

            # The local copy is made durable while the upload runs, not before it: whatever
            # happens to the upload, close() returns only once both are done.
            try:
                await run_all(lambda _, job: job(), [durable, send])
            except S3StashError as e:
                self._failed(obj, e)
                raise
            etag = sent[0]
            if streamed is not None:
                obj.row.mtime_ns = streamed.mtime_ns  # what S3 was told when the parts began
            obj.row.metadata = meta
            self.cache.uploaded(obj, gen, etag)
            self.cache.catalog.clear_events(obj.bucket, obj.key, "error")
            log.info("uploaded s3://%s/%s (%d bytes, ETag %s)", obj.bucket, obj.key, obj.size, etag)

    def _failed(self, obj: CachedObject, e: S3StashError) -> None:
        obj.retry_delay = min(max(obj.retry_delay * 2, RETRY_FIRST), RETRY_MAX)
        obj.retry_at = time.monotonic() + random.uniform(obj.retry_delay / 2, obj.retry_delay)
        log.warning("upload of s3://%s/%s failed (%s); kept in the cache, retrying in %.0f s",
                    obj.bucket, obj.key, e, obj.retry_at - time.monotonic())
        self.cache.catalog.add_event(self.cache.origin, obj.bucket, obj.key, "error",
                                     f"upload failed: {e}")
        self._wake.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: upload every dirty object no one is writing, when its retry time comes
        (at once for what a previous mount left dirty: the cache loaded those at mount)."""
        pending = [o for o in self.cache.local_objects() if not self.is_local_only(o.key)]
        if pending:
            log.info("%d file(s) with changes not yet in S3: uploading", len(pending))
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await self._retry_loop()

    async def _retry_loop(self) -> None:
        while True:
            now = time.monotonic()
            due = [o for o in self.cache.local_objects()
                   if o.writers == 0 and o.retry_at <= now and o.uploaded_gen != o.gen
                   and not self.is_local_only(o.key)]
            for obj in due:
                try:
                    await self.upload(obj)
                except S3StashError:
                    pass  # logged, and rescheduled by _failed
                except OSError as e:
                    log.error("upload of s3://%s/%s: cache file unreadable: %s", obj.bucket, obj.key, e)
                    obj.retry_at = time.monotonic() + RETRY_MAX
            waits = [o.retry_at - time.monotonic() for o in self.cache.local_objects()
                     if o.writers == 0 and o.uploaded_gen != o.gen and not self.is_local_only(o.key)]
            self._wake = trio.Event()
            with trio.move_on_after(max(min(waits, default=RETRY_MAX), 0.05)):
                await self._wake.wait()

    def retry_now(self) -> None:
        """S3 is back: pending uploads need not wait out their backoff."""
        for obj in self.cache.local_objects():
            obj.retry_at = 0.0
        self.kick()

    def kick(self) -> None:
        """Something became uploadable (a writer closed): look now."""
        self._wake.set()
