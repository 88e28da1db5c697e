"""One worker process of tests/test_load.py: reads, writes or walks through a mount with plain
system calls and records every call, so that the test can judge each one (bytes, errno, time)
and a watchdog can tell which call a stuck worker is in.

    python load_worker.py SPEC.json EVENTS.jsonl

SPEC is {"role": "read" | "write" | "walk" | "ls", ...} (see the functions below). EVENTS gets one
JSON line per event, flushed at once: {"ev": "ready"}, then for each call {"ev": "begin", "op",
"what"} and {"ev": "end", "op", "what", "took", "errno", "ok", "detail"}, then {"ev": "done"}.
The worker starts its calls when a line arrives on stdin (all workers at once).

Standard library only: 30-odd of these start at once on a busy machine.
"""
from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time

MiB = 1 << 20
EIO_TRIES = 3  # an EIO is a clean answer; the same read is tried this often before giving up


class Events:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)

    def put(self, **ev) -> None:
        ev["t"] = time.monotonic()
        self.f.write(json.dumps(ev) + "\n")
        self.f.flush()

    def call(self, op: str, what: str, fn, *args):
        """Run one system call, timed; returns (result, errno or None). Only OSError is an
        answer: anything else is a bug of the worker and ends it."""
        self.put(ev="begin", op=op, what=what)
        t = time.monotonic()
        try:
            out, err = fn(*args), None
        except OSError as e:
            out, err = None, e.errno
        self.put(ev="end", op=op, what=what, took=time.monotonic() - t, errno=err,
                 ok=err is None)
        return out, err

    def bad(self, op: str, what: str, detail: str) -> None:
        """Wrong or short data, or another surprise: the test fails on any of these."""
        self.put(ev="bad", op=op, what=what, detail=detail)


def expected(size: int, seed: str) -> bytes:
    return random.Random(seed).randbytes(size)  # as helpers.random_bytes


def read(ev: Events, spec: dict) -> None:
    """Read one file front to back in ``piece`` reads, each compared with the expected bytes.
    A short read is read on from where it ended (the kernel returns what it got before a
    failing request); the end of file before ``size`` is short data. An EIO is tried again
    at the same offset, EIO_TRIES times in all."""
    path, size, want = spec["path"], spec["size"], expected(spec["size"], spec["seed"])
    piece = spec.get("piece", MiB)
    fd, err = ev.call("open", path, os.open, path, os.O_RDONLY)
    if fd is None:
        return
    off, tries = 0, 0
    try:
        while True:
            data, err = ev.call("read", f"{path}@{off}", os.pread, fd, piece, off)
            if err is not None:
                tries += 1
                if tries >= EIO_TRIES or err != errno.EIO:
                    return
                continue
            tries = 0
            if not data:
                if off != size:
                    ev.bad("read", path, f"end of file at {off} of {size} bytes")
                return
            if off + len(data) > size:
                ev.bad("read", path, f"{off + len(data)} bytes, more than the {size} expected")
                return
            if data != want[off:off + len(data)]:
                ev.bad("read", path, f"wrong bytes in [{off}, {off + len(data)})")
                return
            off += len(data)
    finally:
        ev.call("close", path, os.close, fd)


def write(ev: Events, spec: dict) -> None:
    """Create each file, write it front to back in ``piece`` writes and close it: close()
    uploads, and its answer is the upload's. A short write is an error of the mount."""
    piece = spec.get("piece", MiB)
    for f in spec["files"]:
        path, data = f["path"], expected(f["size"], f["seed"])
        fd, err = ev.call("create", path, os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if fd is None:
            continue
        off = 0
        while off < len(data):
            n, err = ev.call("write", f"{path}@{off}", os.write, fd, data[off:off + piece])
            if err is not None:
                break
            if n != min(piece, len(data) - off):
                ev.bad("write", path, f"short write at {off}: {n}")
                break
            off += n
        ev.call("close", path, os.close, fd)


def walk(ev: Events, spec: dict) -> None:
    """List the tree under ``root`` (each directory one listing, each entry one lstat, as
    ``ls -lR`` does) and report what it found: {"ev": "tree", "files": {relpath: size}}."""
    root = spec["root"]
    files: dict[str, int] = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        names, err = ev.call("listdir", rel or ".", os.listdir, os.path.join(root, rel))
        if names is None:
            continue
        for name in sorted(names):
            sub = os.path.join(rel, name)
            st, err = ev.call("lstat", sub, os.lstat, os.path.join(root, sub))
            if st is None:
                continue
            if (st.st_mode & 0o170000) == 0o040000:
                todo.append(sub)
            else:
                files[sub] = st.st_size
    ev.put(ev="tree", files=files)


def ls(ev: Events, spec: dict) -> None:
    """``ls -lR`` of the tree: a real program; reports the file names it printed."""
    root = spec["root"]

    def run():
        r = subprocess.run(["ls", "-lR", root], capture_output=True, timeout=spec["timeout"])
        if r.returncode != 0:  # ls printed why: the errno is the one whose text it printed
            text = r.stderr.decode(errors="replace").strip()
            code = next((c for c in (errno.EIO, errno.ENETUNREACH, errno.ENOENT, errno.EACCES)
                         if os.strerror(c) in text), -1)
            raise OSError(code, text)
        return r.stdout.decode(errors="replace")
    out, err = ev.call("ls -lR", root, run)
    if out is not None:
        names = [line.split()[-1] for line in out.splitlines() if line.startswith("-")]
        ev.put(ev="tree", names=sorted(names))


ROLES = {"read": read, "write": write, "walk": walk, "ls": ls}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    ev = Events(sys.argv[2])
    ev.put(ev="ready")
    sys.stdin.readline()  # go
    ROLES[spec["role"]](ev, spec)
    ev.put(ev="done")


if __name__ == "__main__":
    main()
