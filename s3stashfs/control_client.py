"""The client end of the control channel (see control.py for the protocol): one request to
the mount serving a cache directory. Apart from control.py, whose server side brings the
daemon's imports (trio, boto3), so that `s3stashfs status` and the other commands start in a
fraction of a second."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

SOCKET_NAME = "control.sock"


class ControlError(Exception):
    """The command could not be done; ``errno`` says why (ENETUNREACH, ENOENT, ...)."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno


@contextlib.contextmanager
def _dir_fd(directory: Path):
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


class NotServing(Exception):
    """No mount answers on this cache directory's socket."""


def request(cache_dir: Path, req: dict, on_progress=None, connect_timeout: float = 5.0) -> dict:
    """Send one command to the mount using ``cache_dir``; returns its result. Raises NotServing
    when no mount listens there, ControlError when the mount answered with an error."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(connect_timeout)
        try:
            with _dir_fd(cache_dir) as short:
                s.connect(short)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise NotServing(str(e)) from None
        s.settimeout(None)  # pin and sync take as long as they take
        s.sendall((json.dumps(req) + "\n").encode())
        f = s.makefile("rb")
        for line in f:
            msg = json.loads(line)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(msg["progress"])
            elif "result" in msg:
                return msg["result"]
            elif "error" in msg:
                raise ControlError(msg["error"], int(msg.get("errno") or 0))
        raise ControlError("the mount closed the connection without an answer")
    finally:
        s.close()
