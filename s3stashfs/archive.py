"""Archived objects in the mount: refused at open without a download, one log line each, their
storage class and restore state as xattrs, and the ``restore`` command's work.

An object in GLACIER or DEEP_ARCHIVE, or in an archive tier of INTELLIGENT_TIERING, cannot be
read until it is restored (see store/archive.py). A listing gives its class but not whether it
is restored, so an open of such an object asks S3 with a HEAD, whatever the listing's age.
Bytes already cached under the same ETag are served as ever: they need no GET.
"""
from __future__ import annotations

import logging
import shlex
import time
from typing import TYPE_CHECKING

import trio

from .progress import each_reporting
from .errors import Archived, NotFound, S3StashError
from .inodes import InodeTable, Kind, Node
from .store.archive import (
    ARCHIVE_CLASSES,
    TIERED,
    archive_label,
    may_be_archived,
    parse_restore,
    readable,
    restore_state,
)

if TYPE_CHECKING:
    from .cache import Cache
    from .namespace import Namespace
    from .store import ObjectInfo

log = logging.getLogger(__name__)

RESTORE_PARALLEL = 8
KEEP = 100_000  # keys remembered in each of Archives' sets
TIERS = ("Standard", "Bulk", "Expedited")  # S3's retrieval tiers (cli.py names them too)


