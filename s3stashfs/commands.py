"""The commands beside `mount`: status, cache size|prune|clear|verify, pin, unpin, sync, restore.

Each asks the running mount over its control socket (control.py). With nothing mounted on the
cache directory, status and cache work on the directory itself, holding its lock so that no
mount starts meanwhile; pin, unpin and sync need the mount. Every command prints for people,
or one JSON document with ``--json``, and its exit status says how it went:

0 done / online; 1 failed; 2 bad input; 3 done, but look: offline (status), bad blocks were found
and dropped (verify), conflicts were kept as copies (sync), some objects were not archived or
their restore was under way already (restore); 4 not mounted (status, sync, restore).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import sys
import time
from pathlib import Path

from . import control_client as control
from .errors import ConfigError, MountError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_LOOK, EXIT_NOT_MOUNTED = 0, 1, 2, 3, 4
FSTYPE = "fuse.s3stashfs"


class CommandError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------ finding the mount
def s3stashfs_mounts() -> list[str]:
    from .mountpoints import mounted_points
    return [p for p, (fstype, _) in mounted_points().items() if fstype == FSTYPE]


def cache_dir_of(mountpoint: str) -> Path:
    """The cache directory of the mount at ``mountpoint``: the daemon holds its lock file open."""
    from .mountpoints import LOCK_NAME, daemon_pids
    for pid in daemon_pids(mountpoint):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.endswith("/" + LOCK_NAME):
                return Path(target).parent
    raise CommandError(f"{mountpoint}: no s3stashfs daemon of this user serves it")


def target_cache_dir(settings, mountpoint: str | None) -> tuple[Path, str | None]:
    if mountpoint is None:
        return settings.cache_dir, None
    real = os.path.realpath(mountpoint)
    if real not in s3stashfs_mounts():
        raise CommandError(f"{mountpoint}: not an s3stashfs mount", EXIT_USAGE)
    return cache_dir_of(real), real


def mount_containing(path: str) -> tuple[str, list[str]]:
    """(mountpoint, path components below it) for a path inside an s3stashfs mount."""
    real = os.path.realpath(path)
    best = None
    for mp in s3stashfs_mounts():
        if real == mp or real.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) > len(best):
                best = mp
    if best is None:
        raise CommandError(f"{path}: not inside an s3stashfs mount", EXIT_USAGE)
    try:
        os.stat(real)  # the mount looks it up; offline and unknown, this says so
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    rest = real[len(best):].strip("/")
    return best, [p for p in rest.split("/") if p]


@contextlib.contextmanager
def unmounted_cache(settings, cache_dir: Path):
    """The cache directory itself, locked like a mount locks it, while nothing is mounted."""
    from .cache import Cache
    from .mountpoints import lock_cache_dir
    if not (cache_dir / "catalog.sqlite3").exists():
        raise CommandError(f"{cache_dir}: no s3stashfs cache there")
    try:
        fd = lock_cache_dir(cache_dir)
    except MountError as e:
        raise CommandError(f"{e}, which does not answer on its control socket; try again") from None
    try:
        import trio
        cache = Cache(cache_dir, settings.origin, settings.file_mode, settings.cache_max_size,
                      settings.cache_min_free)
        try:
            yield cache
        finally:
            trio.run(cache.close)
    finally:
        os.close(fd)


def ask(cache_dir: Path, req: dict, on_progress=None):
    """The mount's answer, or None when no mount serves ``cache_dir``."""
    try:
        return control.request(cache_dir, req, on_progress)
    except control.NotServing:
        return None
    except control.ControlError as e:
        raise CommandError(str(e)) from None


def ask_or_local(settings, mountpoint: str | None, req: dict, local):
    """(answer, mounted): the mount's answer to ``req``, or, when no mount serves the cache
    directory, ``local(cache, cache_dir)`` run on the directory itself."""
    cache_dir, mp = target_cache_dir(settings, mountpoint)
    answer = ask(cache_dir, req)
    if answer is not None:
        return answer, True
    if mp is not None:
        raise CommandError(f"{mp}: the mount does not answer on its control socket")
    with unmounted_cache(settings, cache_dir) as cache:
        return local(cache, cache_dir), False


def pending(settings, cache) -> list[dict]:
    """What a stopped mount left pending, as the mount's own uploader lists it (the journal,
    and files with local changes; never local-only names), for every endpoint the cache
    directory holds changes for: the settings at hand may name another. Needs no S3."""
    import trio

    from .cache import Cache
    from .uploads import Uploader
    out: list[dict] = []
    for origin in sorted(cache.catalog.pending_origins()):
        one = Cache(cache.dir, origin, settings.file_mode)
        try:
            one.load_dirty()
            # pending() reads the cache only: no store (and no S3) is needed
            out += Uploader(None, one, 0, 0, settings.local_only).pending()  # type: ignore[arg-type]
        finally:
            trio.run(one.close)
    return out


