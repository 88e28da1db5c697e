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

``HttpProxy`` does all that, and understands HTTP/1.1 in ``pass`` mode (keep-alive,
Content-Length and chunked bodies, ``Expect: 100-continue``, HEAD answers without a body), so
that it can break single requests on purpose: ``inject(Fault(...))`` (see ``Fault``), and
rewrite the head of answers (``on_answer``: add the headers a real S3 sends and moto does not).
"""
from __future__ import annotations

import dataclasses
import fcntl
import random
import re
import select
import socket
import struct
import termios
import threading
import time
import urllib.parse
from collections.abc import Callable

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
                # an answer's head and body go out in two sends: without this, Nagle holds the
                # body until the head is acknowledged, and the peer delays that ACK (40 ms)
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


# ---------------------------------------------------------------------- HTTP-aware faults

FAULT_KINDS = ("403", "500", "503", "expired", "answer", "drop", "reset", "cut", "trickle", "hold")
INTERNAL_ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                       b'<Message>We encountered an internal error. Please try again.</Message></Error>')
EXPIRED_TOKEN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ExpiredToken</Code>'
                      b'<Message>The provided token has expired.</Message></Error>')
ACCESS_DENIED_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                      b'<Message>Access Denied</Message></Error>')
_ERROR_ANSWERS = {"403": (403, b"Forbidden", ACCESS_DENIED_BODY),
                  "500": (500, b"Internal Server Error", INTERNAL_ERROR_BODY),
                  "503": (503, b"Slow Down", SLOWDOWN_BODY),
                  "expired": (400, b"Bad Request", EXPIRED_TOKEN_BODY)}


@dataclasses.dataclass
class Fault:
    """One fault, injected into requests that ``when(method, path, headers)`` accepts (all
    when None; ``headers`` lowercased), each with probability ``rate`` (drawn from the proxy's
    seeded generator), at most ``count`` times (None: no limit).

    kinds:
    - ``403`` / ``500`` / ``503`` / ``expired``: answered AccessDenied / InternalError / SlowDown /
      400 ExpiredToken (S3's XML; a HEAD's answer without its body, as S3's), not forwarded.
    - ``answer``: answered ``status`` with S3's XML error ``code`` (no body when ``code`` is
      empty), not forwarded: an answer moto cannot give (409 RestoreAlreadyInProgress...).
    - ``drop``: forwarded (S3 acts on it), its answer read, then the connection reset before
      any byte of it reaches the client: "did my PUT happen?"
    - ``reset``: the answer's head and ``at`` of its body forwarded, then RST.
    - ``cut``: the answer's head and ``at`` of its body forwarded, then FIN: a body shorter
      than its Content-Length.
    - ``trickle``: the body forwarded ``piece`` bytes at a time, ``pause`` seconds apart.
    - ``hold``: forwarded, its answer never (``at`` None), or only its head and ``at`` of its
      body (a stalled body): the client's timeout decides.
    ``at``: a fraction of the body (float) or a number of bytes (int); at least one byte of the
    body is always kept back. Body faults apply only to answers with a Content-Length body;
    others pass untouched and are not counted. ``injected`` counts what was done."""

    kind: str
    rate: float = 1.0
    count: int | None = None
    when: Callable[[str, str, dict[str, str]], bool] | None = None
    at: float | int | None = 0.5
    piece: int = 16384
    pause: float = 0.005
    status: int = 0  # kind "answer"
    code: str = ""  # kind "answer"
    injected: int = 0
    _reserved: int = 0

    def __post_init__(self):
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}")

    @property
    def needs_body(self) -> bool:
        return self.kind in ("reset", "cut", "trickle") or (self.kind == "hold" and self.at is not None)

    def keep(self, length: int) -> int:
        """How many bytes of a body of ``length`` are forwarded before the fault."""
        n = int(length * self.at) if isinstance(self.at, float) else int(self.at or 0)
        return max(0, min(n, length - 1))


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request as the proxy saw it: ``headers`` with lowercased names."""

    method: str
    path: str
    headers: dict[str, str]

    @property
    def signed(self) -> bool:
        """Carries a signature or a session token (in its headers or its query string)."""
        return ("authorization" in self.headers or "x-amz-security-token" in self.headers
                or "X-Amz-Signature=" in self.path or "X-Amz-Credential=" in self.path)

    @property
    def direct(self) -> bool:
        """Sent by s3stashfs's direct GET/HEAD path (store/direct.py), not by botocore."""
        return self.headers.get("user-agent", "").startswith("s3stashfs (direct")

    def __iter__(self):  # method, path, headers = recorded
        return iter((self.method, self.path, self.headers))


