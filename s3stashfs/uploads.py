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


class Uploader:
    def __init__(self, store: Store, cache: Cache, threshold: int, part_size: int,
                 local_only: tuple[str, ...] = ()):
        self.store = store
        self.cache = cache
        self.threshold = threshold
        self.part_size = part_size
        self.local_only = local_only
        self._wake = trio.Event()

    def is_local_only(self, key: str) -> bool:
        """Editor swap and lock files (by default) live in the cache only: never uploaded."""
        name = key.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(name, g) for g in self.local_only)

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

            async def send():
                if obj.size <= self.threshold:
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
            obj.row.metadata = meta
            self.cache.uploaded(obj, gen, etag)
            log.info("uploaded s3://%s/%s (%d bytes, ETag %s)", obj.bucket, obj.key, obj.size, etag)

    def _failed(self, obj: CachedObject, e: S3StashError) -> None:
        obj.retry_delay = min(max(obj.retry_delay * 2, RETRY_FIRST), RETRY_MAX)
        obj.retry_at = time.monotonic() + random.uniform(obj.retry_delay / 2, obj.retry_delay)
        log.warning("upload of s3://%s/%s failed (%s); kept in the cache, retrying in %.0f s",
                    obj.bucket, obj.key, e, obj.retry_at - time.monotonic())
        self._wake.set()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background: upload every dirty object no one is writing, when its retry time comes
        (at once for what a previous mount left dirty: the cache loaded those at mount)."""
        pending = [o for o in self.cache.local_objects() if not self.is_local_only(o.key)]
        if pending:
            log.info("%d file(s) with changes not yet in S3: uploading", len(pending))
        task_status.started()
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

    def kick(self) -> None:
        """Something became uploadable (a writer closed): look now."""
        self._wake.set()