# ------------------------------------------------------------------------ commands
def cmd_status(settings, args) -> int:
    def local(cache, cache_dir):
        return {"mounted": False, "cache_dir": str(cache_dir), "endpoint": settings.origin,
                "cache": cache.usage(), "pending": pending(settings, cache),
                "conflicts": cache.catalog.events("conflict", limit=100),
                "errors": cache.catalog.events("error", limit=20)}
    st, _ = ask_or_local(settings, args.mountpoint, {"cmd": "status"}, local)
    code = EXIT_NOT_MOUNTED if not st["mounted"] else EXIT_OK if st["online"] else EXIT_LOOK
    if args.json:
        print(json.dumps(st, indent=2))
        return code
    if st["mounted"]:
        state = "online" if st["online"] else "OFFLINE"
        print(f"s3stashfs on {st['mountpoint']} (pid {st['pid']}): {state} since "
              f"{when(st['since'])}")
    else:
        print(f"not mounted (cache {st['cache_dir']})")
    print(f"  endpoint   {st['endpoint']}")
    if st.get("credentials"):  # S3 cannot be asked until fresh credentials come
        c = st["credentials"]
        print(f"  credentials {c['problem']} (since {when(c['since'])})")
    u = st["cache"]
    limit = f"limit {size(u['max_size'])}" if u.get("max_size") else "no size limit"
    print(f"  cache      {size(u['bytes'])} in {u['objects']} files ({limit}, keep "
          f"{size(u['min_free'])} free; {size(u['disk_free'])} free on disk)")
    print(f"             {size(u['pinned_bytes'])} pinned in {u['pinned_objects']} files; "
          f"{size(u['dirty_bytes'])} not yet in S3 in {u['dirty_objects']} files")
    print(f"  pending    {len(st['pending'])} change(s)")
    for p in st["pending"][:50]:
        line = f"             {p['op']:<7} {p['bucket']}/{p['key']}"
        if p.get("size") is not None:
            line += f"  {size(p['size'])}"
        if p.get("since"):
            line += f"  since {when(p['since'])}"
        if p.get("error"):
            line += f"  (last try: {p['error']})"
        print(line)
    print(f"  conflicts  {len(st['conflicts'])}")
    for c in st["conflicts"][:50]:
        print(f"             {when(c['time'])} {c['bucket']}/{c['key']}: {c['message']}")
    print(f"  errors     {len(st['errors'])} recent")
    for e in st["errors"][:20]:
        where = f"{e['bucket']}/{e['key']}" if e["key"] else e["bucket"]  # "": the bucket's
        print(f"             {when(e['time'])} {where}: {e['message']}")
    return code


def cmd_cache(settings, args) -> int:
    req: dict = {"cmd": args.cache_command}
    if args.cache_command == "prune":
        req["older_than"] = parse_older_than(args.older_than)
    if args.cache_command == "clear":
        req["include_pinned"] = args.include_pinned
    result, _ = ask_or_local(settings, args.mountpoint, req,
                             lambda cache, _: _run_locally(settings, cache, req))
    code = EXIT_OK
    if args.cache_command == "verify" and (result["bad_blocks"] or result.get("s3_mismatches")):
        code = EXIT_LOOK
    if args.json:
        print(json.dumps(result, indent=2))
        return code
    if args.cache_command == "size":
        u = result
        print(f"{size(u['bytes'])} in {u['objects']} files"
              + (f" (limit {size(u['max_size'])})" if u.get("max_size") else ""))
        print(f"{size(u['pinned_bytes'])} pinned in {u['pinned_objects']} files; "
              f"{size(u['dirty_bytes'])} not yet in S3 in {u['dirty_objects']} files; "
              f"{size(u['disk_free'])} free on disk")
    elif args.cache_command in ("prune", "clear"):
        kept = [f"{result[k]} {k[5:]}" for k in ("kept_dirty", "kept_pinned", "kept_open")
                if result.get(k)]
        print(f"removed {result['objects']} files, {size(result['bytes'])}"
              + (f"; kept {', '.join(kept)}" if kept else ""))
    else:
        print(f"checked {result['objects']} files, {size(result['bytes'])}: "
              + (f"{result['bad_blocks']} bad block(s) dropped (fetched again when read)"
                 if result["bad_blocks"] else "all good"))
        for b in result.get("bad_objects", []):
            print(f"  {b['bucket']}/{b['key']}: {size(b['bad_bytes'])} dropped")
        print_against_s3(result)
    return code


