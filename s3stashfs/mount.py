"""The mount lifecycle: checks, pyfuse3.init, the trio nursery of background tasks, signals,
readiness (to the parent process and to systemd), and a clean unmount."""
from __future__ import annotations

import errno
import logging
import os
import ctypes
import signal
import socket
import sys
from pathlib import Path

import pyfuse3
import trio

from . import crashpoints
from .archive import Archives
from .budget import ReadAheadBudget
from .cache import Cache
from .config import Settings
from .control import ControlServer
from .errors import MountError
from .fetch import Fetcher
from .fs import Operations
from .inodes import ROOT_INODE, InodeTable, Kind
from .mountpoints import (  # noqa: F401 - LOCK_NAME and daemon_pids re-exported
    LOCK_NAME, check_mountpoint, check_signing, daemon_pids, lock_cache_dir, mounted_points)
from .namespace import Namespace
from .store import Store
from .uploads import Uploader

log = logging.getLogger(__name__)

_QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")  # they can log request headers


class _GoneReplyFilter(logging.Filter):
    """pyfuse3 logs an ERROR when the kernel refuses a reply. ENOENT there means the kernel no
    longer waits for that request: its caller was interrupted, or the connection was aborted
    at unmount (a RELEASE still queued then). Nothing is lost either way (the operation itself
    ran), so that case is logged at DEBUG; any other refusal stays an ERROR."""

    _GONE = os.strerror(errno.ENOENT)

    def filter(self, record: logging.LogRecord) -> bool:
        if ("fuse_reply_* failed" in str(record.msg) and record.args
                and record.args[-1] == self._GONE):  # type: ignore[index]
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(settings: Settings) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(settings.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        handler: logging.Handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    pyfuse3_log = logging.getLogger("pyfuse3")
    for f in list(pyfuse3_log.filters):
        if isinstance(f, _GoneReplyFilter):
            pyfuse3_log.removeFilter(f)
    pyfuse3_log.addFilter(_GoneReplyFilter())


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing (install fuse3, load the fuse module)")
    if os.geteuid() != 0 and not any(os.access(os.path.join(d, "fusermount3"), os.X_OK)
                                     for d in os.environ.get("PATH", "/usr/bin").split(os.pathsep)):
        raise MountError("FUSE is not usable: fusermount3 was not found (install the fuse3 package)")


def notify_systemd(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("could not notify systemd: %s", e)


class Mount:
    """Everything one mount owns, wired together."""

    def __init__(self, settings: Settings, mountpoint: Path):
        self.settings = settings
        self.mountpoint = mountpoint
        self.store = Store(settings)
        self.cache = Cache(settings.cache_dir, settings.origin, settings.file_mode,
                           settings.cache_max_size, settings.cache_min_free)
        self.cache.load_dirty()  # local changes are shown (and, unless read-only, uploaded)
        if settings.bucket:
            root = (Kind.BUCKET, settings.bucket, settings.prefix)
        else:
            root = (Kind.ROOT, "", "")  # the bucket list: no bucket
        self.inodes = InodeTable(*root)
        queue = settings.offline_writes == "queue"
        self.ns = Namespace(self.store, self.cache, self.inodes, settings.metadata_ttl,
                            settings.buckets, queue_offline=queue)
        self.fetcher = Fetcher(self.store, self.cache, ReadAheadBudget(settings.read_ahead_memory))
        self.uploader = Uploader(self.store, self.cache, settings.multipart_threshold_mb << 20,
                                 settings.part_size_mb << 20, settings.local_only,
                                 settings.offline_writes)
        self.store.connectivity.on_online.append(self.uploader.retry_now)
        # a refusal the store can explain (requester-pays, not public) is shown by `status`
        self.store.on_hint.append(lambda bucket, hint: self.cache.record_error(bucket, "", hint))
        self.archives = Archives(self.ns, self.cache, self.inodes, str(mountpoint))
        self.ops = Operations(self.inodes, self.ns, self.cache, self.fetcher, self.uploader,
                              settings.metadata_ttl, settings.read_only, settings.xattrs,
                              self.archives)

    def fuse_options(self) -> set[str]:
        opts = set(pyfuse3.default_options)
        opts |= {"fsname=s3stashfs", "subtype=s3stashfs", "noatime"}
        if self.settings.read_only:
            opts.add("ro")
        if self.settings.allow_other:
            opts.add("allow_other")
        if self.settings.noexec:
            opts.add("noexec")
        return opts

    async def run(self, on_ready) -> None:
        pyfuse3.init(self.ops, str(self.mountpoint), self.fuse_options())
        clean = False
        try:
            async with trio.open_nursery() as nursery:
                self.fetcher.nursery = self.ns.nursery = nursery
                await nursery.start(self.cache.run)
                await nursery.start(self.store.connectivity.run,
                                    lambda: self.store.probe(self.settings.bucket))
                if not self.settings.read_only:
                    await nursery.start(self.uploader.run)
                await nursery.start(ControlServer(self).run)
                nursery.start_soon(self._signals, nursery.cancel_scope)
                nursery.start_soon(self._ready, on_ready)
                nursery.start_soon(_trim_memory)
                await pyfuse3.main()
                clean = True
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.cache.close()
                except Exception:  # noqa: BLE001 - unmount must go on
                    log.exception("closing the cache failed")
            pyfuse3.close(unmount=True)
            log.info("unmounted %s%s", self.mountpoint, "" if clean else " (after an error)")

    async def _signals(self, scope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for sig in signals:
                log.info("%s received: unmounting", signal.Signals(sig).name)
                pyfuse3.terminate()
                return

    async def _ready(self, on_ready) -> None:
        """Tell our parent and systemd once the mount really answers requests."""
        def probe():
            return os.stat(self.mountpoint).st_ino
        ino = await trio.to_thread.run_sync(probe)
        if ino != ROOT_INODE:
            raise MountError(f"the mount at {self.mountpoint} does not answer (inode {ino})")
        raise_read_ahead(self.mountpoint)
        raise_background(self.mountpoint)
        log.info("mounted %s (pid %d)", self.mountpoint, os.getpid())
        notify_systemd("READY=1")
        on_ready()


READ_AHEAD_KB = 1024  # the largest FUSE request (256 pages)
MALLOC_ARENAS = 2
TRIM_EVERY = 10.0  # seconds between returns of freed heap memory to the system


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def tame_malloc() -> None:
    """glibc only, before any thread starts: at most MALLOC_ARENAS malloc arenas instead of
    eight per core. Every download piece and upload part is a buffer of 256 KiB-8 MiB freed at once;
    spread over a dozen threads' arenas, the freed memory stayed with the process (the soak's
    daemon held 250-275 MiB under a mixed load, against about 90 MiB with two arenas)."""
    if _LIBC is not None:
        _LIBC.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX


async def _trim_memory() -> None:
    """Background: hand the heap's free pages back to the system now and then (malloc_trim
    also releases free pages inside the arenas, not only at their top)."""
    if _LIBC is None:
        return
    while True:
        await trio.sleep(TRIM_EVERY)
        await trio.to_thread.run_sync(_LIBC.malloc_trim, 0)


def raise_read_ahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Let the kernel read ahead further than its 128 KiB default, so that a sequential reader
    gets 1 MiB requests. Only root may change it; others keep the default."""
    _, dev = mounted_points().get(str(mountpoint), ("", None))
    path = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:
        log.debug("kernel read-ahead left at its default (%s: %s)", path, e.strerror)


FUSECTL = Path("/sys/fs/fuse/connections")
MAX_BACKGROUND = 64  # the kernel's default is 12: see raise_background


def raise_background(mountpoint: Path, n: int = MAX_BACKGROUND, fusectl: Path = FUSECTL) -> None:
    """Let the kernel send more than 12 reads of the page cache (its read-ahead) at once: it
    counts them against the connection's ``max_background``, which libfuse leaves at the
    kernel's 12 and pyfuse3 gives no way to raise at INIT, so 32 programs reading 32 large files
    had only 12 reads, and so 12 GETs, in flight. fusectl (mounted by systemd on most systems)
    can change it; only root may. Elsewhere the default stays. (The device comes from
    mountinfo: a stat of the mount from this thread would wait for this thread to answer it.)"""
    _, dev = mounted_points().get(str(mountpoint), ("", ""))
    major, _, minor = dev.partition(":")
    if not (major.isdigit() and minor.isdigit()):
        return
    conn = fusectl / str((int(major) << 20) | int(minor))
    try:
        (conn / "max_background").write_text(f"{n}\n")
        (conn / "congestion_threshold").write_text(f"{n * 3 // 4}\n")
    except OSError as e:
        log.debug("FUSE max_background left at the kernel's default (%s: %s)", conn, e.strerror)


def serve(settings: Settings, mountpoint: Path, on_ready=lambda: None) -> None:
    """Check everything, mount, serve until unmounted. Raises ConfigError/MountError before
    mounting; returns after a clean unmount."""
    check_signing(settings)
    real = check_mountpoint(mountpoint)
    check_fuse()
    tame_malloc()
    crashpoints.arm()  # a test hook: unset outside tests
    lock_fd = lock_cache_dir(settings.cache_dir)
    try:
        m = Mount(settings, real)
        try:
            m.store.check_access(settings.bucket, settings.buckets)
        except MountError as e:
            if not e.unreachable or m.cache.catalog.is_empty():
                raise
            m.store.connectivity.unreachable(str(e))  # a cache to serve: mount offline
        log.info("mounting %s on %s (cache %s)", settings.bucket or "all buckets", real,
                 settings.cache_dir)
        trio.run(m.run, on_ready)
    finally:
        os.close(lock_fd)
