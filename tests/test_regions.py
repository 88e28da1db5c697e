"""Buckets in several regions: each bucket's region found once, its requests sent to (and
signed for) that region on both paths, a stale region corrected by S3's redirect.

moto serves every bucket whatever region a request is signed for, so a recording proxy in front
of it (tests/proxy.py, ``regions``) answers as AWS does a request signed for the wrong region
(301 to a HEAD, 400 AuthorizationHeaderMalformed naming the region otherwise), and records
every request with its headers: the SigV4 Credential scope says which region a request was
signed for, the User-Agent which path (``s3stashfs (direct; ...)`` or botocore's) sent it."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import trio

from s3stashfs import config
from s3stashfs.store import Store
from s3stashfs.store.routes import aws_host, build_route, region_in_answer

WEST = "eu-west-2"
DIRECT_UA = "s3stashfs (direct"


# ------------------------------------------------------------------ URLs, without a server
def test_aws_buckets_are_virtual_hosted_in_their_region():
    r = build_route("my-bucket", WEST, None)
    assert (r.base, r.region, r.path_style) == ("https://my-bucket.s3.eu-west-2.amazonaws.com/",
                                               WEST, False)
    assert r.origin == "https://s3.eu-west-2.amazonaws.com"
    assert build_route("b-1", "us-east-1", None).base == "https://b-1.s3.us-east-1.amazonaws.com/"


def test_aws_buckets_with_dots_are_path_style():
    """A dotted name as a host name would not match S3's wildcard certificate."""
    r = build_route("my.dotted.bucket", WEST, None)
    assert (r.base, r.path_style) == ("https://s3.eu-west-2.amazonaws.com/my.dotted.bucket/", True)
    assert build_route("Old_Style", WEST, None).path_style  # not a host name either


def test_aws_path_style_when_asked():
    assert build_route("b-1", WEST, None, "path").base == "https://s3.eu-west-2.amazonaws.com/b-1/"


def test_region_hosts():
    assert aws_host("us-east-1") == "s3.us-east-1.amazonaws.com"
    assert aws_host("ap-southeast-2") == "s3.ap-southeast-2.amazonaws.com"
    assert aws_host("cn-north-1") == "s3.cn-north-1.amazonaws.com.cn"


def test_a_custom_endpoint_is_path_style_with_one_host_for_every_region():
    for region in ("us-east-1", WEST):
        r = build_route("b-1", region, "http://127.0.0.1:9000")
        assert (r.base, r.region, r.origin) == ("http://127.0.0.1:9000/b-1/", region,
                                                "http://127.0.0.1:9000")
    assert build_route("b-1", WEST, "https://minio.lan").base == "https://minio.lan/b-1/"
    assert build_route("b-1", WEST, "https://minio.lan", "virtual").base == "https://b-1.minio.lan/"
    assert build_route("a.b", WEST, "https://minio.lan", "virtual").base == "https://minio.lan/a.b/"


def test_the_region_is_read_from_the_header_or_the_error_body():
    assert region_in_answer({"x-amz-bucket-region": WEST}) == WEST
    body = b"<Error><Code>AuthorizationHeaderMalformed</Code><Region>ap-south-1</Region></Error>"
    assert region_in_answer({}, body) == "ap-south-1"
    assert region_in_answer({}, b"<Error><Code>InvalidArgument</Code></Error>") is None


# ------------------------------------------------------------------ against moto
@pytest.fixture
def two_regions(s3, make_bucket, _moto_guard):
    """(a bucket in us-east-1, a bucket with dots in its name in eu-west-2), one file each."""
    east = make_bucket()
    west = f"{east[:40].rstrip('-')}.west"
    s3.create_bucket(Bucket=west, CreateBucketConfiguration={"LocationConstraint": WEST})
    _moto_guard.buckets.append(west)
    s3.put_object(Bucket=east, Key="e.txt", Body=b"east data\n")
    s3.put_object(Bucket=west, Key="dir/w.txt", Body=b"west data\n")
    return east, west


def scope(headers: dict[str, str]) -> str | None:
    m = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/s3/", headers.get("authorization", ""))
    return m.group(1) if m else None


def bucket_of(path: str) -> str:
    return path.split("?")[0].lstrip("/").split("/")[0]


