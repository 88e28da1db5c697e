"""Mounting from /etc/fstab: mount.fuse's calling convention, ``-o`` options, and the link
that lets mount(8) find s3stashfs.

mount(8) runs ``mount.fuse3``, which runs ``s3stashfs [SOURCE] MOUNTPOINT -o OPT,OPT,...``
through ``/bin/sh`` with mount's fixed PATH (:data:`MOUNT_PATH`). :func:`rewrite_argv` turns
that form, and ``-o`` given to ``s3stashfs mount``, into the ordinary flags before argparse
sees them, so an ``-o`` option is exactly its flag. The option names come from
``config.SETTINGS``: a new setting has its ``-o`` form without a change here.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from . import config
from .errors import ConfigError, MountError

PROGRAM = "s3stashfs"
# the PATH util-linux's mount(8) gives the helpers it runs (verified with 2.38.1): a
# program in a virtual environment is not on it
MOUNT_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
DEFAULT_HELPER_DIR = "/usr/local/sbin"
# SOURCE values that name no bucket: the root lists buckets (or the bucket setting decides)
NO_SOURCE = ("", PROGRAM, "none")
# Options for mount(8), systemd or the kernel that need nothing from s3stashfs: the mount is
# always nosuid,nodev,noatime (S3 objects are neither devices nor set-uid programs), so the
# opposite requests that mount.fuse3 adds by itself (dev,suid) change nothing either.
IGNORED = frozenset({
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group", "nofail",
    "_netdev", "dev", "nodev", "suid", "nosuid", "exec", "async", "atime", "noatime",
    "relatime", "strictatime", "nodiratime", "lazytime", "default_permissions"})
IGNORED_PREFIXES = ("x-", "comment=")  # x-systemd.automount, x-gvfs-show, ...
ALIASES = {"ro": "read_only"}
# not settings, but flags of `mount` that make sense in fstab
EXTRA = {"debug": True, "env_file": False}  # name -> is a switch
REFUSED = {"foreground": "mount(8) waits for the program to exit, so it would never return"}
LIST_SEP = ":"  # inside an -o value, since the comma separates options


def _option_flags(opt: str) -> list[str]:
    """One -o option -> the flags it stands for (none for an ignored option)."""
    name, eq, value = opt.partition("=")
    if opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
        return []
    name = ALIASES.get(name, name)
    if name in REFUSED:
        raise ConfigError(f"mount option '{name}' is not available: {REFUSED[name]}")
    if name in config.SWITCHES or EXTRA.get(name):
        switch = True
    elif name in config.SETTINGS or name in EXTRA:
        switch = False
    else:
        raise ConfigError(f"unknown mount option '{opt}' (see s3stashfs mount --help)")
    flag = "--" + name.replace("_", "-")
    if switch:
        if eq:
            raise ConfigError(f"mount option '{name}' takes no value (write just '{name}')")
        return [flag]
    if not eq:
        raise ConfigError(f"mount option '{name}' needs a value ({name}=...)")
    if name in config.LISTS:
        value = value.replace(LIST_SEP, ",")
    return [flag, value]


def option_flags(options: str) -> list[str]:
    """``cache_dir=/c,read_only,_netdev`` -> ``['--cache-dir', '/c', '--read-only']``."""
    flags: list[str] = []
    for opt in options.split(","):
        if opt:
            flags += _option_flags(opt)
    return flags


def _expand(args: list[str]) -> list[str]:
    """Replace every ``-o OPTS`` (or ``-oOPTS``) by its flags, in place: given both ways, the
    later one wins, as with any repeated flag."""
    out: list[str] = []
    it = iter(args)
    for a in it:
        if a == "-o":
            opts = next(it, None)
            if opts is None:
                raise ConfigError("-o needs options (-o name=value,name,...)")
            out += option_flags(opts)
        elif a.startswith("-o") and not a.startswith("--"):
            out += option_flags(a[2:])
        else:
            out.append(a)
    return out


def is_mount_fuse_form(argv: list[str], commands) -> bool:
    """``s3stashfs [SOURCE] MOUNTPOINT -o ...``: the first word is no command and no flag, and
    there are two words, or one and -o (mount.fuse3 leaves out an empty SOURCE, and always
    passes -o). ``s3stashfs stauts`` stays argparse's "invalid choice"."""
    if not argv or argv[0] in commands or argv[0].startswith("-"):
        return False
    words = [a for a in argv if not a.startswith("-")]
    return len(words) >= 2 or any(a.startswith("-o") for a in argv)


