"""Unit tests of the store's verification and error classification, with a stand-in client
(the real client is exercised by every mount test against moto_server)."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import threading
import time

import botocore.exceptions as bexc
import pytest
import trio
import urllib3.exceptions as uexc

from s3stashfs import config, errors
from s3stashfs.store import Store, _classify, parse_meta_mtime


class Body(io.BytesIO):
    pass


pytestmark = pytest.mark.usefixtures("static_keys")


class FakeClient:
    def __init__(self, data: bytes, etag: str):
        self.data, self.etag = data, etag
        self.calls = []

    extra: dict = {}

    def get_object(self, **kw):
        self.calls.append(kw)
        data, extra = self.data, {}
        if "Range" in kw:  # as S3 answers a ranged GET: 206 with Content-Range
            a, b = kw["Range"].removeprefix("bytes=").split("-")
            data = data[int(a):int(b) + 1]
            extra["ContentRange"] = f"bytes {a}-{int(a) + len(data) - 1}/{len(self.data)}"
        return {"ETag": f'"{self.etag}"', "Body": Body(data), "ContentLength": len(data),
                **extra, **self.extra}


def make_store(tmp_path, client):
    s = Store(config.load({}, {"HOME": str(tmp_path)}))
    s._clients = dict.fromkeys(s._clients, client)
    s._direct.enabled = False  # the stand-in client answers everything
    return s


def run_fetch(store, tmp_path, etag, size, whole=True):
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    progress = []
    try:
        async def go():
            if whole:
                await store.fetch_whole("b", "k", etag, size, fd, progress.append)
            else:
                await store.fetch_range("b", "k", etag, 0, size, fd,
                                        lambda pos, piece: progress.append(pos))
        trio.run(go)
        return os.pread(fd, size, 0), progress
    finally:
        os.close(fd)


def test_whole_fetch_verifies_md5(tmp_path):
    data = os.urandom(5000)
    etag = hashlib.md5(data).hexdigest()
    got, progress = run_fetch(make_store(tmp_path, FakeClient(data, etag)), tmp_path, etag, len(data))
    assert got == data and progress == [len(data)]


def test_whole_fetch_with_corrupt_bytes_is_never_reported_present(tmp_path):
    data = os.urandom(5000)
    etag = hashlib.md5(data).hexdigest()
    corrupt = bytearray(data)
    corrupt[1234] ^= 0xFF
    store = make_store(tmp_path, FakeClient(bytes(corrupt), etag))
    with pytest.raises(errors.ChecksumMismatch):
        run_fetch(store, tmp_path, etag, len(data))


def test_every_get_is_pinned_by_if_match(tmp_path):
    data = os.urandom(3000)
    client = FakeClient(data, "abc-2")
    got, _ = run_fetch(make_store(tmp_path, client), tmp_path, "abc-2", 1000, whole=False)
    assert got == data[:1000]
    assert client.calls[0]["IfMatch"] == '"abc-2"' and client.calls[0]["Range"] == "bytes=0-999"


def test_a_response_of_another_version_is_refused(tmp_path):
    data = os.urandom(3000)
    store = make_store(tmp_path, FakeClient(data, "other-1"))
    with pytest.raises(errors.Changed):
        run_fetch(store, tmp_path, "mine-1", 1000, whole=False)


def client_error(code, status):
    return bexc.ClientError({"Error": {"Code": code, "Message": "m"},
                             "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc,cls", [
    (client_error("NoSuchKey", 404), errors.NotFound),
    (client_error("404", 404), errors.NotFound),
    (client_error("PreconditionFailed", 412), errors.Changed),
    (client_error("AccessDenied", 403), errors.Denied),
    (client_error("SlowDown", 503), errors.Throttled),
    (client_error("InternalError", 500), errors.Throttled),
    (client_error("InvalidArgument", 400), errors.StoreError),
    (bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), errors.Unreachable),
    (bexc.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), errors.Unreachable),
    (bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), errors.Unreachable),
    (ConnectionResetError(104, "reset"), errors.Unreachable),
    (bexc.NoCredentialsError(), errors.CredentialsFailed),  # a Denied: EACCES
    (client_error("ExpiredToken", 400), errors.CredentialsFailed),
])
def test_classification(exc, cls):
    assert type(_classify(exc, "op")) is cls


def dns_error():
    return uexc.NameResolutionError("s3.example.invalid", None,
                                    socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


# (exception, retried quickly before going offline): built by hand where a live test cannot
# make them (DNS: no real name is resolved in the tests)
@pytest.mark.parametrize("exc,retry", [
    # refused, reset, closed mid-answer: at once, so worth two quick retries
    (bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
    (uexc.NewConnectionError(None, "Connection refused"), True),
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (uexc.ProtocolError("Connection aborted.", ConnectionResetError(errno.ECONNRESET, "reset")), True),
    (bexc.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), True),
    (OSError(errno.ENETUNREACH, "Network is unreachable"), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True),
    # timeouts: the wait is spent already
    (bexc.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), False),
    (bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), False),
    (uexc.ConnectTimeoutError(None, "timed out"), False),
    (uexc.ReadTimeoutError(None, "http://127.0.0.1:1/b/k", "Read timed out."), False),
    (TimeoutError("timed out"), False),
    # DNS failure, raw, from urllib3 and from botocore: the resolver has retried already
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
    (dns_error(), False),
    (bexc.EndpointConnectionError(endpoint_url="http://s3.example.invalid", error=dns_error()), False),
])
def test_network_failures_are_unreachable(exc, retry):
    e = _classify(exc, "op")
    assert type(e) is errors.Unreachable and e.retry is retry
    assert errors.errno_for(e) == errno.ENETUNREACH


@pytest.mark.parametrize("code,status", [
    ("SlowDown", 503), ("503", 503), ("TooManyRequests", 429), ("429", 429),
    ("RequestLimitExceeded", 503),
])
def test_throttling_is_not_unreachable(code, status):
    assert type(_classify(client_error(code, status), "op")) is errors.Throttled


def test_a_local_disk_error_is_not_s3s_fault():
    with pytest.raises(OSError) as e:
        _classify(OSError(errno.ENOSPC, "No space left on device"), "op")
    assert e.value.errno == errno.ENOSPC


def test_timeouts_by_kind_of_call(tmp_path):
    """Defaults, and one setting scaling them all; each botocore client has its own."""
    st = Store(config.load({}, {"HOME": str(tmp_path)}))
    t = st.timeouts
    assert (t.connect, t.meta, t.data, t.write) == (2.0, 5.0, 10.0, 30.0)
    assert {k: c.meta.config.read_timeout for k, c in st._clients.items()} == \
        {"meta": 5.0, "data": 10.0, "write": 30.0}
    assert all(c.meta.config.connect_timeout == 2.0 for c in st._clients.values())
    t = Store(config.load({}, {"HOME": str(tmp_path), "S3STASHFS_TIMEOUT": "10"})).timeouts
    assert (t.connect, t.meta, t.data, t.write) == (4.0, 10.0, 20.0, 60.0)


def run_calls(tmp_path, fails):
    """``_run`` on a call that raises ``fails`` every time: how often was it made, is the
    store offline after?"""
    st = make_store(tmp_path, None)
    calls = []

    def call():
        calls.append(1)
        raise _classify(fails, "op")

    async def go():
        with pytest.raises(errors.Unreachable):
            await st._run("op", st._meta, call)
    trio.run(go)
    return len(calls), st.connectivity.online


def test_refused_is_retried_twice_then_offline(tmp_path):
    assert run_calls(tmp_path, ConnectionRefusedError(errno.ECONNREFUSED, "x")) == (3, False)


def test_a_timeout_goes_offline_without_retrying(tmp_path):
    assert run_calls(tmp_path, bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1")) == (1, False)


def test_a_metadata_call_stops_waiting_when_another_finds_s3_unreachable(tmp_path):
    st = make_store(tmp_path, None)
    release = threading.Event()
    started = threading.Event()
    took = []

    def hung():  # a HEAD on a hung server: only its own timeout would end it
        started.set()
        release.wait(30)
        return "late"

    def times_out():
        assert started.wait(10)  # the HEAD is waiting on S3 before this call finds it hung
        raise _classify(bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "op")

    async def waiter():
        t = time.monotonic()
        with pytest.raises(errors.Unreachable):
            await st._run("HEAD", st._meta, hung, abandon=True)
        took.append(time.monotonic() - t)

    async def go():
        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            with pytest.raises(errors.Unreachable):
                await st._run("GET", st._data, times_out)
        with pytest.raises(errors.Unreachable, match="offline since"):  # and new calls at once
            await st._run("HEAD", st._meta, hung, abandon=True)
    try:
        trio.run(go)
    finally:
        release.set()
    assert not st.connectivity.online and took and took[0] < 2


def test_errno_mapping_is_in_one_place():
    import errno
    assert errors.errno_for(errors.Unreachable("x")) == errno.ENETUNREACH
    assert errors.errno_for(errors.NotFound("x")) == errno.ENOENT
    assert errors.errno_for(errors.ReadOnly("x")) == errno.EROFS
    assert errors.errno_for(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert errors.errno_for(ValueError("bug")) == errno.EIO


@pytest.mark.parametrize("value,ns", [
    ("1600000000", 1600000000 * 10**9),
    ("1600000000.5", 1600000000 * 10**9 + 500_000_000),
    ("garbage", None), ("", None), (None, None),
])
def test_meta_mtime(value, ns):
    assert parse_meta_mtime(value) == ns


def crc32_b64(data: bytes) -> str:
    import base64
    import zlib
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def test_whole_fetch_checks_s3_crc32(tmp_path):
    data = os.urandom(5000)
    client = FakeClient(data, "abc-2")  # a multipart ETag: no MD5 to check, the CRC32 decides
    client.extra = {"ChecksumCRC32": crc32_b64(data)}
    got, _ = run_fetch(make_store(tmp_path, client), tmp_path, "abc-2", len(data))
    assert got == data
    client.extra = {"ChecksumCRC32": crc32_b64(data + b"x")}
    with pytest.raises(errors.ChecksumMismatch, match="CRC32"):
        run_fetch(make_store(tmp_path, client), tmp_path, "abc-2", len(data))


def test_copy_above_the_copyobject_limit_uses_part_copies(moto_server, s3, bucket, monkeypatch, tmp_path):
    """The multipart copy path (objects over 5 GiB), with the limit lowered to test it against
    the real server: every part copied, the metadata kept, the bytes equal."""
    import helpers
    from s3stashfs.store import transfer as store_module
    data = helpers.random_bytes(12 * 1024 * 1024 + 5, seed=21)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=data, Metadata={"project": "x"})
    etag = s3.head_object(Bucket=bucket, Key="big.bin")["ETag"].strip('"')
    monkeypatch.setattr(store_module, "COPY_MAX", 1024 * 1024)
    env = {"HOME": str(tmp_path), "S3STASHFS_ENDPOINT_URL": moto_server.url}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    st = Store(config.load({}, env))

    async def go():
        return await st.copy(bucket, "big.bin", "copy.bin", etag, len(data), 5 * 1024 * 1024)
    new_etag = trio.run(go)
    assert new_etag.endswith("-3")
    assert s3.get_object(Bucket=bucket, Key="copy.bin")["Body"].read() == data
    assert s3.head_object(Bucket=bucket, Key="copy.bin")["Metadata"] == {"project": "x"}


# ------------------------------------------------------------------ faults of a server that answers
def body_errors():
    cut = uexc.IncompleteRead(1000, 2000)
    return [
        (uexc.ProtocolError("Connection broken: IncompleteRead", cut), False),
        (uexc.ProtocolError("Connection broken: reset", ConnectionResetError(errno.ECONNRESET, "x")), False),
        (bexc.ResponseStreamingError(error="Connection broken: IncompleteRead"), False),
        (bexc.IncompleteReadError(actual_bytes=10, expected_bytes=20), False),
        (ConnectionResetError(errno.ECONNRESET, "reset"), False),
        (uexc.ReadTimeoutError(None, None, "Read timed out."), True),  # stalled past the timeout
        (bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True),
    ]


@pytest.mark.parametrize("exc,stalled", body_errors())
def test_a_body_broken_off_after_the_status_line_is_interrupted_not_unreachable(exc, stalled):
    e = _classify(exc, "op", answered=True)
    assert type(e) is errors.Interrupted and e.stalled is stalled
    assert errors.errno_for(e) == errno.EIO


def test_botocore_errors_are_told_apart_by_where_urllib3_raised_them():
    """botocore wraps a failure reading a listing's body like a failure to connect; the wrapped
    urllib3 error says where it came from."""
    from s3stashfs.store import _botocore_answered

    def raised_in_response_module():
        ns = {"__name__": "urllib3.response", "uexc": uexc}
        exec("def read():\n    raise uexc.ProtocolError('Connection broken: IncompleteRead')", ns)
        try:
            ns["read"]()
        except uexc.ProtocolError as e:
            return e

    def raised_here():
        try:
            raise uexc.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        except uexc.ProtocolError as e:
            return e
    body = bexc.ConnectionClosedError(endpoint_url="u", error=raised_in_response_module())
    before = bexc.ConnectionClosedError(endpoint_url="u", error=raised_here())
    assert _botocore_answered(body) and not _botocore_answered(before)
    assert _botocore_answered(bexc.ResponseStreamingError(error="x"))
    assert not _botocore_answered(bexc.EndpointConnectionError(endpoint_url="u"))


def run_tries(tmp_path, fails):
    """``_run`` on a call that raises ``fails`` every time: the error, how often the call was
    made, and whether the store is still online."""
    st = make_store(tmp_path, None)
    calls = []

    def call():
        calls.append(1)
        raise fails

    async def go():
        with pytest.raises(errors.S3StashError) as e:
            await st._run("op", st._meta, call)
        return e.value
    return trio.run(go), len(calls), st.connectivity.online


@pytest.mark.parametrize("fails,tries", [
    (errors.Interrupted("cut short"), 5),
    (errors.Throttled("503 SlowDown"), 5),
    (errors.Interrupted("stalled", stalled=True), 2),  # each try waited out the data timeout
])
def test_a_server_that_answers_is_retried_then_fails_that_call_alone(tmp_path, fails, tries):
    e, n, online = run_tries(tmp_path, fails)
    assert (type(e), n, online) == (type(fails), tries, True)


class BrokenBody(io.BytesIO):
    """A body that breaks off (urllib3's IncompleteRead, as on a connection closed early)
    after ``upto`` bytes."""

    def __init__(self, data: bytes, upto: int):
        super().__init__(data[:upto])
        self.want = len(data)

    def read(self, n=-1):
        b = super().read(n)
        if not b:
            raise uexc.ProtocolError("Connection broken: IncompleteRead",
                                     uexc.IncompleteRead(self.tell(), self.want - self.tell()))
        return b


def test_a_ranged_get_broken_off_resumes_where_it_got_to(tmp_path):
    data = os.urandom(5 << 20)
    client = FakeClient(data, "abc-2")
    breaks = [3 << 20, 1 << 20]  # the first answer breaks off after 3 MiB, the second after 1

    def get_object(**kw):
        r = FakeClient.get_object(client, **kw)
        if breaks:
            body = r["Body"].getvalue()
            r["Body"] = BrokenBody(body, breaks.pop(0))
        return r
    client.get_object = get_object
    store = make_store(tmp_path, client)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    seen = []

    def progress(pos, piece=b""):  # never more than is written
        assert os.fstat(fd).st_size >= pos and os.pread(fd, pos, 0) == data[:pos]
        seen.append(pos)
    try:
        trio.run(store.fetch_range, "b", "k", "abc-2", 0, len(data), fd, progress)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert [c["Range"] for c in client.calls] == [
        f"bytes=0-{len(data) - 1}", f"bytes={3 << 20}-{len(data) - 1}",
        f"bytes={4 << 20}-{len(data) - 1}"]
    assert all(c["IfMatch"] == '"abc-2"' for c in client.calls)
    assert seen == sorted(seen) and seen[-1] == len(data)


def test_a_ranged_answer_for_other_bytes_is_refused(tmp_path):
    data = os.urandom(3000)
    client = FakeClient(data, "abc-2")
    client.extra = {"ContentRange": "bytes 0-999/3000"}  # a server that ignored the offset
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(errors.StoreError, match="to a GET of bytes=1000-1999"):
            trio.run(make_store(tmp_path, client).fetch_range, "b", "k", "abc-2", 1000, 2000,
                     fd, lambda pos: None)
        assert os.fstat(fd).st_size == 0  # nothing written
    finally:
        os.close(fd)


class PutClient:
    """S3 for put_object / head_object: ``lose`` answers are lost (the PUT is done, then the
    connection is reset before the status line); conditions are checked like S3."""

    def __init__(self, lose: int = 0):
        self.lose = lose
        self.objects: dict[str, tuple[str, dict]] = {}
        self.puts = 0

    def put_object(self, Key, Body, Metadata, IfNoneMatch=None, IfMatch=None, **kw):
        self.puts += 1
        have = self.objects.get(Key)
        if (IfNoneMatch == "*" and have) or (IfMatch and (not have or f'"{have[0]}"' != IfMatch)):
            raise client_error("PreconditionFailed", 412)
        etag = hashlib.md5(Body).hexdigest()
        self.objects[Key] = (etag, dict(Metadata))
        if self.lose:
            self.lose -= 1
            raise bexc.ConnectionClosedError(endpoint_url="http://127.0.0.1:1")
        return {"ETag": f'"{etag}"'}

    def head_object(self, Key, **kw):
        if Key not in self.objects:
            raise client_error("404", 404)
        etag, meta = self.objects[Key]
        return {"ETag": f'"{etag}"', "ContentLength": 1, "Metadata": meta}


def run_put(tmp_path, client, data, base):
    store = make_store(tmp_path, client)
    (tmp_path / "up").write_bytes(data)
    fd = os.open(tmp_path / "up", os.O_RDONLY)
    try:
        return trio.run(store.put_file, "b", "k", fd, len(data), {"mtime": "12"}, base)
    finally:
        os.close(fd)


@pytest.mark.parametrize("base", ["", "old"])  # a new file (If-None-Match: *), a change (If-Match)
def test_a_put_whose_answer_was_lost_is_no_conflict_on_retry(tmp_path, base):
    client = PutClient(lose=1)
    if base:
        client.objects["k"] = ("old", {})
    data = b"new bytes\n"
    assert run_put(tmp_path, client, data, base) == hashlib.md5(data).hexdigest()
    assert client.puts == 2  # the retry met its own success (412), found by a HEAD


def test_a_put_that_meets_someone_elses_version_is_a_conflict(tmp_path):
    client = PutClient()
    client.objects["k"] = (hashlib.md5(b"theirs").hexdigest(), {"mtime": "12"})
    with pytest.raises(errors.Conflict):
        run_put(tmp_path, client, b"mine", "")
    client.objects["k"] = (hashlib.md5(b"mine").hexdigest(), {"mtime": "99"})  # same bytes,
    with pytest.raises(errors.Conflict):  # another writer's metadata: not ours either
        run_put(tmp_path, client, b"mine", "")


# ------------------------------------------------------------------ back online on demand
def test_an_on_demand_probe_is_shared_bounded_and_not_repeated_within_a_second():
    from trio.testing import MockClock

    from s3stashfs.connectivity import RECHECK_AFTER, Connectivity
    conn = Connectivity()
    probes = []
    answer = {"up": False}

    async def probe():
        probes.append(trio.current_time())
        if answer["up"]:
            return True
        await trio.sleep_forever()  # a hung server: only the bound ends it

    async def go():
        conn.unreachable("test")
        results = []

        async def request():
            t = trio.current_time()
            results.append((await conn.recheck(probe, 2.0), trio.current_time() - t))
        await trio.sleep(RECHECK_AFTER + 0.1)
        async with trio.open_nursery() as n:  # a burst of 20 requests: one probe, 2 s
            for _ in range(20):
                n.start_soon(request)
        assert len(probes) == 1 and len(results) == 20
        assert all(not ok and took == pytest.approx(2.0) for ok, took in results)
        assert not await conn.recheck(probe, 2.0)  # just failed: no new probe, at once
        assert len(probes) == 1
        answer["up"] = True
        await trio.sleep(RECHECK_AFTER + 0.1)
        assert await conn.recheck(probe, 2.0) and conn.online and len(probes) == 2
    trio.run(go, clock=MockClock(autojump_threshold=0))


def test_a_call_while_offline_probes_and_proceeds_when_s3_answers(tmp_path):
    st = make_store(tmp_path, None)
    probed = []

    async def probe(bucket, limiter=None):
        probed.append(bucket)
        return True
    st.probe = probe

    async def go():
        st.connectivity.unreachable("test")
        await trio.sleep(1.1)  # the last probe (going offline) is more than a second old
        return await st._run("op", st._meta, lambda: "answered")
    assert trio.run(go) == "answered" and st.connectivity.online and len(probed) == 1
