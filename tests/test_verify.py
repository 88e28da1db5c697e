"""Multipart objects verified end to end (verify.py, checksums.py): the sums computed here
against moto's, what S3 says about parts, and the check of cached bytes against it, with real
objects in moto and a real cache file that the tests damage on purpose. Through a real mount:
test_verify_mount.py."""
from __future__ import annotations

import base64
import hashlib
import os

import pytest
import trio

import helpers
from helpers import MiB
from s3stashfs import checksums, config
from s3stashfs.cache import BLOCK_SIZE, Cache
from s3stashfs.store import ObjectInfo, PartsInfo, Store
from s3stashfs.verify import Verifier

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("static_keys")]

SIZE = 20 * MiB + 777  # three parts of 8 MiB: 8, 8, 4 MiB + 777
PART = 8 * MiB


def upload(s3, bucket, key, data, algo=None, part_size=PART) -> str:
    return helpers.put_multipart_with_checksums(s3, bucket, key, data, part_size, algo)


# ------------------------------------------------------------------ the sums themselves
def test_multipart_etag_of_20_mib_in_8_mib_parts(s3, bucket):
    data = helpers.random_bytes(20 * MiB, seed="etag")
    p1, p2, p3 = data[:8 * MiB], data[8 * MiB:16 * MiB], data[16 * MiB:]
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in (p1, p2, p3))).hexdigest() + "-3"
    got = checksums.multipart_etag([hashlib.md5(p).digest() for p in (p1, p2, p3)])
    assert got == want
    assert upload(s3, bucket, "mp.bin", data) == want  # and it is what S3 (moto) makes
    assert checksums.etag_parts(want) == 3 and checksums.etag_parts(want[:32]) is None


