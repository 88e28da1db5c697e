"""The control channel: `s3stashfs status | cache | pin | unpin | sync | restore` talk to a
running mount.

The mount listens on a unix socket, ``control.sock``, in its cache directory (mode 0700, the
socket 0600), and accepts only peers of its own user (or root), checked with SO_PEERCRED.
A request is one JSON line ``{"cmd": ..., ...}``; the answer is JSON lines: any number of
``{"progress": {...}}`` and then one ``{"result": {...}}`` or ``{"error": "...", "errno": N}``.

Socket paths are limited to 107 bytes, and cache directories can be deeper than that, so both
ends reach the socket through ``/proc/self/fd/<dirfd>/control.sock``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING

import trio

from .progress import each_reporting
from .archive import TIERS
from . import control_client
from .control_client import SOCKET_NAME, ControlError, NotServing, _dir_fd  # noqa: F401 - NotServing re-exported
from .errors import S3StashError, Unreachable
from .inodes import Kind
from .namespace import valid_name
from .verify import verify_cache

if TYPE_CHECKING:
    from .cache import CachedObject
    from .store import ObjectInfo

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 16
PIN_PARALLEL = 8
PROGRESS_EVERY = 0.25
request = control_client.request  # the client, re-exported for callers of control.request


# ------------------------------------------------------------------------------ server
class ControlServer:
    """Serves commands inside the mount; everything runs on the trio thread."""

    def __init__(self, mount):
        self.m = mount  # mount.Mount: settings, store, cache, ns, inodes, fetcher, uploader

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path = self.m.settings.cache_dir / SOCKET_NAME
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with _dir_fd(self.m.settings.cache_dir) as short:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(short)  # a crashed mount's; we hold the cache lock
            old = os.umask(0o177)
            try:
                await sock.bind(short)
            finally:
                os.umask(old)
        sock.listen(16)
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    conn, _ = await sock.accept()
                    nursery.start_soon(self._serve_one, conn)
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _serve_one(self, conn) -> None:
        stream = trio.SocketStream(conn)
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid not in (os.getuid(), 0):
                log.warning("control: refused a connection from uid %d", uid)
                return
            request = await _read_line(stream)

            async def send(obj) -> None:
                await stream.send_all((json.dumps(obj) + "\n").encode())

            try:
                result = await self.dispatch(request, send)
            except ControlError as e:
                await send({"error": str(e), "errno": e.errno})
            except S3StashError as e:
                await send({"error": str(e) or type(e).__name__, "errno": e.errno})
            else:
                await send({"result": result})
        except (trio.BrokenResourceError, trio.ClosedResourceError, ValueError) as e:
            log.debug("control: connection ended: %s", e)
        except Exception:  # noqa: BLE001 - a command must never take the mount down
            log.exception("control: command failed")
        finally:
            await stream.aclose()

    async def dispatch(self, request: dict, send) -> dict:
        cmd = request.get("cmd")
        cache = self.m.cache
        if cmd in ("status", "size", "prune", "clear", "verify"):
            await cache.sync()  # record what was fetched this last second: figures are current
        if cmd == "status":
            return self.status()
        if cmd == "size":
            return cache.usage()
        if cmd == "prune":
            return cache.prune(float(request["older_than"]))
        if cmd == "clear":
            return cache.clear(include_pinned=bool(request.get("include_pinned")))
        if cmd == "verify":
            return await verify_cache(cache, self.m.fetcher.verifier)
        if cmd == "pin":
            return await self.pin([_parts(p) for p in request["paths"]], send)
        if cmd == "unpin":
            return await self.unpin([_parts(p) for p in request["paths"]])
        if cmd == "restore":
            return await self.restore([_parts(p) for p in request["paths"]],
                                      int(request["days"]), str(request["tier"]), send)
        if cmd == "sync":
            conn = self.m.store.connectivity
            if not conn.online and await self.m.store.probe(self.m.settings.bucket):
                conn.reachable()  # asked to sync now: do not wait for the probe's backoff
            return await self.m.uploader.sync_all()
        raise ControlError(f"unknown command {cmd!r}")

    # -------------------------------------------------------------- commands
    def status(self) -> dict:
        m = self.m
        conn = m.store.connectivity
        cache = m.cache
        return {
            "mounted": True,
            "mountpoint": str(m.mountpoint),
            "pid": os.getpid(),
            "endpoint": m.settings.origin,
            "online": conn.online,
            "since": conn.since,
            "credentials": m.store.credentials.status(),  # None, or {"problem", "since"}
            "cache_dir": str(m.settings.cache_dir),
            "offline_writes": m.settings.offline_writes,
            "read_only": m.settings.read_only,
            "cache": cache.usage(),
            "read_ahead": m.fetcher.budget.status(),
            "pending": [] if m.settings.read_only else m.uploader.pending(),
            "conflicts": cache.catalog.events("conflict", limit=100),
            "errors": cache.catalog.events("error", limit=20),
        }

    async def _resolve(self, parts: list[str]):
        """The inode node at ``parts`` below the mount's root (a lookup like the kernel's)."""
        node = self.m.inodes.root
        for i, name in enumerate(parts):
            try:
                node = await self.m.ns.lookup(node, name.encode("utf-8", "surrogateescape"))
            except S3StashError as e:
                raise type(e)(f"{'/'.join(parts[:i + 1])}: {e}") from None
        return node

    async def _targets(self, node) -> list[tuple[str, str, ObjectInfo]]:
        """(bucket, key, ObjectInfo) of every object at or under ``node``."""
        if node.kind is Kind.ROOT:
            raise ControlError("name a bucket or a directory inside it, not the whole mount", 22)
        if node.kind.is_dir:
            out = []
            for key, info in await self.m.store.list_all(node.bucket, node.key):
                rest = key[len(node.key):]
                if key.endswith("/") or not all(valid_name(c) for c in rest.split("/")):
                    continue  # directory markers; names the mount does not show
                out.append((node.bucket, key, info))
            return out
        info = await self.m.ns.revalidate(node)
        return [(node.bucket, node.key, info)]

    async def pin(self, paths: list[list[str]], send) -> dict:
        m = self.m
        targets = []
        for parts in paths:
            if not m.store.connectivity.online and not await m.store.recheck():
                raise Unreachable("S3 is unreachable: cannot pin now")
            targets += await self._targets(await self._resolve(parts))
        seen, unique = set(), []
        for t in targets:
            if (t[0], t[1]) not in seen:
                seen.add((t[0], t[1]))
                unique.append(t)
        total = sum(t[2].size for t in unique)
        state = {"files": 0, "bytes": 0, "fetched": 0}
        failed: list[dict[str, str]] = []
        active: dict[tuple[str, str], CachedObject] = {}
        t0 = time.monotonic()
        limiter = trio.CapacityLimiter(PIN_PARALLEL)

        def in_flight() -> int:
            return sum(min(o.present.count() * o.row.block_size, o.size) for o in active.values())

        async def one(bucket: str, key: str, info) -> None:
            async with limiter:
                obj, _ = m.cache.open_object(bucket, key, info)
                before = min(obj.present.count() * obj.row.block_size, obj.size)
                active[(bucket, key)] = obj
                try:
                    await m.fetcher.fetch_all(obj)
                    m.cache.set_pinned(bucket, key, True)
                    state["files"] += 1
                    state["bytes"] += obj.size
                    state["fetched"] += obj.size - before
                except S3StashError as e:
                    failed.append({"bucket": bucket, "key": key, "error": str(e)})
                finally:
                    del active[(bucket, key)]
                    m.cache.release(obj)

        async def report() -> None:
            await send({"progress": {
                "files": state["files"] + len(failed), "files_total": len(unique),
                "bytes": state["bytes"] + in_flight(), "bytes_total": total,
                "elapsed": time.monotonic() - t0}})

        await each_reporting(unique, one, report, PROGRESS_EVERY)
        log.info("pinned %d file(s), %d bytes (%d fetched), %d failed", state["files"],
                 state["bytes"], state["fetched"], len(failed))
        return {**state, "failed": failed, "files_total": len(unique), "bytes_total": total,
                "seconds": time.monotonic() - t0}

    async def restore(self, paths: list[list[str]], days: int, tier: str, send) -> dict:
        """Ask S3 to restore every archived object at or under ``paths`` (archive.py)."""
        m = self.m
        if tier not in TIERS or days < 1:
            raise ControlError(f"restore: tier {tier!r} (one of {', '.join(TIERS)}) and days "
                               f"{days} (1 or more)", 22)
        targets: list[tuple[str, str, ObjectInfo]] = []
        seen: set[tuple[str, str]] = set()
        for parts in paths:
            if not m.store.connectivity.online and not await m.store.recheck():
                raise Unreachable("S3 is unreachable: cannot ask for restores now")
            for t in await self._targets(await self._resolve(parts)):
                if (t[0], t[1]) not in seen:
                    seen.add((t[0], t[1]))
                    targets.append(t)
        return await m.archives.restore(targets, days, tier, send)

    async def unpin(self, paths: list[list[str]]) -> dict:
        m = self.m
        n = 0
        for parts in paths:
            node = await self._resolve(parts)
            if node.kind is Kind.ROOT:
                raise ControlError("name a bucket or a directory inside it, not the whole mount", 22)
            rows = (m.cache.catalog.rows_under(m.cache.origin, node.bucket, node.key)
                    if node.kind.is_dir else
                    [r for r in [m.cache.catalog.get(m.cache.origin, node.bucket, node.key)] if r])
            for row in rows:
                if row.pinned:
                    m.cache.set_pinned(row.bucket, row.key, False)
                    n += 1
        return {"files": n}


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


async def _read_line(stream) -> dict:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise ValueError("connection closed before a request")
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too long")
    return json.loads(buf.split(b"\n", 1)[0])
