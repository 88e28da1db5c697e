"""Command line: argument parsing, exit codes, and daemonising ``mount``; the other commands
(status, cache, pin, unpin, sync, restore) are in commands.py.

Exit codes: 0 success; 1 the operation failed (no FUSE, S3 refused, bucket missing, endpoint
unreachable, mount died); 2 bad input (flags, settings, env file, mountpoint); the other
commands add 3 (done, but look) and 4 (not mounted).
Nothing else in the package reads ``sys.argv``.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ConfigError, MountError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
READY_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 120.0


class _Parser(argparse.ArgumentParser):
    commands: dict = {}  # on the top parser: the subcommands by name (set by build_parser)

    def error(self, message):  # one line and exit 2, like every other bad input
        self.print_usage(sys.stderr)
        print(f"s3stashfs: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> _Parser:
    p = _Parser(prog="s3stashfs", description=(
        "Mount S3 as a local directory: MOUNTPOINT/<bucket>/<key> is an object. Objects are read "
        "through a local cache checked against their ETag on every open."),
        epilog="Settings also come from S3STASHFS_* environment variables and the env file "
               "~/.s3stashfs.env (or $S3STASHFS_ENV); flags win over both. Credentials come from "
               "boto3's usual chain (AWS_* variables, ~/.aws, instance roles). Exit status: 0 ok, "
               "1 failed, 2 bad input; status, cache verify and sync also use 3 (offline, bad "
               "blocks, conflicts) and 4 (not mounted).")
    p.add_argument("--version", action="version", version=f"s3stashfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    p.commands = sub.choices

    m = sub.add_parser("mount", help="mount S3 on MOUNTPOINT", description=(
        "Mount S3 on MOUNTPOINT. Returns once the mount answers; the daemon keeps running until "
        "'s3stashfs unmount', SIGTERM or SIGINT."), epilog=(
        "Every flag is also a mount option, for /etc/fstab and -o: its name with underscores, "
        "NAME=VALUE, or just NAME for an on/off flag (--cache-dir DIR is -o cache_dir=DIR, "
        "--read-only is -o read_only); list items are separated by ':' (-o buckets=a:b). ro is "
        "read_only; rw, defaults, auto, noauto, nofail, _netdev, user, users, nouser, owner, group, "
        "x-*, comment=*, dev, nodev, suid, nosuid, exec, async, atime, noatime, relatime, "
        "strictatime, nodiratime, lazytime and default_permissions are accepted and change nothing "
        "(the mount is always nosuid,nodev,noatime); anything else is an error. An -o option is its "
        "flag: given both ways, the later one wins; both win over S3STASHFS_* variables and the env "
        "file. mount(8) runs 's3stashfs SOURCE MOUNTPOINT -o OPTIONS', SOURCE being "
        "BUCKET[/PREFIX], or s3stashfs or none for every bucket: see 's3stashfs "
        "install-mount-helper --help'."))
    m.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    m.add_argument("-o", metavar="OPT[,OPT...]", dest="options",
                   help="settings as mount options, e.g. -o cache_dir=/var/cache/s3,read_only "
                        "(see below)")
    m.add_argument("--bucket", metavar="NAME[/PREFIX]",
                   help="show only this bucket (or prefix) as the mount's root [S3STASHFS_BUCKET]")
    m.add_argument("--buckets", metavar="A,B,...",
                   help="the buckets listed at the root, instead of asking S3 (ListBuckets) "
                        "[S3STASHFS_BUCKETS]")
    m.add_argument("--endpoint-url", metavar="URL",
                   help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 [S3STASHFS_ENDPOINT_URL]")
    m.add_argument("--profile", metavar="P", help="AWS profile from ~/.aws [S3STASHFS_PROFILE]")
    m.add_argument("--region", metavar="R", help="AWS region [S3STASHFS_REGION]")
    m.add_argument("--cache-dir", metavar="DIR",
                   help="cache directory (default $XDG_CACHE_HOME/s3stashfs) [S3STASHFS_CACHE_DIR]")
    m.add_argument("--cache-max-size", metavar="SIZE",
                   help="largest the cache may grow, e.g. 500M, 20G, 1.5T (default none: no "
                        "limit); least recently read files are evicted first, never files with "
                        "unsaved changes, pinned or open ones [S3STASHFS_CACHE_MAX_SIZE]")
    m.add_argument("--cache-min-free", metavar="SIZE|PCT",
                   help="free space the cache keeps on its disk by evicting, e.g. 2G or 10%% "
                        "(default 5%%) [S3STASHFS_CACHE_MIN_FREE]")
    m.add_argument("--read-ahead-memory", metavar="SIZE",
                   help="most read-ahead requested from S3 and not yet arrived, across all open "
                        "files, e.g. 64M, 1G (default 64M); a reader alone gets its whole window, "
                        "several share it [S3STASHFS_READ_AHEAD_MEMORY]")
    m.add_argument("--file-mode", metavar="MODE",
                   help="permissions of cache files, at least 0600 (default 0600) "
                        "[S3STASHFS_FILE_MODE]")
    m.add_argument("--read-only", action="store_true", help="refuse every change [S3STASHFS_READ_ONLY]")
    m.add_argument("--noexec", action="store_true",
                   help="refuse to execute programs from the mount [S3STASHFS_NOEXEC]")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground, log to stderr")
    m.add_argument("--allow-other", action="store_true",
                   help="let other users use the mount (needs user_allow_other in /etc/fuse.conf) "
                        "[S3STASHFS_ALLOW_OTHER]")
    m.add_argument("--xattrs", action="store_true",
                   help="user.* extended attributes as the objects' x-amz-meta-* (off by default, "
                        "as in s3fs: ls -l then asks the mount about every file) [S3STASHFS_XATTRS]")
    m.add_argument("--offline-writes", choices=("refuse", "queue"),
                   help="while S3 is unreachable: refuse every change at once with ENETUNREACH "
                        "(default), or queue changes in the cache and apply them in order once "
                        "S3 answers [S3STASHFS_OFFLINE_WRITES]")
    m.add_argument("--local-only", metavar="GLOB,...",
                   help="names kept in the cache only, never uploaded (default: editors' swap and "
                        "lock files) [S3STASHFS_LOCAL_ONLY]")
    m.add_argument("--multipart-threshold-mb", metavar="N",
                   help="upload files larger than N MiB in parts (default 8) "
                        "[S3STASHFS_MULTIPART_THRESHOLD_MB]")
    m.add_argument("--part-size-mb", metavar="N",
                   help="size of upload parts in MiB, grown to fit 10,000 parts (default 8) "
                        "[S3STASHFS_PART_SIZE_MB]")
    m.add_argument("--addressing-style", choices=("auto", "path", "virtual"),
                   help="S3 addressing style (default auto: path with an endpoint URL) "
                        "[S3STASHFS_ADDRESSING_STYLE]")
    m.add_argument("--metadata-ttl", metavar="S",
                   help="seconds a listing or lookup is trusted (default 5; 0 = always ask S3) "
                        "[S3STASHFS_METADATA_TTL]")
    m.add_argument("--timeout", metavar="S",
                   help="seconds to wait for S3 to answer a metadata request before the mount "
                        "goes offline (default 5; connecting waits 0.4x, a stalled download 2x, "
                        "an upload 6x this) [S3STASHFS_TIMEOUT]")
    m.add_argument("--no-sign-request", action="store_true",
                   help="send requests unsigned, for public buckets; no credentials needed, "
                        "but the buckets must be named (--bucket, or S3STASHFS_BUCKETS for the "
                        "root) [S3STASHFS_NO_SIGN_REQUEST]")
    m.add_argument("--requester-pays", action="store_true",
                   help="agree to pay for requests to requester-pays buckets "
                        "[S3STASHFS_REQUESTER_PAYS]")
    m.add_argument("--ca-bundle", metavar="FILE",
                   help="CA certificates to trust for HTTPS (default: boto3's: AWS_CA_BUNDLE, "
                        "the profile's ca_bundle, certifi) [S3STASHFS_CA_BUNDLE]")
    m.add_argument("--no-verify-ssl", action="store_true",
                   help="do not check S3's certificate (insecure; logged at every mount) "
                        "[S3STASHFS_NO_VERIFY_SSL]")
    m.add_argument("--log-file", metavar="F",
                   help="log file (default: stderr in the foreground, "
                        "$XDG_STATE_HOME/s3stashfs/s3stashfs.log otherwise) [S3STASHFS_LOG_FILE]")
    m.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper,
                   help="log level (default INFO) [S3STASHFS_LOG_LEVEL]")
    m.add_argument("--debug", action="store_true", help="log at DEBUG level [S3STASHFS_LOG_LEVEL]")
    m.add_argument("--env-file", metavar="FILE",
                   help="the env file to read (default ~/.s3stashfs.env); for fstab, where "
                        "mount(8) passes no user's environment [S3STASHFS_ENV]")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    h = sub.add_parser("install-mount-helper", help="let mount(8) and /etc/fstab find s3stashfs",
                       description=(
        "Link this s3stashfs into DIR (default /usr/local/sbin) as 's3stashfs': mount(8) and "
        "mount.fuse3 run it from a fixed PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
        "/sbin:/bin), which a virtual environment is not on. Nothing to do when s3stashfs is "
        "already there (pip install as root puts it in /usr/local/bin). A file of that name that "
        "is not such a link is left alone unless --force."))
    h.add_argument("--dir", metavar="DIR", type=Path, default=Path("/usr/local/sbin"),
                   help="where to put the link (default /usr/local/sbin)")
    h.add_argument("--uninstall", action="store_true", help="remove the link (only ours)")
    h.add_argument("--force", action="store_true", help="replace a file that is not our link")

    u = sub.add_parser("unmount", help="unmount MOUNTPOINT", description=(
        "Unmount MOUNTPOINT and wait for its daemon to finish."))
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)

    def command(name, help, description, mountpoint=True, parent=sub):
        c = parent.add_parser(name, help=help, description=description)
        if mountpoint:
            c.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                           help="a mount (default: the mount, or the cache, of the cache "
                                "directory the settings name)")
            c.add_argument("--cache-dir", metavar="DIR",
                           help="the cache directory to ask about [S3STASHFS_CACHE_DIR]")
        c.add_argument("--json", action="store_true", help="print one JSON document")
        return c

    command("status", "online or offline, cache use, pending uploads, conflicts, errors",
            "Show a mount's state: online or offline and since when, cache use and limits, changes "
            "not yet in S3, conflicts and recent errors per file. Works on the cache directory "
            "when nothing is mounted. Exit status: 0 online, 3 offline, 4 not mounted, 1 failed.")
    c = sub.add_parser("cache", help="size | prune | clear | verify the cache", description=(
        "Look after the cache, through the running mount or, with nothing mounted, on the "
        "cache directory itself. Dirty data (not yet in S3) is never removed."))
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION", required=True,
                            parser_class=_Parser)
    command("size", "bytes cached, pinned and dirty, and the limits", "Show the cache's size.",
            parent=csub)
    pr = command("prune", "remove what was not used since a time",
                 "Remove cached objects last used before --older-than: not pinned, not dirty, "
                 "not open.", parent=csub)
    pr.add_argument("--older-than", metavar="AGE|DATE", required=True,
                    help="an age (30d, 12h, 2w, 90m) or a date (2026-10-01, 2026-10-01T12:00)")
    cl = command("clear", "remove every cached object that is safe to remove",
                 "Remove every cached object that is not dirty and not open; pinned ones too "
                 "with --include-pinned.", parent=csub)
    cl.add_argument("--include-pinned", action="store_true", help="remove pinned objects too")
    command("verify", "re-check cached bytes against their checksums",
            "Re-check every cached block against its checksum and drop bad ones, which are "
            "fetched again when read. Exit status 3 when bad blocks were found.", parent=csub)
    for name, verb in (("pin", "fetch now and keep offline"), ("unpin", "stop keeping")):
        pn = command(name, f"{verb}: files or whole directories",
                     f"{verb.capitalize()}: PATHs are files or directories inside a mount "
                     "(directories are taken whole, recursively)"
                     + (". Pinned files are fetched in parallel, kept offline and never "
                        "evicted." if name == "pin" else "."), mountpoint=False)
        pn.add_argument("paths", metavar="PATH", nargs="+")
        if name == "pin":
            pn.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="show a progress bar on stderr (default: when it is a terminal)")
    command("sync", "upload pending changes now and wait",
            "Upload every change not yet in S3 now, wait, and report. Exit status: 0 all in S3, "
            "3 all in S3 but conflicts were kept as copies, 1 some remain pending, 4 not mounted.")
    _restore_parser(command)
    return p


# S3's retrieval tiers (archive.TIERS, not imported: it brings botocore, 0.6 s per command),
# and the days a restored copy stays: a working week and the weekend after it
RESTORE_TIERS = ("Standard", "Bulk", "Expedited")
RESTORE_DAYS = 7


def _restore_parser(command) -> None:
    r = command("restore", "ask S3 to restore archived files (GLACIER, DEEP_ARCHIVE, ...)",
                "Ask S3 to restore archived objects (GLACIER, DEEP_ARCHIVE, and the archive "
                "tiers of INTELLIGENT_TIERING) so that they can be read: PATHs are files or "
                "directories inside a mount (directories are taken whole, recursively; objects "
                "that are not archived are skipped). S3 takes minutes (Expedited) to hours "
                "(Standard: 3-5 h, Bulk and DEEP_ARCHIVE: up to 48 h); open the files again "
                "once it is done. Reports per object: requested, already in progress, already "
                "restored (until when), not archived. Exit status: 0 requested or already "
                "restored, 3 some were not archived or already in progress, 1 some failed, "
                "2 bad input, 4 not inside a mount.", mountpoint=False)
    r.add_argument("paths", metavar="PATH", nargs="+")
    r.add_argument("--days", type=_days, default=RESTORE_DAYS,
                   help=f"how long the restored copy stays readable (GLACIER and DEEP_ARCHIVE; "
                        f"default {RESTORE_DAYS}; it is billed as STANDARD storage meanwhile)")
    r.add_argument("--tier", type=str.capitalize, choices=RESTORE_TIERS, default="Standard",
                   help="retrieval speed and price: Standard (default), Bulk, Expedited")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: when it is a terminal)")


def _days(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return n


def main(argv: list[str] | None = None) -> int:
    from . import fstab
    parser = build_parser()
    try:
        # mount.fuse's `s3stashfs SOURCE MOUNTPOINT -o OPTS`, and -o, become ordinary flags
        argv = fstab.rewrite_argv(sys.argv[1:] if argv is None else list(argv), parser.commands)
    except ConfigError as e:
        print(f"s3stashfs: {e}", file=sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        if args.command == "mount":
            return cmd_mount(args)
        if args.command == "install-mount-helper":
            return fstab.install_helper(sys.argv[0], args.dir, args.uninstall, args.force)
        if args.command == "unmount":
            return cmd_unmount(args)
        return cmd_other(args)
    except ConfigError as e:
        print(f"s3stashfs: {e}", file=sys.stderr)
        return EXIT_USAGE
    except MountError as e:
        print(f"s3stashfs: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `s3stashfs status | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL


def cmd_other(args) -> int:
    from . import commands
    try:
        settings = _settings(args)
        if args.command == "status":
            return commands.cmd_status(settings, args)
        if args.command == "cache":
            return commands.cmd_cache(settings, args)
        if args.command in ("pin", "unpin"):
            return commands.cmd_pin(settings, args, pin=args.command == "pin")
        if args.command == "restore":
            return commands.cmd_restore(settings, args)
        return commands.cmd_sync(settings, args)
    except commands.CommandError as e:
        print(f"s3stashfs {args.command}: {e}", file=sys.stderr)
        return e.code


def _settings(args):
    from . import config
    if getattr(args, "env_file", None):  # the daemon inherits it, and reads the same file
        os.environ[config.ENV_FILE_VAR] = os.path.abspath(os.path.expanduser(args.env_file))
    flags = {k: getattr(args, k, None) for k in (*config.SETTINGS, "foreground", "debug")}
    return config.load(flags)


def default_log_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "s3stashfs" / "s3stashfs.log"


def cmd_mount(args) -> int:
    import dataclasses

    from . import mountpoints
    settings = _settings(args)
    mountpoints.check_signing(settings)
    if not args.foreground:
        # the parent only checks and waits: the daemon's imports (pyfuse3, trio, boto3) are
        # the daemon's, or every mount would pay for them twice
        mountpoints.check_mountpoint(args.mountpoint)
        if settings.log_file is None:
            settings = dataclasses.replace(settings, log_file=default_log_file())
        return _daemonise(settings, args.mountpoint)
    from . import mount
    mount.setup_logging(settings)
    ready_fd = args.ready_fd

    def on_ready():
        nonlocal ready_fd
        if ready_fd is not None:
            os.write(ready_fd, b"OK\n")
            os.close(ready_fd)
            ready_fd = None

    try:
        mount.serve(settings, args.mountpoint, on_ready)
    except (ConfigError, MountError) as e:
        code = EXIT_USAGE if isinstance(e, ConfigError) else e.exit_code
        mount.log.error("%s", e)
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {code} {e}\n".encode())
            return code
        raise
    except Exception as e:  # a bug: say so at once rather than let the parent time out
        mount.log.exception("the mount failed")
        if ready_fd is not None:
            os.write(ready_fd, f"ERR {EXIT_FAIL} internal error: {type(e).__name__}: {e}\n".encode())
            return EXIT_FAIL
        raise
    return EXIT_OK


def _daemonise(settings, mountpoint: Path) -> int:
    """Start the mount in a new session and wait until it answers or says why it cannot."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "s3stashfs", "mount", os.path.abspath(mountpoint),
            "--foreground", "--ready-fd", str(w)]
    env = dict(os.environ)
    env.update(_settings_env(settings))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
                            env=env, cwd="/")
    os.close(w)
    deadline = time.monotonic() + READY_TIMEOUT
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([r], [], [], 0.5)
        if ready:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            buf += chunk
            if buf.endswith(b"\n"):
                break
        elif proc.poll() is not None:
            break
    os.close(r)
    msg = buf.decode(errors="replace").strip()
    if msg == "OK":
        return EXIT_OK
    if msg.startswith("ERR "):
        _, code, text = msg.split(" ", 2)
        print(f"s3stashfs: {text}", file=sys.stderr)
        return int(code)
    if proc.poll() is None:
        proc.terminate()
        print(f"s3stashfs: the mount did not answer within {READY_TIMEOUT:.0f} s; "
              f"see {settings.log_file}", file=sys.stderr)
    else:
        print(f"s3stashfs: the mount process exited with status {proc.returncode}; "
              f"see {settings.log_file}", file=sys.stderr)
    return EXIT_FAIL


def _settings_env(settings) -> dict[str, str]:
    """Hand the resolved settings to the daemon through its environment (flags already won)."""
    from . import config
    return config.to_env(settings)


def cmd_unmount(args) -> int:
    from .mountpoints import daemon_pids, mounted_points
    real = os.path.realpath(args.mountpoint)
    fstype = mounted_points().get(real, (None, None))[0]
    if fstype is None:
        raise ConfigError(f"{args.mountpoint} is not mounted")
    if fstype != "fuse.s3stashfs":
        raise ConfigError(f"{args.mountpoint} is not an s3stashfs mount ({fstype})")
    pids = [p for p in daemon_pids(real) if p != os.getpid()]
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", real] if tool else ["umount", real]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        why = (r.stderr or r.stdout).strip().splitlines()
        raise MountError(f"cannot unmount {args.mountpoint}: {why[-1] if why else 'failed'}")
    deadline = time.monotonic() + UNMOUNT_TIMEOUT
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.05)
    if any(map(_alive, pids)):
        raise MountError(f"unmounted, but daemon {pids} is still finishing; see its log")
    return EXIT_OK


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except FileNotFoundError:
        return False