class _Gone(Exception):
    """The connection ended: a peer closed it, or the proxy cut it (set_mode, close)."""


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name:
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _framing(headers: dict[str, str], bodiless: bool) -> tuple[str, int]:
    """How the message's body is delimited: ("length", n), ("chunked", 0) or ("close", 0)."""
    if bodiless:
        return "length", 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return "chunked", 0
    if "content-length" in headers:
        return "length", int(headers["content-length"])
    return "close", 0


def kind_of(method: str, path: str) -> str:
    """GET, HEAD, PUT... of a request, or LIST for a GET of a bucket's listing."""
    url = urllib.parse.urlsplit(path)
    if method == "GET" and (url.path.rstrip("/").count("/") <= 1 or "list-type=" in url.query):
        return "LIST"
    return method


class HttpProxy(TcpProxy):
    """``TcpProxy`` whose ``pass`` mode speaks HTTP/1.1, to inject ``Fault``s per request.

    ``inject(fault)`` adds a fault (the first one that accepts a request applies), ``clear()``
    removes them; ``injected`` counts all faults done by kind, ``requests`` every request seen
    as (method, path), and ``recorded`` (also ``seen``) every request as a ``Recorded`` (its
    headers too; it unpacks as ``method, path, headers``). Draws come from
    ``random.Random(seed)``, so a sequence of requests gets the same faults each run.

    It also serves as a forward proxy (``HTTP_PROXY``): a request for an absolute URL
    (``GET http://host/path``) goes to the same upstream, its path being the URL's path.

    ``regions`` (bucket -> region) makes it act as AWS does for a bucket in another region: a
    path-style request signed (SigV4 ``Credential`` scope) for another region is answered
    ``301 PermanentRedirect`` (HEAD, no body) or ``400 AuthorizationHeaderMalformed`` naming
    the region (``<Region>``), both with ``x-amz-bucket-region``; ``redirected`` counts them.

    ``delay`` (seconds) holds each request that long before it goes upstream, as a distant S3
    would (each connection has its own thread, so requests are delayed side by side).
    ``in_flight`` counts the requests between their head arriving and their answer sent, by
    kind (``kind_of``: GET, HEAD, LIST, PUT...) and in all ("all"); ``peak`` is the most seen
    at once of each since ``reset_peak()``."""

    def __init__(self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1",
                 seed: int = 0):
        self.faults: list[Fault] = []
        self.injected: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.recorded: list[Recorded] = []
        # (method, path, answer head) -> the head to send instead; bodies are left alone
        self.on_answer: Callable[[str, str, bytes], bytes] | None = None
        self.regions: dict[str, str] = {}
        self.redirected = 0
        self.delay = 0.0
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._rng = random.Random(seed)
        super().__init__(upstream_host, upstream_port, host)

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = dict(self.in_flight)

    def _begin(self, kind: str) -> None:
        with self._lock:
            for k in (kind, "all"):
                n = self.in_flight[k] = self.in_flight.get(k, 0) + 1
                self.peak[k] = max(self.peak.get(k, 0), n)

    def _end(self, kind: str) -> None:
        with self._lock:
            for k in (kind, "all"):
                self.in_flight[k] -= 1

    def inject(self, fault: Fault | None = None, **kwargs) -> Fault:
        """Add ``fault`` (or ``Fault(**kwargs)``); returns it, to read its ``injected``."""
        fault = fault or Fault(**kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self, seed: int | None = None) -> None:
        with self._lock:
            self.faults = []
            if seed is not None:
                self._rng = random.Random(seed)

    # ------------------------------------------------------------------ choosing
    @property
    def seen(self) -> list[Recorded]:
        return self.recorded

    def _wrong_region(self, method: str, path: str, headers: dict[str, str]) -> bytes | None:
        """AWS's answer to a request signed for a region its bucket is not in, or None."""
        bucket = urllib.parse.urlsplit(path).path.lstrip("/").split("/", 1)[0]
        region = self.regions.get(urllib.parse.unquote(bucket))
        m = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/", headers.get("authorization", ""))
        if region is None or m is None or m.group(1) == region:
            return None
        with self._lock:
            self.redirected += 1
        if method == "HEAD":
            return (b"HTTP/1.1 301 Moved Permanently\r\nx-amz-bucket-region: %s\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n" % region.encode())
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AuthorizationHeaderMalformed'
                b'</Code><Message>The authorization header is malformed; the region \'%s\' is '
                b'wrong; expecting \'%s\'</Message><Region>%s</Region></Error>'
                % (m.group(1).encode(), region.encode(), region.encode()))
        return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/xml\r\n"
                b"x-amz-bucket-region: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (region.encode(), len(body)) + body)

    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.requests.append((method, path))
            self.recorded.append(Recorded(method, path, dict(headers)))

    def _choose(self, method: str, path: str, headers: dict[str, str]) -> Fault | None:
        self._record(method, path, headers)
        with self._lock:
            for f in self.faults:
                if f.when is not None and not f.when(method, path, headers):
                    continue
                if f.count is not None and f.injected + f._reserved >= f.count:
                    continue
                if self._rng.random() >= f.rate:
                    continue
                f._reserved += 1
                return f
        return None

    def _settle(self, fault: Fault, done: bool) -> None:
        with self._lock:
            fault._reserved -= 1
            if done:
                fault.injected += 1
                self.injected[fault.kind] = self.injected.get(fault.kind, 0) + 1

    # ------------------------------------------------------------------ the exchange
    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Requests and answers one after another on one connection (keep-alive), each
        forwarded whole unless a fault is chosen for it; the TCP modes still apply."""
        link = _Link(self, client, upstream)
        try:
            while link.exchange():
                pass
        except (_Gone, OSError, ValueError, IndexError):  # ended, cut, or not HTTP after all
            pass
        finally:
            self._done((client, upstream))


class _Link:
    """One client connection and its upstream one, with what was read ahead on each."""

    def __init__(self, proxy: HttpProxy, client: socket.socket, upstream: socket.socket):
        self.p = proxy
        self.client, self.upstream = client, upstream
        self.conn = (client, upstream)
        self.buf = {client: b"", upstream: b""}

    # -- reading and writing, under the proxy's modes
    def _alive(self) -> None:
        if self.p._closed:
            raise _Gone()
        with self.p._lock:
            if self.conn not in self.p._conns:
                raise _Gone()  # cut by set_mode

    def _wait_open(self) -> None:
        """While black-holed: forward nothing, until the mode changes or the link is cut."""
        self._alive()
        while self.p.mode == "blackhole":
            time.sleep(0.05)
            self._alive()

    def recv(self, s: socket.socket) -> bytes:
        """Some bytes from ``s``; _Gone at its end."""
        while True:
            self._wait_open()
            if self.buf[s]:
                data, self.buf[s] = self.buf[s], b""
                return data
            ready, _, _ = select.select([s], [], [], 0.1)
            if ready:
                data = s.recv(65536)
                if not data:
                    raise _Gone()
                return data

    def read_head(self, s: socket.socket) -> bytes | None:
        """One message head (through the blank line); None if ``s`` ended before any byte."""
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                data += self.recv(s)
            except _Gone:
                if data:
                    raise
                return None
        head, _, rest = data.partition(b"\r\n\r\n")
        self.buf[s] = rest + self.buf[s]
        return head + b"\r\n\r\n"

    def send(self, s: socket.socket, data: bytes) -> bool:
        """Forward ``data`` to ``s``; answers (to the client) spend the ``blackhole_after``
        budget. False when the budget ran out (what is left of the answer is dropped)."""
        self._wait_open()
        whole = True
        if s is self.client and self.p._budget is not None:
            with self.p._lock:
                if self.p._budget is not None:
                    whole = len(data) <= self.p._budget
                    data = data[:self.p._budget]
                    self.p._budget -= len(data)
                    if not self.p._budget:
                        self.p._budget, self.p.mode = None, "blackhole"
        if data:
            s.sendall(data)
        return whole

    def relay(self, src: socket.socket, dst: socket.socket | None, framing: tuple[str, int],
              limit: int | None = None, piece: int = 65536, pause: float = 0.0) -> bool:
        """Forward a body from ``src`` to ``dst`` (None: read and drop it), or only its first
        ``limit`` bytes. False when it could not all be forwarded (the end of ``src`` for a
        close-delimited body counts as its end)."""
        kind, n = framing
        if kind == "chunked":
            return self._relay_chunked(src, dst)
        left = n if kind == "length" else None
        sent = 0
        while left is None or left > 0:
            if limit is not None and sent >= limit:
                return True
            try:
                data = self.recv(src)
            except _Gone:
                if left is None:
                    return True
                raise
            if left is not None and len(data) > left:
                self.buf[src] = data[left:] + self.buf[src]
                data = data[:left]
            if limit is not None and sent + len(data) > limit:
                self.buf[src] = data[limit - sent:] + self.buf[src]
                data = data[:limit - sent]
            for i in range(0, len(data), piece):
                if dst is not None and not self.send(dst, data[i:i + piece]):
                    return False
                if pause:
                    time.sleep(pause)
            sent += len(data)
            if left is not None:
                left -= len(data)
        return True

    def _relay_chunked(self, src: socket.socket, dst: socket.socket | None) -> bool:
        def line() -> bytes:
            data = b""
            while b"\r\n" not in data:
                data += self.recv(src)
            first, _, rest = data.partition(b"\r\n")
            self.buf[src] = rest + self.buf[src]
            return first + b"\r\n"

        def forward(data: bytes) -> bool:
            return dst is None or self.send(dst, data)
        while True:
            size_line = line()
            if not forward(size_line):
                return False
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    t = line()
                    if not forward(t):
                        return False
                    if t == b"\r\n":
                        return True
            if not self.relay(src, dst, ("length", size + 2)):
                return False

    # -- one request and its answer
    def exchange(self) -> bool:
        """Forward one request and its answer, or break them as a fault says. True when the
        connection may carry another request."""
        head = self.read_head(self.client)
        if head is None:
            return False
        method, path = head.split(b" ", 2)[:2]
        method, path = method.decode("latin-1"), path.decode("latin-1")
        kind = kind_of(method, path)
        self.p._begin(kind)
        try:
            if self.p.delay:
                time.sleep(self.p.delay)
            return self._exchange(head, method, path)
        finally:
            self.p._end(kind)

    def _exchange(self, head: bytes, method: str, path: str) -> bool:
        req = _headers(head)
        req_framing = _framing(req, bodiless=False)
        if req_framing[0] == "close":
            req_framing = ("length", 0)  # a request without a length has no body
        expect = req.get("expect", "").lower() == "100-continue"
        redirect = self.p._wrong_region(method, path, req) if self.p.regions else None
        if redirect is not None:
            self.p._record(method, path, req)
            if not expect:
                self.relay(self.client, None, req_framing)
            self.send(self.client, redirect)
            return False
        fault = self.p._choose(method, path, req)
        if fault is not None and (fault.kind in _ERROR_ANSWERS or fault.kind == "answer"):
            if not expect:
                self.relay(self.client, None, req_framing)
            self._answer_error(fault, method)
            return False
        self.send(self.upstream, head)
        closing = "close" in req.get("connection", "").lower()
        answer = None
        if expect:
            answer = self.read_head(self.upstream)
            if answer is None:
                raise _Gone()
            if _status(answer) == 100:
                self.send(self.client, answer)
                answer = None
            else:
                closing = True  # the client may send the body or not: this connection is done
        if answer is None:
            self.relay(self.client, self.upstream, req_framing)
        while answer is None or 100 <= _status(answer) < 200:
            if answer is not None:
                self.send(self.client, answer)  # another interim answer
            answer = self.read_head(self.upstream)
            if answer is None:
                raise _Gone()
        if self.p.on_answer is not None:
            answer = self.p.on_answer(method, path, answer)
        status, res = _status(answer), _headers(answer)
        framing = _framing(res, bodiless=method == "HEAD" or status in (204, 304))
        closing = closing or "close" in res.get("connection", "").lower() or framing[0] == "close"
        if fault is not None:
            applies = not fault.needs_body or (framing[0] == "length" and framing[1] > 0)
            self.p._settle(fault, applies)
            if applies:
                return self._break(fault, answer, framing)
        if not self.send(self.client, answer):
            self._wait_cut()
        if not self.relay(self.upstream, self.client, framing):
            self._wait_cut()
        return not closing

    def _answer_error(self, fault: Fault, method: str) -> None:
        if fault.kind == "answer":
            code, reason = fault.status, b"Fault"
            body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>%s</Code><Message>'
                    b'injected by the test proxy</Message></Error>' % fault.code.encode()
                    if fault.code else b"")
        else:
            code, reason, body = _ERROR_ANSWERS[fault.kind]
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/xml\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n" % (code, reason, len(body)))
        self.p._settle(fault, True)  # counted before the client can see it
        self.send(self.client, head + (b"" if method == "HEAD" else body))

    def _break(self, fault: Fault, answer: bytes, framing: tuple[str, int]) -> bool:
        kind = fault.kind
        if kind == "drop":
            self._reset_client()
            return False
        if kind == "hold" and fault.at is None:
            self._wait_cut()
        self.send(self.client, answer)
        if kind == "trickle":
            self.relay(self.upstream, self.client, framing, piece=fault.piece, pause=fault.pause)
            return False  # the upstream answer said close, or we say so: keep it simple
        self.relay(self.upstream, self.client, framing, limit=fault.keep(framing[1]))
        if kind == "hold":
            self._wait_cut()
        _drain_sent(self.client)
        if kind == "reset":
            self._reset_client()
        else:  # cut: FIN, the client sees the body end early
            self.client.shutdown(socket.SHUT_WR)
        return False

    def _reset_client(self) -> None:
        _reset(self.client)
        raise _Gone()

    def _wait_cut(self) -> None:
        """Forward nothing more; wait until the client gives up (closes) or the link is cut."""
        while True:
            self._alive()
            ready, _, _ = select.select([self.client], [], [], 0.1)
            if ready and not self.client.recv(65536):
                raise _Gone()


def _drain_sent(sock: socket.socket, timeout: float = 5.0) -> None:
    """Wait until the kernel has handed what was sent on ``sock`` to the peer: a reset right
    after would otherwise throw it away, and the client would see no answer at all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        if not left:
            return
        time.sleep(0.005)