def print_against_s3(result: dict) -> None:
    """The S3 side of ``cache verify``: how each complete cached object is verified."""
    from .checksums import label
    a = result.get("against_s3")
    if a is None:
        return
    counts = sorted(a["verified"].items(), key=lambda kv: (-kv[1], kv[0]))
    how = ", ".join(f"{n} {label(k)}" for k, n in counts)
    print(f"against S3: {sum(a['verified'].values())} verified" + (f" ({how})" if how else "")
          + f"; {len(a['not_verifiable'])} not verifiable; {len(a['not_yet_verified'])} not yet "
          f"verified; {a['partial']} partly cached (checked block by block)")
    if result.get("s3_mismatches"):
        print(f"  {result['s3_mismatches']} file(s) did not match S3's sums: dropped (fetched "
              "again when read)")
    for o in a["not_verifiable"][:50]:
        print(f"  not verifiable: {o['bucket']}/{o['key']}: {o['why']}")
    for o in a["not_yet_verified"][:50]:
        print(f"  not yet verified: {o['bucket']}/{o['key']}")
    if result.get("s3_error") and a["not_yet_verified"]:
        print(f"  could not check against S3: {result['s3_error']}")


def _run_locally(settings, cache, req: dict) -> dict:
    import trio
    cmd = req["cmd"]
    if cmd == "size":
        return cache.usage()
    if cmd == "prune":
        return cache.prune(req["older_than"])
    if cmd == "clear":
        return cache.clear(include_pinned=req["include_pinned"])
    return trio.run(_verify_locally, settings, cache)


async def _verify_locally(settings, cache) -> dict:
    """``cache verify`` with nothing mounted: the S3 side too, for this endpoint's objects,
    when S3 can be reached with these settings."""
    from .errors import S3StashError
    from .store import Store
    from .verify import Verifier, verify_cache
    try:
        verifier, why = Verifier(Store(settings), cache), ""
    except (S3StashError, MountError) as e:
        verifier, why = None, f"S3 could not be asked: {e}"
    return await verify_cache(cache, verifier, why)


def _ask_mounts(groups: dict, request, bar) -> list[dict]:
    """``request(paths)`` sent to each mount's control socket for its paths (the progress bar
    fed by its answers); the answers, each with its mountpoint."""
    results = []
    for mp, paths in groups.items():
        try:
            r = ask(cache_dir_of(mp), request(paths), bar.update if bar else None)
        finally:
            if bar:
                bar.done()
        if r is None:
            raise CommandError(f"{mp}: the mount does not answer on its control socket")
        results.append({"mountpoint": mp, **r})
    return results


def cmd_pin(settings, args, pin: bool) -> int:
    groups: dict[str, list[str]] = {}
    for path in args.paths:
        mp, parts = mount_containing(path)
        groups.setdefault(mp, []).append("/".join(parts))
    bar = ProgressBar(sys.stderr) if pin and _want_progress(args) else None
    results = _ask_mounts(groups, lambda paths: {"cmd": "pin" if pin else "unpin", "paths": paths},
                          bar)
    failed = [f for r in results for f in r.get("failed", [])]
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
    elif pin:
        for r in results:
            print(f"pinned {r['files']} of {r['files_total']} files, {size(r['bytes'])} "
                  f"({size(r['fetched'])} fetched) in {r['seconds']:.2f} s")
        for f in failed:
            print(f"  not pinned: {f['bucket']}/{f['key']}: {f['error']}", file=sys.stderr)
    else:
        print(f"unpinned {sum(r['files'] for r in results)} files")
    return EXIT_FAIL if failed else EXIT_OK


def cmd_sync(settings, args) -> int:
    r, mounted = ask_or_local(settings, args.mountpoint, {"cmd": "sync"},
                              lambda cache, cache_dir: (len(pending(settings, cache)), cache_dir))
    if not mounted:
        n, cache_dir = r
        msg = (f"not mounted: {n} change(s) wait in {cache_dir} and are uploaded when it is "
               "mounted" if n else f"not mounted; nothing pending in {cache_dir}")
        if args.json:
            print(json.dumps({"mounted": False, "pending": n}))
        else:
            print(msg)
        return EXIT_NOT_MOUNTED
    code = EXIT_FAIL if r["failed"] else EXIT_LOOK if r["conflicts"] else EXIT_OK
    if args.json:
        print(json.dumps(r, indent=2))
        return code
    print(f"uploaded {len(r['uploaded'])} change(s); {len(r['failed'])} failed; "
          f"{len(r['conflicts'])} conflict(s)")
    for f in r["failed"]:
        print(f"  still pending: {f['bucket']}/{f['key']}: {f['error']}")
    for c in r["conflicts"]:
        print(f"  conflict: {c['bucket']}/{c['key']} changed in S3; yours is "
              f"{c['bucket']}/{c['conflict_key']}")
    return code


