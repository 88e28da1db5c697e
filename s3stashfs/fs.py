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
import stat
import time

import pyfuse3

from .cache import Cache, CachedObject
from .errors import Changed, NotFound, ReadOnly, S3StashError, Unreachable, errno_for
from .fetch import Fetcher, ReadState
from .inodes import InodeTable, Kind, Node
from .namespace import Namespace

log = logging.getLogger(__name__)

SIBLING_PREFETCH = 8  # small files fetched ahead of a directory read in order
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


def handler(fn):
    """Run a request handler; turn whatever it raises into the right FUSEError."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (NotFound, ReadOnly, Changed) as e:  # Changed is logged by read()
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
        except Exception:
            log.exception("%s: unexpected error", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


class FileHandle:
    __slots__ = ("node", "obj", "state", "served")

    def __init__(self, node: Node, obj: CachedObject):
        self.node = node
        self.obj = obj
        self.state = ReadState()
        self.served = False  # no byte handed out yet: a version change can still be followed


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False

    def __init__(self, inodes: InodeTable, ns: Namespace, cache: Cache, fetcher: Fetcher,
                 ttl: float, read_only: bool = False):
        super().__init__()
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

    # ------------------------------------------------------------ attributes
    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.ttl
        a.attr_timeout = self.ttl
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 128 * 1024
        if node.kind is Kind.FILE:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = node.info.size if node.info is not None else 0
            a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = (
                node.info.mtime_ns if node.info is not None else self.started_ns)
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
        if node.kind is Kind.FILE and node.info is None:
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
        if flags & _WRITE_FLAGS:
            raise ReadOnly("writes are not supported yet")
        node = self.inodes.get(inode)
        if node.kind is not Kind.FILE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        old = node.info
        try:
            info = await self.ns.revalidate(node)
        except NotFound:
            self._forget_entry(node)
            raise
        obj, same = self.cache.open_object(node.bucket, node.key, info)
        if old is not None and (old.size != info.size or old.mtime_ns != info.mtime_ns):
            self._invalidate_attrs(node)
        self.fetcher.prefetch(obj)
        self._prefetch_siblings(node)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = FileHandle(node, obj)
        return pyfuse3.FileInfo(fh=fh, keep_cache=same)

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
            if child.kind is Kind.FILE and info is not None and self.fetcher.small(info.size):
                obj, _ = self.cache.open_object(child.bucket, child.key, info, opening=False)
                self.fetcher.prefetch(obj)
                self.cache.release_if_idle(obj)

    def _forget_entry(self, node: Node) -> None:
        """The object is gone from S3: make the kernel drop its cached name."""
        try:
            pyfuse3.invalidate_entry_async(node.parent, node.name, ignore_enoent=True)
        except OSError as e:
            log.debug("invalidate_entry(%d): %s", node.ino, e)

    def _invalidate_attrs(self, node: Node) -> None:
        try:
            pyfuse3.invalidate_inode(node.ino, attr_only=True)
        except OSError as e:
            log.debug("invalidate_inode(%d): %s", node.ino, e)

    @handler
    async def read(self, fh, off, size):
        h = self._handles[fh]
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
    async def flush(self, fh):
        return None

    @handler
    async def fsync(self, fh, datasync):
        return None

    @handler
    async def release(self, fh):
        h = self._handles.pop(fh, None)
        if h is not None:
            self.cache.release(h.obj)

    # ------------------------------------------------------------ the rest
    @handler
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 38  # 1 PiB: S3 has no real limit
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s

    # No getxattr/listxattr: answering ENOSYS once makes the kernel stop asking, so `ls -l`
    # of 10,000 files does not cost 20,000 round trips for security.selinux and ACL names.

    async def _read_only(self, *args):
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only
