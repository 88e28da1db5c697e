"""The pyfuse3.Operations adapter: unpack requests, call the core, map errors to errno.

Nothing here knows S3: it speaks inodes and file handles to the kernel and bucket/key/ETag to
the core. Only ``FUSEError`` leaves a handler; every other exception is mapped by
``errors.errno_for``, and an unexpected one is logged with its traceback and becomes EIO.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import stat
import time

import pyfuse3
import trio

from . import crashpoints
from .archive import Archives
from .cache import Cache, CachedObject, check_reserve
from .errors import (Archived, Changed, Damaged, Exists, IsADirectory, NotADirectory, NotEmpty,
                     NotFound, NotSupported, ReadOnly, S3StashError, Unreachable, errno_for)
from .fetch import Fetcher, ReadState
from .inodes import InodeTable, Kind, Node
from .namespace import Namespace
from .store import meta_mtime, run_all
from .store.archive import readable
from .uploads import Uploader

log = logging.getLogger(__name__)

SIBLING_PREFETCH = 8  # small files fetched ahead of a directory read in order
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR
_RESERVED_META = {"mtime", "mode", "uid", "gid", "atime", "ctime"}  # file attributes, not xattrs
_META_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*")


def handler(fn):
    """Run a request handler; turn whatever it raises into the right FUSEError."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (NotFound, ReadOnly, Changed, Exists, NotEmpty, NotADirectory, IsADirectory,
                NotSupported, Damaged, Archived) as e:
            # expected answers; Changed is logged by read(), Damaged by the cache (once per file),
            # Archived by archive.py (once per object)
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Unreachable as e:
            log.warning("%s: S3 is unreachable: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except S3StashError as e:
            log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                log.error("%s: cache disk full: %s", fn.__name__, e)
            else:
                log.exception("%s: unexpected OS error", fn.__name__)
            raise pyfuse3.FUSEError(errno_for(e)) from None
        except Exception as e:
            code = errno_for(e)
            if code == errno.ENOSPC:  # the catalog on a full disk
                log.error("%s: cache disk full: %s", fn.__name__, e)
            else:
                log.exception("%s: unexpected error", fn.__name__)
            raise pyfuse3.FUSEError(code) from None
    return wrapper


class FileHandle:
    __slots__ = ("node", "obj", "state", "served", "writable")

    def __init__(self, node: Node, obj: CachedObject, writable: bool = False):
        self.node = node
        self.obj = obj
        self.state = ReadState()
        self.served = False  # no byte handed out yet: a version change can still be followed
        self.writable = writable


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, inodes: InodeTable, ns: Namespace, cache: Cache, fetcher: Fetcher,
                 uploader: Uploader, ttl: float, read_only: bool = False, xattrs: bool = False,
                 archives: Archives | None = None):
        super().__init__()
        self.archives = archives or Archives(ns, cache, inodes)
        self.xattrs = xattrs
        self.uploader = uploader
        self.inodes = inodes
        self.ns = ns
        self.cache = cache
        self.fetcher = fetcher
        self.ttl = ttl
        self.read_only = read_only
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self._handles: dict[int, FileHandle] = {}
        self._dirs: dict[int, list[Node]] = {}
        self._next_fh = 1
        self._stale_pages: set[tuple[str, str]] = set()  # see _bytes_dropped
        fetcher.verifier.on_dropped.append(self._bytes_dropped)

    # ------------------------------------------------------------ attributes
    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.ttl
        a.attr_timeout = self.ttl
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 1 << 20  # programs size their buffers by it: 1 MiB is the largest FUSE request
        if node.kind.is_object:
            info = node.info
            local = self.cache.current(node.bucket, node.key)
            if local is not None and local.dirty:
                size, mtime, meta = local.size, local.row.mtime_ns, local.row.metadata or {}
            elif info is not None:
                size, mtime, meta = info.size, info.mtime_ns, dict(info.metadata)
            else:
                size, mtime, meta = 0, self.started_ns, {}
            if node.kind is Kind.SYMLINK:
                a.st_mode = stat.S_IFLNK | 0o777
            else:
                a.st_mode = stat.S_IFREG | (_meta_int(meta, "mode", 0o644) & 0o7777)
            a.st_uid = _meta_int(meta, "uid", self.uid)
            a.st_gid = _meta_int(meta, "gid", self.gid)
            a.st_nlink = 1
            a.st_size = size
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = mtime
        else:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 1  # unknown subdirectory count: tells find(1) not to skip any
            a.st_size = 0
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = self.started_ns
        a.st_blocks = (a.st_size + 511) // 512
        return a

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        node = await self.ns.lookup(self.inodes.get(parent_inode), name)
        self.inodes.incref(node)
        return self.attrs(node)

    @handler
    async def getattr(self, inode, ctx=None):
        node = self.inodes.get(inode)
        if node.kind.is_object and node.info is None:
            raise NotFound(f"s3://{node.bucket}/{node.key} is gone")
        return self.attrs(node)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    # ------------------------------------------------------------ directories
    @handler
    async def opendir(self, inode, ctx):
        node = self.inodes.get(inode)
        children = await self.ns.listdir(node)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = children
        return fh

    @handler
    async def readdir(self, fh, start_id, token):
        children = self._dirs[fh]
        for i in range(start_id, len(children)):
            child = children[i]
            if not pyfuse3.readdir_reply(token, child.name, self.attrs(child), i + 1):
                break
            self.inodes.incref(child)

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # ------------------------------------------------------------ files
    @handler
    async def open(self, inode, flags, ctx):
        writing = bool(flags & _WRITE_FLAGS)
        if writing:
            await self._changing()
        node = self.inodes.get(inode)
        if node.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.ELOOP if node.kind is Kind.SYMLINK else errno.EISDIR)
        if writing and flags & os.O_TRUNC:
            obj = await self._truncated(node)
            self.ns.local_changed(node, obj)
            self._invalidate_attrs(node)
            same = False
        else:
            old = node.info
            try:
                info = await self.ns.revalidate(node)
            except NotFound:
                self._forget_entry(node)
                raise
            info = await self.archives.check_open(node, info)  # archived: EREMOTE, no GET
            obj, same = self.cache.open_object(node.bucket, node.key, info)
            if old is not None and (old.size != info.size or old.mtime_ns != info.mtime_ns):
                self._invalidate_attrs(node)
            if writing:  # changing an object means having all of it
                try:
                    await self.fetcher.fetch_all(obj)
                    self.cache.make_local(obj)
                    await self.cache.sync_one(obj)  # dirty on disk before any write lands
                except BaseException:
                    self.cache.release(obj)
                    raise
                self.ns.local_changed(node, obj)
            else:
                self.fetcher.prefetch(obj)
                self._prefetch_siblings(node)
        if (node.bucket, node.key) in self._stale_pages:
            self._stale_pages.discard((node.bucket, node.key))
            same = False
        return pyfuse3.FileInfo(fh=self._new_handle(node, obj, writing), keep_cache=same,
                                direct_io=_write_only(flags))

    def _new_handle(self, node: Node, obj: CachedObject, writable: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = FileHandle(node, obj, writable)
        if writable:
            obj.writers += 1
        return fh

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnly("mounted read-only")

    @property
    def _offline(self) -> bool:
        return not self.ns.store.connectivity.online

    async def _changing(self) -> None:
        """A change is about to be made. Offline, with offline_writes=refuse (the default), it
        needs S3: it fails at once and nothing changes, unless an on-demand probe finds S3
        back; with queue it is made in the cache and queued."""
        self._writable()
        if (self._offline and not self.uploader.queue_offline
                and not await self.ns.store.recheck()):
            raise Unreachable("S3 is unreachable, and changes are refused while offline "
                              "(offline_writes=refuse)")

    async def _online_only(self, what: str) -> None:
        """Changes that are never queued: offline they fail at once, in both modes, unless an
        on-demand probe finds S3 back."""
        if self._offline and not await self.ns.store.recheck():
            raise Unreachable(f"S3 is unreachable: {what} is not queued while offline")

    def _remote_base(self, bucket: str, key: str, node: Node | None) -> str | None:
        """The version S3 holds of ``key`` as far as the mount knows: what a change replacing
        it is based on ('' = no object, None = not known)."""
        local = self.cache.current(bucket, key)
        if local is not None and local.dirty:
            return local.row.base_etag if local.row.base_etag is not None else local.etag
        if node is None:
            return ""
        if node.info is not None:
            return node.info.etag
        row = self.cache.catalog.get(self.cache.origin, bucket, key)
        return row.etag if row is not None else None

    async def _truncated(self, node: Node) -> CachedObject:
        """The object, emptied locally (O_TRUNC), opened once."""
        obj = self.cache.current(node.bucket, node.key)
        if obj is not None and obj.dirty:
            async with obj.lock:
                os.ftruncate(self.cache.ensure_open(obj), 0)
                obj.changed_locally(0)
                self.uploader.break_stream(obj)
                obj.seq_end = 0
            obj.opens += 1
            return obj
        obj = self.cache.create_local(node.bucket, node.key,
                                      self._remote_base(node.bucket, node.key, node))
        obj.opens += 1
        return obj

    def _prefetch_siblings(self, node: Node) -> None:
        """A program reading a directory's files one after another in listing order (`cat
        dir/*`, a loop over os.listdir) gets the next small files fetched while it works."""
        listing = self.ns.fresh_listing(node)
        if listing is None:
            return
        i, following = listing.after(node, SIBLING_PREFETCH)
        in_order = 0 < i - listing.cursor <= 2
        listing.cursor = i
        if not in_order:
            return
        for pos, child in enumerate(following, start=i + 1):
            if pos <= listing.ahead:
                continue
            listing.ahead = pos
            info = child.info
            if (child.kind is Kind.FILE and info is not None and self.fetcher.small(info.size)
                    and readable(info)):  # GLACIER, DEEP_ARCHIVE not known restored: no GET
                obj, _ = self.cache.open_object(child.bucket, child.key, info, opening=False)
                self.fetcher.prefetch(obj)
                self.cache.release_if_idle(obj)

    def _forget_entry(self, node: Node) -> None:
        """The object is gone from S3: make the kernel drop its cached name."""
        try:
            pyfuse3.invalidate_entry_async(node.parent, node.name, ignore_enoent=True)
        except OSError as e:
            log.debug("invalidate_entry(%d): %s", node.ino, e)

    def _bytes_dropped(self, bucket: str, key: str) -> None:
        """Cached bytes of this object did not match S3's sums and were dropped: the kernel must
        not serve its copy of them either. The next open drops its page cache (no keep_cache);
        the pages of a file open now are invalidated from a thread (the kernel may wait on a
        read of that file, which this loop must stay free to answer)."""
        self._stale_pages.add((bucket, key))
        if len(self._stale_pages) > 10_000:
            self._stale_pages.clear()
        inos = {h.node.ino for h in self._handles.values()
                if h.node.bucket == bucket and h.node.key == key}
        if inos and self.fetcher.nursery is not None:
            self.fetcher.nursery.start_soon(_invalidate_pages, inos)

    def _invalidate_attrs(self, node: Node) -> None:
        try:
            pyfuse3.invalidate_inode(node.ino, attr_only=True)
        except OSError as e:
            log.debug("invalidate_inode(%d): %s", node.ino, e)

    @handler
    async def read(self, fh, off, size):
        h = self._handles[fh]
        try:
            return await self._read(h, off, size)
        except (Unreachable, Damaged):
            raise  # offline: status says so; damaged bytes: recorded by the cache
        except Archived as e:  # archived since its listing, or its restored copy expired
            raise await self.archives.get_refused(h.node, e) from None
        except Changed:
            self.cache.record_error(h.obj.bucket, h.obj.key, "read: changed in S3 while open "
                                    f"(this open had ETag {h.obj.etag}): EIO")
            raise
        except S3StashError as e:
            self.cache.record_error(h.obj.bucket, h.obj.key, f"read: {e}")
            raise

    async def _read(self, h, off: int, size: int) -> bytes | memoryview:
        try:
            data = await self.fetcher.read(h.obj, h.state, off, size)
        except Changed as e:
            if h.served:
                log.error("s3://%s/%s changed while open (ETag %s); this open gets EIO: %s",
                          h.obj.bucket, h.obj.key, h.obj.etag, e)
                raise
            # Nothing served yet: follow the object to its new version instead of failing.
            log.info("s3://%s/%s changed before its first read: reading the new version",
                     h.obj.bucket, h.obj.key)
            info = await self.ns.revalidate(h.node, force=True)
            obj, _ = self.cache.open_object(h.node.bucket, h.node.key, info)
            self.cache.release(h.obj)
            h.obj = obj
            self._invalidate_attrs(h.node)
            data = await self.fetcher.read(h.obj, h.state, off, size)
        h.served = True
        return data

    @handler
    async def write(self, fh, off, buf):
        h = self._handles[fh]
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        crashpoints.hit("write.received")  # the writes before this one have returned
        obj = h.obj
        async with obj.lock:  # not while an upload reads the file
            fd = self.cache.ensure_open(obj)
            view = memoryview(buf)
            pos = off
            try:
                while view:
                    try:
                        check_reserve(fd)
                        n = os.pwrite(fd, view, pos)
                    except OSError as e:  # a full cache disk: make room once, then ENOSPC
                        if e.errno != errno.ENOSPC or not await self.cache.make_room(len(view)):
                            raise
                        check_reserve(fd)
                        n = os.pwrite(fd, view, pos)
                    pos += n
                    view = view[n:]
            finally:
                if pos > off:  # what was written is a change, even if the rest failed
                    obj.changed_locally(max(obj.size, pos))
                    self.uploader.wrote(obj, off, pos - off)
        crashpoints.hit("write.done")  # in the cache file, not yet answered
        return len(buf)

    @handler
    async def flush(self, fh):
        """close() (and each dup'ed close): upload what changed, and report how it went."""
        h = self._handles.get(fh)
        if h is not None and h.writable:
            try:
                await self.uploader.upload(h.obj)
            finally:
                await self._after_change(h.node, h.obj)

    async def _after_change(self, node: Node, obj: CachedObject) -> None:
        """The node shows its local version; unless a conflict moved that to another key:
        then the name shows S3's version again."""
        if obj.key == node.key:
            self.ns.local_changed(node, obj)
            return
        self._invalidate_attrs(node)
        try:
            await self.ns.revalidate(node, force=True)
        except S3StashError as e:
            log.debug("after the conflict on %r: %s", node, e)

    @handler
    async def fsync(self, fh, datasync):
        await self.flush(fh)

    @handler
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is not None:
            if h.writable:
                h.obj.writers -= 1
                if h.obj.key == h.node.key:
                    self.ns.local_changed(h.node, h.obj)
                self.uploader.kick()
            self.cache.release(h.obj)

    # ------------------------------------------------------------ namespace changes
    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        await self._changing()
        parent = self.inodes.get(parent_inode)
        text = self.ns.check_new_name(parent, name)
        existing = await self._maybe_lookup(parent, name)
        if existing is not None and existing.kind.is_dir:
            raise IsADirectory(text)
        base = self._remote_base(parent.bucket, parent.key + text, existing)
        node = self.ns.added(parent, name, Kind.FILE, parent.key + text)
        obj = self.cache.create_local(node.bucket, node.key, base)
        obj.row.metadata = _mode_meta(mode, ctx)
        obj.opens += 1
        self.ns.local_changed(node, obj)
        fh = self._new_handle(node, obj, True)
        self.inodes.incref(node)
        return pyfuse3.FileInfo(fh=fh, direct_io=_write_only(flags)), self.attrs(node)

    async def _maybe_lookup(self, parent: Node, name: bytes) -> Node | None:
        try:
            return await self.ns.lookup(parent, name)
        except NotFound:
            return None

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        await self._changing()
        parent = self.inodes.get(parent_inode)
        text = self.ns.check_new_name(parent, name)
        if await self._maybe_lookup(parent, name) is not None:
            raise Exists(text)
        if self._offline:  # queue mode: the marker goes up once S3 answers
            self.uploader.queue(parent.bucket, parent.key + text + "/", "mkdir", "")
        else:
            await self.ns.store.put_marker(parent.bucket, parent.key + text + "/")
        node = self.ns.added(parent, name, Kind.DIR, parent.key + text + "/")
        self.inodes.incref(node)
        return self.attrs(node)

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        await self._changing()
        parent = self.inodes.get(parent_inode)
        node = await self.ns.lookup(parent, name)
        if not node.kind.is_dir:
            raise NotADirectory(repr(node))
        if self._offline:  # queue mode: only a directory the mount knows to be empty
            made, marker = self.ns.offline_rmdir(node)
            if made:  # its marker was never sent: nothing to send now either
                self.uploader.unqueue(node.bucket, node.key, "mkdir")
            if marker is not None:
                self.uploader.queue(node.bucket, node.key, "delete", marker)
            self.ns.removed(parent, name)
            return
        if not await self.ns.is_empty(node):
            raise NotEmpty(repr(node))
        await self.ns.store.delete_object(node.bucket, node.key)
        self.ns.removed(parent, name)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        await self._changing()
        parent = self.inodes.get(parent_inode)
        node = await self.ns.lookup(parent, name)
        if node.kind.is_dir:
            raise IsADirectory(repr(node))
        local = self.cache.current(node.bucket, node.key)
        if local is not None:
            self.uploader.break_stream(local)
        base = self._remote_base(node.bucket, node.key, node)
        if base != "":  # S3 has (or may have) a version: it goes too
            if self._offline:  # queue mode: deleted once S3 answers, if still that version
                self.uploader.queue(node.bucket, node.key, "delete", base)
            else:
                await self.ns.store.delete_object(node.bucket, node.key)
        self.cache.forget_object(node.bucket, node.key)
        self.ns.removed(parent, name)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.writable:
            self._writable()  # like a write(): a file open for writing takes it, even offline
        else:
            await self._changing()
        node = self.inodes.get(inode)
        if not node.kind.is_object:
            if fields.update_size:
                raise IsADirectory(repr(node))
            return self.attrs(node)  # directories are prefixes: nothing to keep
        if fields.update_size:
            await self._resize(node, h, attr.st_size)
        meta: dict[str, str | None] = {}
        if fields.update_mode:
            kind = stat.S_IFLNK if node.kind is Kind.SYMLINK else stat.S_IFREG
            meta["mode"] = str(kind | (attr.st_mode & 0o7777))
        if fields.update_uid:
            meta["uid"] = str(attr.st_uid)
        if fields.update_gid:
            meta["gid"] = str(attr.st_gid)
        mtime = attr.st_mtime_ns if fields.update_mtime else None
        if meta or mtime is not None:
            await self._set_meta(node, meta, mtime)
        return self.attrs(node)

    async def _resize(self, node: Node, h: FileHandle | None, size: int) -> None:
        if h is not None and h.writable:
            obj = h.obj
        else:
            info = await self.ns.revalidate(node)
            obj, _ = self.cache.open_object(node.bucket, node.key, info)
            try:
                if size > 0:
                    await self.fetcher.fetch_all(obj)
                self.cache.make_local(obj)
                await self.cache.sync_one(obj)  # dirty on disk before the file is cut
            except BaseException:
                self.cache.release(obj)
                raise
        try:
            async with obj.lock:
                os.ftruncate(self.cache.ensure_open(obj), size)
                obj.changed_locally(size)
            if obj.writers == 0:  # truncate(2) of a closed file: S3 must have it now
                await self.uploader.upload(obj)
        finally:
            self.ns.local_changed(node, obj)
            if h is None or not h.writable:
                self.cache.release(obj)

    async def _set_meta(self, node: Node, changes: dict[str, str | None],
                        mtime_ns: int | None = None) -> None:
        """utimens, chmod, chown and user xattrs: kept as x-amz-meta-* the s3fs way (a None
        value removes the key). A file with local changes takes them with its upload; an
        unchanged object is changed in place, without its content being uploaded again."""
        def apply(meta: dict) -> dict:
            meta = dict(meta)
            for k, v in changes.items():
                if v is None:
                    meta.pop(k, None)
                else:
                    meta[k] = v
            return meta

        local = self.cache.current(node.bucket, node.key)
        opened = None
        if (local is None or not local.dirty) and self._offline:
            # queue mode: S3 cannot change it in place now; the cached copy (all of it) becomes
            # a local change, uploaded whole once S3 answers
            info = await self.ns.revalidate(node)
            opened, _ = self.cache.open_object(node.bucket, node.key, info)
            try:
                await self.fetcher.fetch_all(opened)
                self.cache.make_local(opened)
            except BaseException:
                self.cache.release(opened)
                raise
            local = opened
        if local is not None and local.dirty:
            local.row.metadata = apply(local.row.metadata or {})
            if mtime_ns is not None:
                local.row.mtime_ns = mtime_ns
            local.changed_meta()
            try:
                if local.writers == 0:
                    await self.uploader.upload(local)
            finally:
                await self._after_change(node, local)
                if opened is not None:
                    self.cache.release(opened)
            return
        info = await self.ns.revalidate(node, force=True)
        if info.size > 5 << 30:
            raise NotSupported("metadata of objects over 5 GiB cannot be changed in place yet")
        meta = apply(dict(info.metadata))
        if mtime_ns is not None:
            meta["mtime"] = meta_mtime(mtime_ns)
        if len(str(meta)) > 2000:
            raise pyfuse3.FUSEError(errno.E2BIG)  # S3 keeps at most 2 KB of user metadata
        etag = await self.ns.store.replace_metadata(node.bucket, node.key, info.etag, meta)
        await self.ns.revalidate(node, force=True)
        self.cache.retag(node.bucket, node.key, info.etag, etag, meta)

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._changing()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise NotSupported("RENAME_EXCHANGE")
        old_parent = self.inodes.get(parent_inode_old)
        new_parent = self.inodes.get(parent_inode_new)
        text = self.ns.check_new_name(new_parent, name_new)
        if new_parent.bucket != old_parent.bucket:
            raise pyfuse3.FUSEError(errno.EXDEV)  # across buckets: mv(1) copies
        node = await self.ns.lookup(old_parent, name_old)
        if node.kind.is_dir:
            # a directory's rename copies every key below it (S3 has no directories to move):
            # offline there is no way to copy what the cache does not hold, so it is not queued
            await self._online_only("the rename of a directory")
        target = await self._maybe_lookup(new_parent, name_new)
        if target is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise Exists(text)
            if node.kind.is_dir and not target.kind.is_dir:
                raise NotADirectory(repr(target))
            if target.kind.is_dir:
                if not node.kind.is_dir:
                    raise IsADirectory(repr(target))
                if not await self.ns.is_empty(target):
                    raise NotEmpty(repr(target))
        new_key = new_parent.key + text + ("/" if node.kind.is_dir else "")
        if node.kind.is_dir:
            await self._rename_dir(node, new_key)
            if target is not None:
                await self.ns.store.delete_object(target.bucket, target.key)
        else:
            await self._rename_file(node, new_key, target)
        if target is not None:
            self.ns.removed(new_parent, name_new)
        self.inodes.move(node, new_parent, name_new, new_key)
        self.ns.removed(old_parent, name_old)
        self.ns.readded(new_parent, name_new, node)

    async def _rename_file(self, node: Node, new_key: str, target: Node | None) -> None:
        """A server-side copy, then the delete; a file with local changes not yet uploaded just
        moves in the cache and is uploaded under its new name."""
        if self._offline:  # queue mode
            return await self._rename_file_offline(node, new_key, target)
        store = self.ns.store
        local = self.cache.current(node.bucket, node.key)
        if local is not None and local.dirty:
            if self._remote_base(node.bucket, node.key, node) != "":  # an older version is in S3
                await store.delete_object(node.bucket, node.key)
            base = self._remote_base(node.bucket, new_key, target)  # what the new name replaces
            self.cache.move(node.bucket, node.key, new_key)
            local.row.base_etag = base
            local.changed_meta()  # the new name has nothing yet: upload it
            self.uploader.kick()
            return
        info = await self.ns.revalidate(node, force=True)
        etag = await store.copy(node.bucket, node.key, new_key, info.etag, info.size,
                                self.uploader.part_size)
        await store.delete_object(node.bucket, node.key)
        self.cache.move(node.bucket, node.key, new_key, etag)

    async def _rename_file_offline(self, node: Node, new_key: str, target: Node | None) -> None:
        """Queue mode, offline: a file whose bytes are all here (an object cached whole, with
        its metadata, or a local change) moves in the cache at once and becomes a local change
        of the new name (S3 cannot copy it now, so its bytes will be uploaded). The
        journal gets the upload of the new name, conditional on what S3 had there (the
        target's ETag, or none), then the delete of the old name if S3 has a version of it,
        conditional on that version. Anything else needs S3: ENETUNREACH."""
        local = self.cache.current(node.bucket, node.key)
        opened = None
        if local is None or not local.dirty:
            info = await self.ns.revalidate(node)  # offline: the cached version, if any
            local = opened = self.cache.open_object(node.bucket, node.key, info)[0]
        try:
            if not local.dirty and not local.complete:
                raise Unreachable(f"s3://{node.bucket}/{node.key} is not wholly cached and S3 "
                                  f"is unreachable: it cannot be renamed offline")
            if not local.dirty and local.row.metadata is None:  # cached after a listing only
                raise Unreachable(f"s3://{node.bucket}/{node.key}: its metadata is not known "
                                  f"and S3 is unreachable: it cannot be renamed offline")
            old = self._remote_base(node.bucket, node.key, node) if local.dirty else local.etag
            base = self._remote_base(node.bucket, new_key, target)  # what the new name replaces
            self.uploader.break_stream(local)
            await self.cache.move_queued(local, new_key, base, old or None)
            self.ns.local_changed(node, local)
            log.info("offline: rename of s3://%s/%s to %s queued", node.bucket, node.key, new_key)
        finally:
            if opened is not None:
                self.cache.release(opened)

    async def _rename_dir(self, node: Node, new_key: str) -> None:
        """Every key below the directory: all copied before any is deleted, so that a crash
        part-way leaves each object in at least one place. Not atomic."""
        store = self.ns.store
        keys = await store.list_all(node.bucket, node.key)

        async def copy(_, item):
            key, info = item
            if key.endswith("/") and info.size == 0:
                await store.put_marker(node.bucket, new_key + key[len(node.key):])
            else:
                await store.copy(node.bucket, key, new_key + key[len(node.key):], info.etag,
                                 info.size, self.uploader.part_size)
        await run_all(copy, keys)
        if not any(k == node.key for k, _ in keys):
            await store.put_marker(node.bucket, new_key)  # the directory itself persists
        for obj in list(self.cache.local_objects()):  # local changes move with it
            if obj.bucket == node.bucket and obj.key.startswith(node.key):
                self.cache.move(obj.bucket, obj.key, new_key + obj.key[len(node.key):])
                obj.row.base_etag = ""  # the target directory was empty
                obj.changed_meta()
        await run_all(lambda _, item: store.delete_object(node.bucket, item[0]), keys)
        for key, _ in keys:
            self.cache.move(node.bucket, key, new_key + key[len(node.key):], None)
        self.uploader.kick()

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)  # S3 has no hard links

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        """An object holding the target, with S_IFLNK in x-amz-meta-mode: what s3fs writes and
        reads, so each tool follows the other's links."""
        await self._changing()
        parent = self.inodes.get(parent_inode)
        text = self.ns.check_new_name(parent, name)
        if await self._maybe_lookup(parent, name) is not None:
            raise Exists(text)
        key = parent.key + text
        obj = self.cache.create_local(parent.bucket, key, "")
        obj.row.metadata = {"mode": str(stat.S_IFLNK | 0o777), "uid": str(ctx.uid),
                            "gid": str(ctx.gid)}
        async with obj.lock:
            os.pwrite(self.cache.ensure_open(obj), target, 0)
            obj.changed_locally(len(target))
        node = self.ns.added(parent, name, Kind.SYMLINK, key)
        self.ns.local_changed(node, obj)
        await self.uploader.upload(obj)
        self.ns.local_changed(node, obj)
        self.inodes.incref(node)
        return self.attrs(node)

    @handler
    async def readlink(self, inode, ctx):
        node = self.inodes.get(inode)
        if node.kind is not Kind.SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        info = await self.ns.revalidate(node)
        obj, _ = self.cache.open_object(node.bucket, node.key, info)
        try:
            return bytes(await self.fetcher.read(obj, ReadState(), 0, obj.size))
        finally:
            self.cache.release(obj)

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        await self._changing()
        raise NotSupported("only regular files and directories can be created")

    # ------------------------------------------------------------ the rest
    @handler
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 38  # 1 PiB: S3 has no real limit
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------ extended attributes
    # Off by default, as in s3fs: when a filesystem answers getxattr, `ls -l` asks it for
    # security.selinux and ACL names on every file, so 10,000 files cost 20,000 round trips.
    # Without --xattrs the handlers answer ENOSYS, and the kernel stops asking at once.
    async def getxattr(self, inode, name, ctx):
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._getxattr(inode, name)

    @handler
    async def _getxattr(self, inode, name):
        node = self.inodes.get(inode)
        text = name.decode("utf-8", "replace")
        special = await self._s3_xattrs(node)
        if text in special:
            return special[text].encode()
        if not text.startswith("user.") or not node.kind.is_object:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        meta = await self._user_meta(node)
        key = text[len("user."):].lower()
        if key not in meta:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return meta[key].encode()

    async def listxattr(self, inode, ctx):
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._listxattr(inode)

    @handler
    async def _listxattr(self, inode):
        node = self.inodes.get(inode)
        names = list(await self._s3_xattrs(node))
        if node.kind.is_object:
            names += [f"user.{k}" for k in sorted(await self._user_meta(node))]
        return [n.encode() for n in names]

    async def setxattr(self, inode, name, value, ctx):
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._change_xattr(inode, name, value)

    async def removexattr(self, inode, name, ctx):
        if not self.xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await self._change_xattr(inode, name, None)

    @handler
    async def _change_xattr(self, inode, name, value):
        await self._changing()
        node = self.inodes.get(inode)
        text = name.decode("utf-8", "replace")
        if text.startswith("user.s3.") or not text.startswith("user."):
            raise pyfuse3.FUSEError(errno.EPERM if text.startswith("user.s3.") else errno.ENOTSUP)
        if not node.kind.is_object:
            raise NotSupported("directories have no metadata of their own")
        key = text[len("user."):].lower()
        if key in _RESERVED_META or not key or not _META_KEY.fullmatch(key):
            raise pyfuse3.FUSEError(errno.EINVAL)
        if value is not None:
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                raise pyfuse3.FUSEError(errno.EINVAL) from None  # S3 metadata is ASCII
            if not value.isprintable():
                raise pyfuse3.FUSEError(errno.EINVAL)
        elif key not in await self._user_meta(node):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        await self._set_meta(node, {key: value})

    async def _user_meta(self, node: Node) -> dict[str, str]:
        """The object's x-amz-meta-* but those that are file attributes (mtime, mode, ...)."""
        local = self.cache.current(node.bucket, node.key)
        if local is not None and local.dirty:
            meta = dict(local.row.metadata or {})
        else:
            info = node.info
            if info is None or not info.from_head:
                info = await self.ns.revalidate(node, force=True)
            meta = dict(info.metadata)
        return {k: v for k, v in meta.items() if k not in _RESERVED_META}

    async def _s3_xattrs(self, node: Node) -> dict[str, str]:
        """The read-only user.s3.* names: where the object is, its ETag, what is cached."""
        out = {"user.s3.uri": f"s3://{node.bucket}/{node.key}"}
        if not node.kind.is_object:
            return out
        local = self.cache.current(node.bucket, node.key)
        row = local.row if local is not None else self.cache.catalog.get(self.cache.origin,
                                                                         node.bucket, node.key)
        etag = row.etag if row is not None and row.dirty else (node.info.etag if node.info else "")
        if etag:
            out["user.s3.etag"] = etag
        out["user.s3.cache"] = self.cache.describe(node.bucket, node.key)
        if row is None or not row.dirty:  # S3's version: its storage class, restore state
            out.update(await self.archives.xattrs(node))
        return out



async def _invalidate_pages(inos: set[int]) -> None:
    for ino in inos:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
        except OSError as e:
            log.debug("invalidate_inode(%d): %s", ino, e)


def _write_only(flags: int) -> bool:
    """A descriptor that only writes bypasses the kernel's page cache (direct_io): the bytes
    are copied once, into the cache file, instead of into two page caches. It cannot read or
    map the file, so it loses nothing by it."""
    return flags & os.O_ACCMODE == os.O_WRONLY


def _meta_int(meta: dict, name: str, default: int) -> int:
    try:
        return int(meta[name])
    except (KeyError, ValueError):
        return default


def _mode_meta(mode: int, ctx) -> dict[str, str]:
    """A new file's mode, owner and group, recorded the s3fs way."""
    return {"mode": str(stat.S_IFREG | (mode & 0o7777 & ~ctx.umask)), "uid": str(ctx.uid),
            "gid": str(ctx.gid)}
