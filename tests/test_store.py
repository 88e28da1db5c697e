"""Unit tests of the store's verification and error classification, with a stand-in client
(the real client is exercised by every mount test against moto_server)."""
from __future__ import annotations

import hashlib
import io
import os

import botocore.exceptions as bexc
import pytest
import trio

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
        data = self.data
        if "Range" in kw:
            a, b = kw["Range"].removeprefix("bytes=").split("-")
            data = data[int(a):int(b) + 1]
        return {"ETag": f'"{self.etag}"', "Body": Body(data), **self.extra}


def make_store(tmp_path, client):
    s = Store(config.load({}, {"HOME": str(tmp_path)}))
    s._client = client
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
