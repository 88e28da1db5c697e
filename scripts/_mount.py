"""Mount s3stashfs for a script, watch its daemon, and always clean up.

Shared by ``scripts/bench`` and ``scripts/soak``; stdlib only.

    mounter = Mounter(mount_cmd, bucket, mount_env(srv.env, workdir), workdir, extra_args,
                      timeout, log=log, error=MyError)
    with mounter.mount(endpoint_url, "label") as m:   # m.mountpoint, m.cache_dir, m.pid, m.log_file
        with mounter.watchdog(600, "what"):           # SIGKILLs the daemon if this hangs
            ...

The daemon's PID is read from ``<cache-dir>/mount.lock``.  On leaving ``mount()`` (also on an
exception or Ctrl-C): ``<mount-cmd> unmount``, then ``fusermount3 -u`` / ``-uz`` while still
mounted, then SIGTERM / SIGKILL of that PID alone (and only if its command line is ours); the
cache dir is removed, the mount's log is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from _s3server import log_tail

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- /proc


def proc_status(pid: int, fields: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Fields of /proc/<pid>/status: sizes in bytes (the kB ones), counts as they are."""
    out = {}
    prefixes = tuple(f + ":" for f in fields)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(prefixes):
                    name, val = line.split(":", 1)
                    parts = val.split()
                    out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of the process (all its threads), from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def proc_fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


class RssSampler:
    """Samples VmRSS of a PID every `interval` s; peak = max(sampled VmRSS, final VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.max_rss = 0
        self.hwm = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def _sample(self):
        st = proc_status(self.pid)
        self.max_rss = max(self.max_rss, st.get("VmRSS", 0))
        self.hwm = max(self.hwm, st.get("VmHWM", 0))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak(self) -> int:
        return max(self.max_rss, self.hwm)


# --------------------------------------------------------------------------- mounting


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
                if mp == target:
                    return True
    except OSError:
        pass
    return False


def read_lock_pid(cache_dir: str) -> int | None:
    try:
        with open(os.path.join(cache_dir, "mount.lock")) as f:
            text = f.read().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def mount_env(server_env: dict[str, str], workdir: str) -> dict[str, str]:
    """This environment without S3STASHFS_* and AWS_* (nothing of the user's leaks into the
    mount), plus the server's variables, and an empty env file instead of ~/.s3stashfs.env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3STASHFS_", "AWS_"))}
    env.update(server_env)
    empty_env = os.path.join(workdir, "empty.env")
    open(empty_env, "w").close()
    env["S3STASHFS_ENV"] = empty_env
    return env


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Mount:
    mountpoint: str
    cache_dir: str
    pid: int
    log_file: str
    endpoint_url: str
    seconds: float


