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
                await store.fetch_range("b", "k", etag, 0, size, fd, progress.append)
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
    (bexc.NoCredentialsError(), errors.Denied),
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
    from s3stashfs import store as store_module
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