class Archives:
    """What the mount knows of archived objects.

    Owns ``_logged`` ((bucket, key) -> the message last logged for it: one line per object and
    state, not per open) and ``_recheck`` (keys whose GET S3 refused, or whose restore was asked
    for: their next open asks S3 with a HEAD, whatever the listing says). A key leaves both once
    it is seen readable, so that archiving it again is logged again."""

    def __init__(self, ns: Namespace, cache: Cache, inodes: InodeTable, mountpoint: str = ""):
        self.ns = ns
        self.cache = cache
        self.inodes = inodes
        self.mountpoint = mountpoint
        self._logged: dict[tuple[str, str], str] = {}
        self._recheck: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ open and read
    async def check_open(self, node: Node, info: ObjectInfo) -> ObjectInfo:
        """The version ``open()`` may serve, or Archived (before any GET) when S3 would refuse
        to send its bytes and the cache does not hold them all."""
        where = (node.bucket, node.key)
        if where not in self._recheck and not may_be_archived(info):
            # the common case, first and cheap: no catalog query on every open
            self._logged.pop(where, None)  # readable: a later archiving is logged again
            return info
        if self._cached_whole(node.bucket, node.key, info.etag):
            return info
        if (not info.from_head and may_be_archived(info)) or where in self._recheck:
            info = await self.ns.revalidate(node, force=True)
            if self._cached_whole(node.bucket, node.key, info.etag):
                return info
        if not readable(info):
            raise self.refuse(node.bucket, node.key, info)
        self._readable(where)
        return info

    async def get_refused(self, node: Node, e: Archived) -> Archived:
        """S3 refused a GET (403 InvalidObjectState): the object was archived after it was
        listed, or its restored copy expired. A HEAD tells how it is archived, for the message."""
        self._note_recheck(node.bucket, node.key)
        info = None
        try:
            info = await self.ns.revalidate(node, force=True)
        except S3StashError as e2:
            log.debug("HEAD after a refused GET of s3://%s/%s: %s", node.bucket, node.key, e2)
        if info is None or archive_label(info) is None:
            label = e.storage_class or (info.storage_class if info is not None
                                        and info.storage_class != "STANDARD" else None)
            return self._refused(node.bucket, node.key, label or "an archive storage class", False)
        return self.refuse(node.bucket, node.key, info)

    def refuse(self, bucket: str, key: str, info: ObjectInfo) -> Archived:
        r = parse_restore(info.restore)
        label = archive_label(info) or info.storage_class
        return self._refused(bucket, key, label, r is not None and r.ongoing)

    def _refused(self, bucket: str, key: str, label: str, ongoing: bool) -> Archived:
        """The error for an archived object, logged (and kept for ``status``) once per object
        and state."""
        uri = f"s3://{bucket}/{key}"
        if ongoing:
            msg = (f"{uri} is in {label} and its restore is still in progress: open it again "
                   f"once it is done")
        else:
            msg = (f"{uri} is in {label} and not restored: run `s3stashfs restore "
                   f"{shlex.quote(self.path_of(bucket, key))}` (or restore it in S3), then open "
                   f"it again")
        if self._logged.get((bucket, key)) != msg:
            if len(self._logged) > KEEP:
                self._logged.clear()  # bounded: at worst a line is logged again
            self._logged[(bucket, key)] = msg
            log.warning("%s", msg)
            self.cache.record_error(bucket, key, msg)
        self._note_recheck(bucket, key)
        return Archived(msg, storage_class=label)

    def _note_recheck(self, bucket: str, key: str) -> None:
        if len(self._recheck) > KEEP:
            self._recheck.clear()  # bounded: at worst one more GET is refused
        self._recheck.add((bucket, key))

    def _readable(self, where: tuple[str, str]) -> None:
        self._recheck.discard(where)
        self._logged.pop(where, None)

    def _cached_whole(self, bucket: str, key: str, etag: str) -> bool:
        """Does the cache hold every byte of version ``etag`` (no GET needed to read it)?"""
        obj = self.cache.current(bucket, key)
        if obj is not None:
            return obj.etag == etag and obj.present.covers(0, obj.nblocks)
        row = self.cache.catalog.get(self.cache.origin, bucket, key)
        return row is not None and row.etag == etag and self.cache.describe(
            bucket, key).startswith("complete")

    def path_of(self, bucket: str, key: str) -> str:
        """The object's path in the mount, for messages (its S3 URI when it has none)."""
        root = self.inodes.root
        if root.kind is Kind.ROOT:
            rel = f"{bucket}/{key}"
        elif bucket == root.bucket and key.startswith(root.key):
            rel = key[len(root.key):]
        else:
            return f"s3://{bucket}/{key}"
        return f"{self.mountpoint.rstrip('/')}/{rel}" if self.mountpoint else rel

    # ------------------------------------------------------------------ xattrs
    async def xattrs(self, node: Node) -> dict[str, str]:
        """user.s3.storage-class (S3's class name), user.s3.restore ("not restored", "in
        progress", "restored until DATE"; archived objects only) and user.s3.archive-status
        (INTELLIGENT_TIERING's archive tier). A listing does not know the restore state: an
        object it calls archived is asked about with a HEAD."""
        info = node.info
        if info is None:
            return {}
        if not info.from_head and may_be_archived(info):
            info = await self.ns.revalidate(node, force=True)
        out = {"user.s3.storage-class": info.storage_class}
        if info.archive_status:
            out["user.s3.archive-status"] = info.archive_status
        state = restore_state(info)
        if state is not None:
            out["user.s3.restore"] = state
        return out

    # ------------------------------------------------------------------ restore
    async def restore(self, targets: list[tuple[str, str, ObjectInfo]], days: int, tier: str,
                      send) -> dict:
        """Ask S3 to restore every archived object of ``targets`` (bucket, key, listed info), a
        few at a time, reporting progress through ``send``. Each gets a state: "requested",
        "in progress", "restored" (with its expiry), "not archived" (skipped) or "failed"."""
        results: list[dict] = []
        done = {"files": 0, "bytes": 0}
        total = sum(t[2].size for t in targets)
        limiter = trio.CapacityLimiter(RESTORE_PARALLEL)
        t0 = time.monotonic()

        async def one(bucket: str, key: str, info: ObjectInfo) -> None:
            async with limiter:
                try:
                    r = await self._restore_one(bucket, key, info, days, tier)
                except S3StashError as e:
                    r = {"state": "failed", "error": str(e)}
                results.append({"bucket": bucket, "key": key, "size": info.size, **r})
                done["files"] += 1
                done["bytes"] += info.size

        async def report() -> None:
            await send({"progress": {"files": done["files"], "files_total": len(targets),
                                     "bytes": done["bytes"], "bytes_total": total,
                                     "elapsed": time.monotonic() - t0}})

        await each_reporting(targets, one, report, 0.25)
        order = {(b, k): i for i, (b, k, _) in enumerate(targets)}
        results.sort(key=lambda r: order[(r["bucket"], r["key"])])
        counts: dict[str, int] = {}
        for r in results:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        log.info("restore (%s, %d days): %s", tier, days,
                 ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do")
        return {"objects": results, "counts": counts, "days": days, "tier": tier,
                "seconds": time.monotonic() - t0}

    async def _restore_one(self, bucket: str, key: str, info: ObjectInfo, days: int,
                           tier: str) -> dict:
        store = self.ns.store
        if (not may_be_archived(info) if not info.from_head else
                archive_label(info) is None and info.restore is None):
            return {"state": "not archived", "storage_class": info.storage_class}
        head = await store.head_object(bucket, key)  # the restore state and the tier
        if head is None:
            raise NotFound(f"s3://{bucket}/{key}: no such object")
        label = archive_label(head)
        out: dict = {"storage_class": head.storage_class}
        if head.archive_status:
            out["archive_status"] = head.archive_status
        r = parse_restore(head.restore)
        if label is None and (r is None or not r.ongoing):
            return {**out, "state": "not archived"}
        if r is not None:
            return {**out, "state": "in progress"} if r.ongoing else \
                {**out, "state": "restored", "expiry": r.expiry}
        if tier == "Expedited" and (head.storage_class == "DEEP_ARCHIVE"
                                    or head.archive_status == "DEEP_ARCHIVE_ACCESS"):
            return {**out, "state": "failed",
                    "error": f"{label} offers no Expedited retrieval: use Standard or Bulk"}
        # INTELLIGENT_TIERING's archive tiers take no days: the object moves back to its
        # frequent tier for good
        state = await store.restore_object(
            bucket, key, days if head.storage_class in ARCHIVE_CLASSES else None, tier)
        self._note_recheck(bucket, key)
        self._logged.pop((bucket, key), None)
        if state == "restored":  # a restored copy was there already (the HEAD just missed it)
            again = await store.head_object(bucket, key)
            r = parse_restore(again.restore) if again is not None else None
            return {**out, "state": "restored", "expiry": r.expiry if r else None}
        if state == "requested":
            log.info("s3://%s/%s: restore from %s requested (%s%s)", bucket, key, label, tier,
                     f", {days} days" if head.storage_class != TIERED else "")
        return {**out, "state": state}