class Mounter:
    """Mounts one s3stashfs at a time on <workdir>/mnt, each with a fresh cache dir and its own
    log file under <workdir>/logs.  Failures raise ``error`` (a script's own exception type)."""

    def __init__(self, mount_cmd: list[str], bucket: str, env: dict[str, str], workdir: str,
                 extra_args: list[str], timeout: float, *, log: Callable[[str], None] = _stderr_log,
                 error: type[Exception] = RuntimeError):
        self.cmd = mount_cmd
        self.bucket = bucket
        self.env = env
        self.workdir = workdir
        self.extra = extra_args
        self.timeout = timeout
        self.log = log
        self.error = error
        self.n = 0
        self.mountpoint = os.path.join(workdir, "mnt")
        self.logdir = os.path.join(workdir, "logs")
        os.makedirs(self.mountpoint, exist_ok=True)
        os.makedirs(self.logdir, exist_ok=True)
        self.active: Mount | None = None

    def looks_like_ours(self, pid: int, cache_dir: str) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return False
        marks = [cache_dir, self.mountpoint, "s3stashfs", os.path.basename(self.cmd[0])]
        return any(m and m in cmdline for m in marks)

    @contextlib.contextmanager
    def mount(self, endpoint_url: str, label: str, extra_args: list[str] | tuple[str, ...] = (),
              cache_dir: str | None = None):
        """``cache_dir``: mount on this existing cache dir and keep it afterwards (default: a
        fresh one, removed at the end)."""
        self.n += 1
        tag = f"{self.n:02d}-{label}"
        keep_cache = cache_dir is not None
        cache_dir = cache_dir or os.path.join(self.workdir, f"cache-{tag}")
        log_file = os.path.join(self.logdir, f"mount-{tag}.log")
        out_file = os.path.join(self.logdir, f"mount-{tag}.out")
        mp = self.mountpoint
        if is_mounted(mp):
            raise self.error(f"{mp} is still mounted")
        if not keep_cache:
            os.makedirs(cache_dir, mode=0o700)
        cmd = [*self.cmd, "mount", mp, "--endpoint-url", endpoint_url, "--bucket", self.bucket,
               "--cache-dir", cache_dir, "--log-file", log_file, *self.extra, *extra_args]
        pid = None
        t0 = time.monotonic()
        try:
            # stdout/stderr to a file, not a pipe: a daemon that kept the pipe open would
            # make us wait for EOF forever.
            with open(out_file, "wb") as out:
                try:
                    r = subprocess.run(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, timeout=self.timeout)
                    rc = r.returncode
                except subprocess.TimeoutExpired:
                    rc = None
            seconds = time.monotonic() - t0
            pid = read_lock_pid(cache_dir)
            if rc != 0:
                raise self.error(
                    f"mount {'timed out' if rc is None else f'exited {rc}'}: {shlex.join(cmd)}\n"
                    f"output: {log_tail(out_file, 10)}\nlog: {log_tail(log_file, 15)}")
            if not is_mounted(mp):
                raise self.error(f"mount exited 0 but {mp} is not a mount point")
            if pid is None or not pid_alive(pid):
                raise self.error(f"no live daemon PID in {cache_dir}/mount.lock (read {pid})")
            self.log(f"mounted ({label}) in {seconds:.2f} s, daemon pid {pid}")
            self.active = Mount(mp, cache_dir, pid, log_file, endpoint_url, seconds)
            yield self.active
        finally:
            self.active = None
            self._teardown(mp, cache_dir, pid, out_file)
            if not keep_cache:
                shutil.rmtree(cache_dir, ignore_errors=True)

    def _teardown(self, mp: str, cache_dir: str, pid: int | None, out_file: str) -> None:
        if pid is None:
            pid = read_lock_pid(cache_dir)
        grace = 10.0  # `unmount` waits for the daemon; give a clean exit a moment anyway
        if is_mounted(mp):
            try:
                with open(out_file, "ab") as out:
                    r = subprocess.run([*self.cmd, "unmount", mp], env=self.env,
                                       stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, timeout=self.timeout)
                ok = r.returncode == 0
            except (subprocess.TimeoutExpired, OSError) as e:
                self.log(f"unmount failed: {e}")
                ok = False
            if not ok:
                grace = 0.0
                self.log(f"unmount of {mp} failed: {log_tail(out_file, 5)}")
            for args in (["-u"], ["-uz"]):
                if not is_mounted(mp):
                    break
                self.log(f"fusermount3 {args[0]} {mp}")
                subprocess.run(["fusermount3", *args, mp], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=60)
            if is_mounted(mp):
                self.log(f"WARNING: {mp} is still mounted")
        if pid and pid_alive(pid) and self.looks_like_ours(pid, cache_dir):
            deadline = time.monotonic() + grace
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                if not pid_alive(pid):
                    break
                self.log(f"daemon {pid} still running after unmount: {sig.name}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)

    def kill_daemon(self, why: str) -> bool:
        """SIGKILL the active mount's daemon (by its PID, if it is ours), so that reads blocked
        in it fail (FUSE answers ENOTCONN) and the script can clean up.  True if killed."""
        m = self.active
        if m and pid_alive(m.pid) and self.looks_like_ours(m.pid, m.cache_dir):
            self.log(f"WATCHDOG: {why}; killing daemon {m.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
            return True
        return False

    @contextlib.contextmanager
    def watchdog(self, seconds: float, what: str):
        """If a step through the mount hangs longer than `seconds`, SIGKILL the daemon."""
        fired = threading.Event()

        def fire():
            if self.kill_daemon(f"{what} took more than {seconds:.0f} s"):
                fired.set()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield
        except OSError as e:
            if fired.is_set():
                raise self.error(f"{what}: hung for more than {seconds:.0f} s (daemon killed)") from e
            raise
        finally:
            timer.cancel()
        if fired.is_set():
            raise self.error(f"{what}: hung for more than {seconds:.0f} s (daemon killed)")