def test_buckets_in_two_regions_at_the_root_are_read_by_the_direct_path(mount, two_regions, s3_proxy):
    """No --bucket: both buckets listed at the root and read; every request for a bucket is
    signed for that bucket's region once it is known (a HeadBucket each, the first one
    redirected by the region-enforcing proxy and followed by botocore), and the objects are
    read by the direct path, not botocore."""
    east, west = two_regions
    s3_proxy.regions = {east: "us-east-1", west: WEST}
    m = mount(endpoint_url=s3_proxy.url, extra_args=["--debug"])
    names = os.listdir(m.path)
    assert east in names and west in names
    assert Path(m.path, east, "e.txt").read_bytes() == b"east data\n"
    assert Path(m.path, west, "dir", "w.txt").read_bytes() == b"west data\n"
    assert os.listdir(Path(m.path, west, "dir")) == ["w.txt"]

    seen = list(s3_proxy.seen)
    objects = [(method, path, h) for method, path, h in seen
               if bucket_of(path) in (east, west) and "/" in path.split("?")[0].strip("/")]
    assert {(bucket_of(p), meth) for meth, p, _ in objects} >= {(east, "GET"), (west, "GET")}
    for method, path, h in objects:  # GET and HEAD of keys: all direct, in the right region
        assert h["user-agent"].startswith(DIRECT_UA), (method, path, h["user-agent"])
        assert scope(h) == (WEST if bucket_of(path) == west else "us-east-1"), (method, path)
    listings = [h for method, path, h in seen if bucket_of(path) == west and "list-type" in path]
    assert listings and all(scope(h) == WEST for h in listings)
    # the only request ever signed for the wrong region is the first HeadBucket of the bucket
    wrong = [(meth, p) for meth, p, h in seen if bucket_of(p) == west and scope(h) != WEST]
    assert wrong == [("HEAD", f"/{west}")] and s3_proxy.redirected == 1
    log = m.log_text()
    assert re.search(rf"s3://{re.escape(west)} is in region {WEST}", log)
    assert re.search(rf"s3://{re.escape(east)} is in region us-east-1", log)
    assert "using botocore" not in log


def test_a_stale_region_is_corrected_by_the_redirect_and_the_request_retried_once(
        moto_server, two_regions, s3_proxy, tmp_path, monkeypatch):
    """A route pointing at the wrong region (as after a bucket was made again elsewhere): the
    301 to a HEAD and the 400 AuthorizationHeaderMalformed to a GET name the region; the route
    moves there and the request is made once more, still on the direct path."""
    east, west = two_regions
    s3_proxy.regions = {west: WEST}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    st = Store(config.load({}, {"HOME": str(tmp_path), "S3STASHFS_ENDPOINT_URL": s3_proxy.url}))
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        async def go():
            st.routes.learn(west, "us-east-1", "a test")
            info = await st.head_object(west, "dir/w.txt")
            assert st.routes.known[west].region == WEST
            st.routes.learn(west, "us-east-1", "a test")
            await st.fetch_whole(west, "dir/w.txt", info.etag, info.size, fd, lambda n: None)
            return info
        info = trio.run(go)
        assert os.pread(fd, 100, 0) == b"west data\n" and info.size == 10
    finally:
        os.close(fd)
    assert st.routes.known[west].region == WEST
    sent = [(meth, scope(h), h["user-agent"].startswith(DIRECT_UA)) for meth, p, h in s3_proxy.seen
            if bucket_of(p) == west]
    assert sent == [("HEAD", "us-east-1", True), ("HEAD", WEST, True),
                    ("GET", "us-east-1", True), ("GET", WEST, True)]
    assert s3_proxy.redirected == 2


def test_a_bucket_region_is_asked_once_per_mount(mount, two_regions, s3_proxy):
    """The HeadBucket that finds a region is made once per bucket, however many files of it
    are read."""
    east, west = two_regions
    m = mount(endpoint_url=s3_proxy.url)
    for _ in range(3):
        assert Path(m.path, west, "dir", "w.txt").read_bytes() == b"west data\n"
    heads = [p for meth, p, _ in s3_proxy.seen if meth == "HEAD" and p == f"/{west}"]
    assert len(heads) == 1