_RESTORE_SHOWN = 200  # lines of objects printed; --json lists them all


def cmd_restore(settings, args) -> int:
    """Restores through the mount's control socket: the mount resolves paths as the kernel
    does, lists directories with its own settings and credentials, and learns at once that
    those objects must be asked about again when opened."""
    groups: dict[str, list[str]] = {}
    for path in args.paths:
        mp, rest = _restore_path(path)
        if rest not in groups.setdefault(mp, []):
            groups[mp].append(rest)
    bar = ProgressBar(sys.stderr) if _want_progress(args) else None
    results = _ask_mounts(groups, lambda paths: {"cmd": "restore", "paths": paths,
                                                 "days": args.days, "tier": args.tier}, bar)
    objects = [o for r in results for o in r["objects"]]
    states = [o["state"] for o in objects]
    code = (EXIT_FAIL if "failed" in states else
            EXIT_LOOK if not objects or {"in progress", "not archived"} & set(states) else EXIT_OK)
    if args.json:
        print(json.dumps(results if len(results) != 1 else results[0], indent=2))
        return code
    n = {s: states.count(s) for s in ("requested", "in progress", "restored", "not archived",
                                      "failed")}
    print(f"restore ({args.tier}, {args.days} days): {n['requested']} requested, "
          f"{n['in progress']} already in progress, {n['restored']} already restored, "
          f"{n['not archived']} not archived (skipped), {n['failed']} failed")
    for o in objects[:_RESTORE_SHOWN]:
        line = f"  {o['state']:<13} {o['bucket']}/{o['key']}"
        if o.get("storage_class") and o["state"] != "not archived":
            line += f"  ({o['storage_class']}{' ' + o['archive_status'] if o.get('archive_status') else ''})"
        if o["state"] == "restored" and o.get("expiry"):
            line += f"  until {o['expiry']}"
        if o["state"] == "failed":
            line += f": {o.get('error')}"
        print(line, file=sys.stderr if o["state"] == "failed" else sys.stdout)
    if len(objects) > _RESTORE_SHOWN:
        print(f"  ... and {len(objects) - _RESTORE_SHOWN} more (--json lists them all)")
    if not objects:
        print("  nothing there to restore")
    return code


def _restore_path(path: str) -> tuple[str, str]:
    """(mountpoint, path below it) for ``restore``: exit 4 when no s3stashfs mount holds the
    path, 2 when the mount says there is no such file."""
    try:
        mp, parts = mount_containing(path)
    except CommandError as e:
        if e.code == EXIT_USAGE:
            raise CommandError(str(e), EXIT_NOT_MOUNTED) from None
        try:
            os.lstat(path)
        except FileNotFoundError:
            raise CommandError(str(e), EXIT_USAGE) from None
        except OSError:
            pass
        raise
    return mp, "/".join(parts)


# ------------------------------------------------------------------------ formatting
def size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def when(t) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_older_than(text: str, now: float | None = None) -> float:
    """'30d', '12h', '2w', '90m', '45s' ago, or a date '2026-10-01' / '2026-10-01T12:00'
    (local time) -> epoch seconds."""
    now = time.time() if now is None else now
    m = _AGE.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return dt.datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigError(f"--older-than: {text!r} is neither an age (30d, 12h, 2w, 90m, 45s) "
                          "nor a date (2026-10-01 or 2026-10-01T12:00)") from None


def _want_progress(args) -> bool:
    if args.json:
        return False
    if args.progress is not None:
        return args.progress
    return sys.stderr.isatty()


class ProgressBar:
    """files, bytes, rate and time left, redrawn in place on one line."""

    WIDTH = 24

    def __init__(self, out):
        self.out = out
        self.drawn = False

    def update(self, p: dict) -> None:
        total = p["bytes_total"] or 1
        frac = min(p["bytes"] / total, 1.0) if p["bytes_total"] else (
            p["files"] / p["files_total"] if p["files_total"] else 1.0)
        filled = int(frac * self.WIDTH)
        rate = p["bytes"] / p["elapsed"] if p["elapsed"] > 0 else 0.0
        left = (p["bytes_total"] - p["bytes"]) / rate if rate > 0 else None
        eta = "--:--" if left is None else f"{int(left // 60)}:{int(left % 60):02d}"
        self.out.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                       f"{p['files']}/{p['files_total']} files  {size(p['bytes'])}/"
                       f"{size(p['bytes_total'])}  {size(rate)}/s  {eta} left ")
        self.out.flush()
        self.drawn = True

    def done(self) -> None:
        if self.drawn:
            self.out.write("\n")
            self.out.flush()
