"""Mount points and cache directories as the commands see them: what is mounted where, which
daemon serves a mount point, the checks before mounting, and the lock that allows one mount per
cache directory. Kept apart from mount.py, and free of its imports (pyfuse3, trio, boto3), so
that the commands that need only these (status, unmount, the parent of a mount) start in a
fraction of a second instead of importing the whole daemon."""
from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, MountError

if TYPE_CHECKING:
    from .config import Settings

LOCK_NAME = "mount.lock"


def mounted_points() -> dict[str, tuple[str, str]]:
    """mountpoint -> (filesystem type, device), from /proc/self/mountinfo."""
    out = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                # the kernel writes space, tab, newline and backslash as \ooo octal escapes
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                out[point] = (right.split()[0], fields[2])
    except OSError:
        pass
    return out


def check_mountpoint(path: Path) -> Path:
    """Refuse, with one clear line, a mountpoint that cannot work."""
    if not path.exists():
        raise ConfigError(f"mountpoint {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"mountpoint {path} is not a directory")
    real = Path(os.path.realpath(path))
    mounted = mounted_points().get(str(real))
    if mounted is not None:
        raise MountError(f"mountpoint {path} is already mounted ({mounted[0]})")
    if not os.access(real, os.W_OK | os.X_OK):
        raise ConfigError(f"mountpoint {path} is not writable by this user")
    return real


def check_signing(settings: Settings) -> None:
    """Unsigned requests cannot list a user's buckets (ListBuckets needs an identity) nor pay
    for a requester-pays bucket: refuse such settings at once, with one line."""
    if not settings.no_sign_request:
        return
    if settings.requester_pays:
        raise ConfigError("--requester-pays needs signed requests: it cannot be combined with "
                          "--no-sign-request")
    if not settings.bucket and not settings.buckets:
        raise ConfigError("--no-sign-request cannot list buckets (that needs credentials): name "
                          "them with --bucket NAME or S3STASHFS_BUCKETS=NAME,NAME")


def lock_cache_dir(cache_dir: Path) -> int:
    """One mount per cache directory: the catalog is not shared between processes."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            raise
        other = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise MountError(f"cache directory {cache_dir} is in use by another mount (pid {other or '?'})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def daemon_pids(mountpoint: str) -> list[int]:
    """PIDs of this user's s3stashfs daemons serving ``mountpoint`` (read from /proc)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != os.getuid():
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if "mount" not in argv or not any(a.endswith("s3stashfs") for a in argv):
            continue
        try:
            cwd = os.readlink(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        rest = argv[argv.index("mount") + 1:]
        if any(not a.startswith("-") and os.path.normpath(os.path.join(cwd, a)) == mountpoint
               for a in rest):
            pids.append(int(entry.name))
    return pids