def test_candidate_part_sizes():
    # 20 MiB in 3 parts: 8 MiB (boto3's, the AWS CLI's) and nothing that would make 2 or 4 parts
    assert checksums.candidate_part_sizes(20 * MiB, 3)[0] == 8 * MiB
    for size, n in ((20 * MiB, 3), (12 * MiB + 777, 3), (100 << 30, 6400), (7 * MiB, 2)):
        got = checksums.candidate_part_sizes(size, n)
        assert got and all(-(-size // p) == n for p in got), (size, n, got)
    assert 5 * MiB not in checksums.candidate_part_sizes(20 * MiB, 3)  # 4 parts
    assert checksums.candidate_part_sizes(12 * MiB + 777, 3) == [5 * MiB, 6 * MiB]
    # s3transfer doubles 8 MiB until a file needs at most 10,000 parts: 100 GiB -> 16 MiB
    assert 16 * MiB in checksums.candidate_part_sizes(100 << 30, 6400)
    assert checksums.candidate_part_sizes(3 * MiB, 1) == [3 * MiB]  # any size gives -1
    assert checksums.candidate_part_sizes(10 * MiB, 20) == []  # no plausible part size
    assert len(checksums.candidate_part_sizes(64 * MiB, 2)) <= checksums.MAX_PART_SIZE_TRIES


@pytest.mark.parametrize("algo", ["CRC32C", "CRC32", "SHA256"])
def test_composite_checksum_is_the_one_s3_makes(s3, bucket, algo):
    data = helpers.random_bytes(SIZE, seed=algo)
    upload(s3, bucket, "c.bin", data, algo)
    a = s3.get_object_attributes(Bucket=bucket, Key="c.bin", ObjectAttributes=["Checksum"])
    assert a["Checksum"]["ChecksumType"] == "COMPOSITE"
    digests = []
    for s, e in checksums.uniform_parts(SIZE, PART):
        d = checksums.new_digest(algo)
        d.update(data[s:e])
        digests.append(d.digest())
    assert checksums.composite(algo, digests) == a["Checksum"][f"Checksum{algo}"]


def test_full_object_crc64nvme_is_the_one_s3_makes(s3, bucket):
    data = helpers.random_bytes(SIZE, seed="crc64")
    upload(s3, bucket, "f.bin", data, "CRC64NVME")
    h = s3.get_object(Bucket=bucket, Key="f.bin", ChecksumMode="ENABLED")
    h["Body"].read()
    assert h["ChecksumType"] == "FULL_OBJECT"
    d = checksums.new_digest("CRC64NVME")
    assert d is not None, "awscrt is a dependency: CRC64NVME must be computable"
    for i in range(0, SIZE, 3 * MiB + 1):  # in pieces, as from a file
        d.update(data[i:i + 3 * MiB + 1])
    assert checksums.b64(d.digest()) == h["ChecksumCRC64NVME"]
    c = checksums.new_digest("CRC32C")
    c.update(b"123456789")
    assert c.digest() == (0xE3069283).to_bytes(4, "big")  # the CRC32C check value


def test_hash_file_one_pass(tmp_path):
    data = os.urandom(3 * MiB + 5)
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        bounds = checksums.uniform_parts(len(data), MiB)
        parts, whole = checksums.hash_file(fd, len(data), bounds, ("MD5", "CRC32C"), ("SHA256",))
    finally:
        os.close(fd)
    assert [x["MD5"] for x in parts] == [hashlib.md5(data[s:e]).digest() for s, e in bounds]
    assert whole["SHA256"] == hashlib.sha256(data).digest()


# ------------------------------------------------------------------ what S3 says about parts
def moto_store(moto_server, tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    return Store(config.load({}, {"HOME": str(tmp_path), "S3STASHFS_ENDPOINT_URL": moto_server.url}))


@pytest.mark.parametrize("algo, ctype", [(None, None), ("CRC32C", "COMPOSITE"),
                                         ("CRC64NVME", "FULL_OBJECT")])
def test_object_parts_from_moto(moto_server, s3, bucket, tmp_path, monkeypatch, algo, ctype):
    data = helpers.random_bytes(SIZE, seed="parts")
    etag = upload(s3, bucket, "p.bin", data, algo)
    st = moto_store(moto_server, tmp_path, monkeypatch)
    info = trio.run(st.object_parts, bucket, "p.bin", etag, SIZE)
    # moto has no ObjectParts in GetObjectAttributes: part 1's size from HEAD ?partNumber=1
    assert info.parts == 3 and info.part_size == PART and not info.encrypted
    assert info.checksum_type == ctype
    assert (info.checksum or (None,))[0] == algo
    assert trio.run(st.part_size, bucket, "p.bin", etag, 3) == SIZE - 2 * PART


# ------------------------------------------------------------------ checking cached bytes
class Checker:
    """A cache directory holding one object (bytes given by the test) and a Verifier."""

    def __init__(self, tmp_path, store, bucket, key, etag, data):
        self.cache = Cache(tmp_path / "cache", "test-origin")
        self.verifier = Verifier(store, self.cache)
        self.bucket, self.key, self.etag, self.data = bucket, key, etag, data

    async def check(self, data=None, present=None) -> tuple[str, object]:
        data = self.data if data is None else data
        obj, _ = self.cache.open_object(self.bucket, self.key, ObjectInfo(
            etag=self.etag, size=len(data), last_modified_ns=0, mtime_ns=0))
        fd = self.cache.ensure_open(obj)
        os.pwrite(fd, data, 0)
        obj.present.clear()
        for s, e in present or [(0, obj.nblocks)]:
            obj.mark(s, e)
        obj.verifying = True
        try:
            if obj.complete:
                return await self.verifier.check(obj), obj
            await self.verifier.check_parts(obj)
            return "parts", obj
        finally:
            obj.verifying = False

    def errors(self) -> list[str]:
        return [e["message"] for e in self.cache.catalog.events("error")]


def damaged(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:]


@pytest.mark.parametrize("algo, how", [(None, "multipart-etag"), ("CRC32C", "parts-crc32c"),
                                       ("CRC32", "parts-crc32"), ("SHA256", "parts-sha256"),
                                       ("CRC64NVME", "crc64nvme")])
def test_cached_multipart_object_checked_against_moto(moto_server, s3, bucket, tmp_path,
                                                      monkeypatch, algo, how):
    """A real multipart object in moto, its bytes in a real cache file: the right bytes are
    verified (and how is recorded); a damaged byte drops them all (only the whole can be
    checked here), recorded for status; the same bad bytes again are kept as not verifiable."""
    data = helpers.random_bytes(SIZE, seed=f"check-{algo}")
    etag = upload(s3, bucket, "x.bin", data, algo)
    c = Checker(tmp_path, moto_store(moto_server, tmp_path, monkeypatch), bucket, "x.bin", etag, data)

    async def go():
        result, obj = await c.check()
        assert (result, obj.row.verified, obj.row.verified_by) == ("verified", True, how)
        bad = damaged(data, 9 * MiB + 3)
        result, obj = await c.check(bad)
        assert result == "mismatch" and not obj.row.verified and obj.present.count() == 0
        assert c.errors() and "dropped" in c.errors()[0]
        result, obj = await c.check(bad)  # S3 served the very same bytes again
        assert result == "unverifiable" and obj.present.count() == obj.nblocks
        assert obj.row.verified_by.startswith("unverifiable:")
        result, obj = await c.check()
        assert result == "verified"
        await c.cache.close()
    trio.run(go)


class FakeStore:
    """What S3 says about one object, set by the test (a server without part sizes, or real
    S3's GetObjectAttributes with each part's sum, which moto does not give)."""

    def __init__(self, info: PartsInfo, last_part: int | None = None):
        self.info, self.last_part, self.calls = info, last_part, 0

    async def object_parts(self, bucket, key, etag, size):
        self.calls += 1
        return self.info

    async def part_size(self, bucket, key, etag, n):
        return self.last_part


def test_part_size_guessed_when_s3_does_not_say(tmp_path):
    data = os.urandom(SIZE)
    etag = helpers.s3_etag(data, PART).strip('"')
    c = Checker(tmp_path, FakeStore(PartsInfo(etag=etag, parts=3)), "b", "k", etag, data)

    async def go():
        assert (await c.check())[0] == "verified"
        assert (await c.check())[1].row.verified_by == "multipart-etag"
        # damaged: no guess matches, which proves nothing: kept, said so, not dropped
        result, obj = await c.check(damaged(data, 5))
        assert result == "unverifiable" and obj.present.count() == obj.nblocks
        assert obj.row.verified_by == "unverifiable:no checksum, part size unknown"
        assert c.errors() == []
        await c.cache.close()
    trio.run(go)


def test_unusual_part_size_is_not_verifiable(tmp_path):
    data = os.urandom(SIZE)
    etag = helpers.s3_etag(data, 5 * MiB + 12345).strip('"')
    c = Checker(tmp_path, FakeStore(PartsInfo(etag=etag, parts=4)), "b", "k", etag, data)

    async def go():
        result, obj = await c.check()
        assert result == "unverifiable" and obj.present.count() == obj.nblocks
        assert c.cache.describe("b", "k") == \
            "complete, not verifiable (no checksum, part size unknown)"
        await c.cache.close()
    trio.run(go)


def test_a_guessed_layout_that_fails_is_checked_before_dropping(tmp_path):
    """Part 1's size taken for every part but the last: a mismatch drops the bytes only once
    the last part's size agrees (parts of different sizes prove nothing)."""
    data = os.urandom(SIZE)
    etag = helpers.s3_etag(data, PART).strip('"')
    info = PartsInfo(etag=etag, parts=3, part_size=PART)
    c = Checker(tmp_path, FakeStore(info, last_part=12345), "b", "k", etag, data)

    async def go():
        result, obj = await c.check(damaged(data, 100))
        assert result == "unverifiable" and obj.present.count() == obj.nblocks
        c.verifier.store.last_part = SIZE - 2 * PART
        result, obj = await c.check(damaged(data, 101))
        assert result == "mismatch" and obj.present.count() == 0
        await c.cache.close()
    trio.run(go)


def part_sums(data, bounds, algo="CRC32C"):
    out = []
    for s, e in bounds:
        d = checksums.new_digest(algo)
        d.update(data[s:e])
        out.append(checksums.b64(d.digest()))
    return tuple(out)


def test_each_part_checked_against_its_s3_sum_as_it_completes(tmp_path):
    """Real S3's GetObjectAttributes gives every part's size and sum: a part is checked as soon
    as it is complete in the cache, and only a bad part's blocks are dropped."""
    data = os.urandom(SIZE)
    etag = helpers.s3_etag(data, PART).strip('"')
    sizes = (PART, PART, SIZE - 2 * PART)
    bounds = checksums.parts_of(list(sizes))
    info = PartsInfo(etag=etag, parts=3, sizes=sizes, part_sums=("CRC32C", part_sums(data, bounds)))
    c = Checker(tmp_path, FakeStore(info), "b", "k", etag, data)
    p2 = (PART // BLOCK_SIZE, 2 * PART // BLOCK_SIZE)

    async def go():
        # part 1 complete and right, part 2 complete and damaged, part 3 half there
        bad = damaged(data, PART + 77)
        result, obj = await c.check(bad, present=[(0, 2 * PART // BLOCK_SIZE + 3)])
        assert result == "parts"
        assert list(obj.present) == [(0, p2[0]), (p2[1], p2[1] + 3)]
        assert "part 2 of 3" in c.errors()[0]
        assert c.verifier._parts_ok[obj] == {0}
        # complete and right: verified by the parts' sums
        result, obj = await c.check()
        assert (result, obj.row.verified_by) == ("verified", "parts-crc32c")
        assert c.cache.describe("b", "k") == "complete, verified (per-part CRC32C)"
        # complete with a bad last part: only its blocks go
        result, obj = await c.check(damaged(data, SIZE - 1))
        assert result == "mismatch"
        assert list(obj.present) == [(0, 2 * PART // BLOCK_SIZE)]
        await c.cache.close()
    trio.run(go)


def test_encrypted_objects_are_not_checked_against_their_etag(tmp_path):
    data = os.urandom(3 * MiB)
    etag = "0123456789abcdef0123456789abcdef"  # SSE-KMS: an ETag that is no MD5 of the bytes
    c = Checker(tmp_path, FakeStore(PartsInfo(etag=etag, encrypted=True)), "b", "k", etag, data)
    crc = checksums.new_digest("CRC32")
    crc.update(data)

    async def go():
        result, obj = await c.check()
        assert result == "unverifiable" and obj.present.count() == obj.nblocks
        assert "SSE-KMS" in obj.row.verified_by
        c.verifier.store.info = PartsInfo(etag=etag, encrypted=True, checksum=(
            "CRC32", base64.b64encode(crc.digest()).decode()), checksum_type="FULL_OBJECT")
        c.verifier._layouts.clear()
        result, obj = await c.check()
        assert (result, obj.row.verified_by) == ("verified", "crc32")
        await c.cache.close()
    trio.run(go)


# ------------------------------------------------------------------ whole GETs, direct path
def test_direct_path_passes_every_checksum_header_through():
    import urllib3
    from s3stashfs.store import _checksum_digests, _direct_result

    class Response:
        status = 200

        def __init__(self, headers):
            self.headers = urllib3.HTTPHeaderDict(headers)

    r = _direct_result(Response({"ETag": '"abc-3"', "Content-Length": "5",
                                 "x-amz-checksum-crc32c": "yZRlqg==",
                                 "x-amz-checksum-crc64nvme": "AAAAAAAAAAA=",
                                 "x-amz-checksum-type": "FULL_OBJECT"}), "GET s3://b/k")
    assert r["ChecksumCRC32C"] == "yZRlqg==" and r["ChecksumCRC64NVME"] == "AAAAAAAAAAA="
    assert r["ChecksumType"] == "FULL_OBJECT"
    assert [a for a, _, _ in _checksum_digests(r)] == ["CRC64NVME", "CRC32C"]
    # a COMPOSITE checksum is of the parts' sums, not of the whole: not checked on the GET
    assert _checksum_digests({"ChecksumCRC32C": "yZRlqg==-3"}) == []
    assert _checksum_digests({"ChecksumCRC32C": "yZRlqg==", "ChecksumType": "COMPOSITE"}) == []


@pytest.mark.parametrize("algo", ["CRC32C", "CRC64NVME"])
def test_whole_fetch_checks_crc32c_and_crc64nvme(tmp_path, algo):
    from s3stashfs import errors
    from test_store import FakeClient, make_store

    data = os.urandom(5000)
    d = checksums.new_digest(algo)
    d.update(data)
    client = FakeClient(data, "abc-2")  # a multipart ETag: the checksum decides
    client.extra = {f"Checksum{algo}": checksums.b64(d.digest()), "ChecksumType": "FULL_OBJECT"}
    store = make_store(tmp_path, client)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    checked: list[str] = []
    try:
        trio.run(store.fetch_whole, "b", "k", "abc-2", len(data), fd, lambda pos: None, checked)
        assert os.pread(fd, len(data), 0) == data and checked == [algo.lower()]
        d.update(b"x")
        client.extra = {f"Checksum{algo}": checksums.b64(d.digest())}
        with pytest.raises(errors.ChecksumMismatch, match=algo):
            trio.run(store.fetch_whole, "b", "k", "abc-2", len(data), fd, lambda pos: None)
    finally:
        os.close(fd)