def rewrite_argv(argv: list[str], commands) -> list[str]:
    """The mount.fuse form, or ``mount ... -o OPTS``, as plain ``mount`` flags; anything else
    unchanged."""
    if argv and argv[0] == "mount":
        return ["mount", *_expand(argv[1:])]
    if not is_mount_fuse_form(argv, commands):
        return argv
    words: list[str] = []
    rest = argv
    while len(words) < 2 and rest and not rest[0].startswith("-"):
        words.append(rest[0])
        rest = rest[1:]
    if len(words) == 1:
        source, mountpoint = "", words[0]
    else:
        source, mountpoint = words
    if re.fullmatch(r"/dev/fd/\d+", mountpoint):
        raise ConfigError(f"mountpoint {mountpoint}: mount.fuse3's drop_privileges is not "
                          "supported; umount the mountpoint it left behind")
    source = source.removeprefix(PROGRAM + "#")
    flags = [] if source in NO_SOURCE else ["--bucket", source]
    return ["mount", mountpoint, *flags, *_expand(rest)]


def _program(argv0: str) -> Path | None:
    """This s3stashfs's console script: the program mount(8) is to run."""
    if Path(argv0).name == PROGRAM and os.access(argv0, os.X_OK):
        return Path(os.path.realpath(argv0))
    beside = Path(sys.executable).parent / PROGRAM  # the venv's bin/, as `python -m s3stashfs`
    if os.access(beside, os.X_OK):
        return Path(os.path.realpath(beside))
    found = shutil.which(PROGRAM)
    return Path(os.path.realpath(found)) if found else None


def _is_our_link(path: Path) -> bool:
    return path.is_symlink() and Path(os.readlink(path)).name == PROGRAM


def install_helper(argv0: str, directory: Path, uninstall: bool = False, force: bool = False) -> int:
    """Link this s3stashfs into ``directory`` as ``s3stashfs`` (or remove that link), so that
    mount(8) and mount.fuse3 find it on their fixed PATH. Says what it did on stdout."""
    link = directory / PROGRAM
    if uninstall:
        if not link.is_symlink() and not link.exists():
            print(f"s3stashfs: nothing to remove: {link} does not exist")
            return 0
        if not _is_our_link(link):
            raise MountError(f"{link} is not a link made by install-mount-helper; left alone")
        link.unlink()
        print(f"s3stashfs: removed {link}")
        return 0
    target = _program(argv0)
    if target is None:
        raise MountError("cannot find the s3stashfs program to link; run install-mount-helper "
                         "as that program, e.g. /path/to/venv/bin/s3stashfs install-mount-helper")
    if str(target.parent) in MOUNT_PATH and target.parent != directory:
        print(f"s3stashfs: {target} is already on the PATH mount(8) gives helpers; nothing to do")
        return 0
    if not directory.is_dir():
        raise MountError(f"{directory} is not a directory")
    if link.is_symlink() and Path(os.readlink(link)) == target:
        print(f"s3stashfs: {link} already links to {target}; nothing to do")
        return 0
    if (link.exists() or link.is_symlink()) and not _is_our_link(link) and not force:
        raise MountError(f"{link} exists and is not a link made by install-mount-helper; "
                         "left alone (--force replaces it)")
    tmp = directory / f".{PROGRAM}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)  # atomic: mount never finds the name missing
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise MountError(f"cannot link {link}: {e.strerror}") from None
    print(f"s3stashfs: linked {link} -> {target}")
    if str(directory) not in MOUNT_PATH:
        print(f"s3stashfs: note: {directory} is not on the PATH mount(8) gives helpers "
              f"({':'.join(MOUNT_PATH)})")
    return 0
