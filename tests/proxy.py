"""A loopback TCP proxy in front of the S3 server, switchable at run time, for tests of an
S3 that stops answering in ways other than a stopped process.

Modes:
- ``pass``: bytes flow both ways.
- ``reset``: new connections are accepted and reset at once (RST); open ones are reset too.
- ``blackhole``: new connections are accepted and never answered; open ones stop forwarding
  (the peer sees a hung server: connected, silent).
- ``refuse``: the port is closed, so connecting is refused.
- ``slowdown``: every request is answered ``503 SlowDown`` (S3's throttling), connection closed;
  open connections are reset, so nothing reaches the server any more.

``blackhole_after(n)`` forwards ``n`` more bytes of the server's answers, then black-holes: a
download that stalls mid-body. Going back to ``pass`` resets the black-holed connections (as a
NAT dropping its state would) and forwards again. Everything runs in threads of this process;
``close()`` ends them all.
"""
from __future__ import annotations

import select
import socket
import struct
import threading

MODES = ("pass", "reset", "blackhole", "refuse", "slowdown")
SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                 b'<Message>Please reduce your request rate.</Message></Error>')


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.mode = "pass"
        self.accepted = 0
        self._budget: int | None = None  # bytes of answers still forwarded (blackhole_after)
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket | None]] = []
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ control
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        cut = mode in ("reset", "refuse", "slowdown")
        with self._lock:
            old, self.mode = self.mode, mode
            self._budget = None
            conns = list(self._conns)
            if cut or (old == "blackhole" and mode == "pass"):
                self._conns.clear()
        if cut or (old == "blackhole" and mode == "pass"):
            for client, upstream in conns:
                _reset(client)
                if upstream is not None:
                    _reset(upstream)
        if mode == "refuse":
            self._unlisten()
        elif self._listener is None:
            self._listen()

    def blackhole_after(self, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes from the server to the clients, then black-hole."""
        with self._lock:
            self._budget = nbytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
            self._conns.clear()
        self._unlisten()
        for client, upstream in conns:
            _reset(client)
            if upstream is not None:
                _reset(upstream)
        self._thread.join(5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s

    def _unlisten(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            s.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            s = self._listener
            if s is None:
                threading.Event().wait(0.05)
                continue
            try:
                ready, _, _ = select.select([s], [], [], 0.1)
                if not ready:
                    continue
                client, _ = s.accept()
            except (OSError, ValueError):
                continue  # the listener was closed under us (refuse, close)
            self.accepted += 1
            mode = self.mode
            if mode == "reset":
                _reset(client)
            elif mode == "blackhole":
                with self._lock:
                    self._conns.append((client, None))
            elif mode == "slowdown":
                with self._lock:
                    self._conns.append((client, None))
                threading.Thread(target=self._slow_down, args=(client,), daemon=True,
                                 name="proxy-slowdown").start()
            else:
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                except OSError:
                    _reset(client)
                    continue
                with self._lock:
                    self._conns.append((client, upstream))
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True,
                                 name="proxy-pump").start()

    def _slow_down(self, client: socket.socket) -> None:
        """Read one request (headers and any body), answer 503 SlowDown, close."""
        try:
            client.settimeout(5)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = client.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                body += chunk
            answer = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                      b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(SLOWDOWN_BODY))
            if not head.startswith(b"HEAD "):
                answer += SLOWDOWN_BODY
            client.sendall(answer)
        except (OSError, ValueError):
            pass
        finally:
            self._done((client, None))

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward both ways until either side closes; while black-holed, forward nothing."""
        peer = {client: upstream, upstream: client}
        try:
            while not self._closed:
                with self._lock:
                    if (client, upstream) not in self._conns:
                        return  # reset by set_mode
                if self.mode == "blackhole":
                    threading.Event().wait(0.05)
                    continue
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is upstream and self._budget is not None:
                        with self._lock:
                            if self._budget is not None:
                                data = data[:self._budget]
                                self._budget -= len(data)
                                if not self._budget:
                                    self._budget, self.mode = None, "blackhole"
                    if data:
                        peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._done((client, upstream))

    def _done(self, conn: tuple[socket.socket, socket.socket | None]) -> None:
        """A connection ended: forget it and close its sockets."""
        with self._lock:
            try:
                self._conns.remove(conn)
            except ValueError:
                pass
        for s in conn:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
