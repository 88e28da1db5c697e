"""Public buckets (--no-sign-request) and requester-pays buckets (--requester-pays), through a
real mount and a recording proxy (tests/proxy.py) in front of moto_server.

moto enforces neither authentication nor requester-pays, so what these tests prove is what
reached the server: the proxy records every request with its headers. For requester-pays, the
proxy also plays S3's part: a request to the bucket without ``x-amz-request-payer: requester``
is answered ``403 AccessDenied`` (S3's XML), as S3 answers it for a requester-pays bucket.
HeadBucket is let through: S3's API gives it no RequestPayer member.
"""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess

import pytest

import biodata
import helpers
from conftest import S3STASHFS_BIN
from helpers import MiB
from proxy import Fault, HttpProxy, Recorded

pytestmark = pytest.mark.timeout(180)

NO_CREDENTIALS_LINE = ("s3stashfs: no AWS credentials found (environment, ~/.aws, instance role); "
                       "for a public bucket, mount with --no-sign-request")
NAME_THE_BUCKETS_LINE = ("s3stashfs: --no-sign-request cannot list buckets (that needs "
                         "credentials): name them with --bucket NAME or "
                         "S3STASHFS_BUCKETS=NAME,NAME")

UNSIGNED_HINT = ("s3://{b}: access denied to an unsigned request; {b} may not be public: mount "
                 "without --no-sign-request to use AWS credentials")


def hint(bucket: str) -> str:
    return (f"s3://{bucket}: access denied; if {bucket} is a requester-pays bucket, mount with "
            "--requester-pays (S3STASHFS_REQUESTER_PAYS=1)")


def cli(env, *args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {text!r}"
    return lines[0]


@pytest.fixture
def no_credentials(tmp_path) -> dict[str, str | None]:
    """Changes to s3env that leave boto3's chain nothing to find: no AWS_* keys, an empty HOME
    (so no ~/.aws), empty config and credentials files, no instance metadata."""
    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "aws-config").write_text("")
    (tmp_path / "aws-credentials").write_text("")
    return {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
            "AWS_SECURITY_TOKEN": None, "AWS_PROFILE": None, "AWS_DEFAULT_PROFILE": None,
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": None, "AWS_WEB_IDENTITY_TOKEN_FILE": None,
            "HOME": str(home), "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def daemon_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [e.decode(errors="replace").partition("=") for e in f.read().split(b"\0") if e]
    return {k: v for k, _, v in pairs}


def to_bucket(r: Recorded, bucket: str) -> bool:
    target = r.path.split("?", 1)[0]
    return target == f"/{bucket}" or target.startswith(f"/{bucket}/")


def requester_pays_model(bucket: str):
    """S3's rule for a requester-pays bucket, as a proxy fault predicate: a request to it that
    does not say ``x-amz-request-payer: requester`` is refused (HeadBucket aside)."""
    def refused(method: str, path: str, headers: dict[str, str]) -> bool:
        target = path.split("?", 1)[0]
        if target != f"/{bucket}" and not target.startswith(f"/{bucket}/"):
            return False
        if method == "HEAD" and target.rstrip("/") == f"/{bucket}":
            return False  # HeadBucket: no RequestPayer in S3's API
        return headers.get("x-amz-request-payer") != "requester"
    return refused


# ------------------------------------------------------------------ public buckets


def test_public_bucket_unsigned_without_credentials(s3_proxy, mount, bucket, s3, no_credentials,
                                                    bam_files):
    """--no-sign-request, no credentials anywhere: list, read and a samtools region query work,
    no request carries a signature or a token, and the GETs take the direct path."""
    bam = bam_files
    for p in bam.paths:  # moto, like S3, refuses an anonymous GET of an object not public
        s3.upload_file(str(p), bucket, f"runs/{p.name}", ExtraArgs={"ACL": "public-read"})
    helpers.put_object(s3, bucket, "README.txt", b"public data\n", ACL="public-read")
    helpers.put_object(s3, bucket, "private.txt", b"not for everyone\n")
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--no-sign-request"],
              env=no_credentials)
    m.expect_log(r"private\.txt: (AccessDenied|403)")
    m.expect_log(re.escape(UNSIGNED_HINT.format(b=bucket)), required=True)
    env = daemon_environ(m.pid)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & env.keys()
    assert env["HOME"] == no_credentials["HOME"]

    # looked up before any listing: a HEAD (the direct path), then a GET
    assert (m.path / "README.txt").read_bytes() == b"public data\n"
    assert sorted(os.listdir(m.path)) == ["README.txt", "private.txt", "runs"]
    assert sorted(os.listdir(m.path / "runs")) == sorted(p.name for p in bam.paths)
    region = "chr1:150000-200000"
    assert (biodata.samtools_count(m.path / "runs" / bam.bam.name, region)
            == biodata.samtools_count(bam.bam, region) > 0)

    for _ in range(2):  # an object the bucket does not make public: EACCES, explained once
        with pytest.raises(PermissionError) as e:
            (m.path / "private.txt").read_bytes()
        assert e.value.errno == errno.EACCES
    hints = [ln for ln in m.log_text().splitlines() if "--no-sign-request" in ln]
    assert len(hints) == 1 and " WARNING " in hints[0], hints

    seen = list(s3_proxy.recorded)
    assert seen and all(to_bucket(r, bucket) for r in seen), [(r.method, r.path) for r in seen]
    signed = [(r.method, r.path) for r in seen if r.signed]
    assert not signed, f"signed requests: {signed}"
    gets = [r for r in seen if r.method == "GET" and "list-type" not in r.path]
    assert gets and all(r.direct for r in gets), [(r.path, r.headers.get("user-agent")) for r in gets]
    assert any(r.method == "HEAD" and r.direct for r in seen)
    assert not any("x-amz-request-payer" in r.headers for r in seen)
    m.unmount()  # read-ahead may still be running: done before the proxy goes


def test_public_root_shows_named_buckets_and_finds_others(s3_proxy, mount, make_bucket, s3,
                                                          no_credentials):
    """Without --bucket, the root shows S3STASHFS_BUCKETS (ListBuckets needs an identity); a
    bucket named by path is checked with an unsigned HeadBucket."""
    shown, other = make_bucket(), make_bucket()
    helpers.put_object(s3, other, "x.txt", b"found\n", ACL="public-read")
    m = mount(endpoint_url=s3_proxy.url, extra_args=["--no-sign-request"],
              env={**no_credentials, "S3STASHFS_BUCKETS": shown})
    assert os.listdir(m.path) == [shown]
    assert (m.path / other / "x.txt").read_bytes() == b"found\n"
    with pytest.raises(FileNotFoundError):
        os.stat(m.path / "no-such-public-bucket")
    seen = list(s3_proxy.recorded)
    assert any(r.method == "HEAD" and r.path.rstrip("/") == f"/{other}" for r in seen)
    assert not [(r.method, r.path) for r in seen if r.signed]


def test_no_credentials_without_the_flag_fails_at_once(mount, bucket, no_credentials):
    m, r = mount.run(bucket=bucket, env=no_credentials)
    assert r.returncode == 1
    assert one_line(r.stderr) == NO_CREDENTIALS_LINE
    assert not m.is_mounted()


def test_credentials_that_fail_to_load_fail_at_once(mount, bucket, no_credentials, tmp_path):
    config = tmp_path / "aws-config-failing"
    config.write_text("[default]\ncredential_process = /bin/false\n")
    m, r = mount.run(bucket=bucket, env={**no_credentials, "AWS_CONFIG_FILE": str(config)})
    assert r.returncode == 1
    assert one_line(r.stderr).startswith("s3stashfs: AWS credentials could not be loaded: ")
    assert not m.is_mounted()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_sign_request_without_buckets_is_refused(mount, no_credentials, how):
    args, env = (["--no-sign-request"], {}) if how == "flag" else ([], {"S3STASHFS_NO_SIGN_REQUEST": "1"})
    m, r = mount.run(extra_args=args, env={**no_credentials, **env})
    assert r.returncode == 2
    assert one_line(r.stderr) == NAME_THE_BUCKETS_LINE
    assert not m.is_mounted()


def test_requester_pays_cannot_be_unsigned(mount, bucket):
    m, r = mount.run(bucket=bucket, extra_args=["--no-sign-request", "--requester-pays"])
    assert r.returncode == 2
    assert one_line(r.stderr) == ("s3stashfs: --requester-pays needs signed requests: it cannot "
                                  "be combined with --no-sign-request")
    assert not m.is_mounted()


# ------------------------------------------------------------------ requester pays


def test_requester_pays_header_on_every_request(s3_proxy: HttpProxy, mount, bucket, s3):
    """--requester-pays: GET, HEAD, LIST, PUT, multipart and DELETE requests all carry the
    header (signed, in the direct path too); the model of S3 refuses any that does not."""
    refusals = s3_proxy.inject(Fault("403", when=requester_pays_model(bucket)))
    data = helpers.random_bytes(300_000, seed="rp")
    helpers.put_object(s3, bucket, "dir/a.bin", data)
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--requester-pays"],
              env={"S3STASHFS_MULTIPART_THRESHOLD_MB": "5", "S3STASHFS_PART_SIZE_MB": "5"})
    assert os.listdir(m.path / "dir") == ["a.bin"]
    assert (m.path / "dir" / "a.bin").read_bytes() == data
    (m.path / "dir" / "small.txt").write_bytes(b"written\n")
    big = helpers.random_bytes(6 * MiB, seed="rp-big")
    (m.path / "dir" / "big.bin").write_bytes(big)
    os.unlink(m.path / "dir" / "small.txt")
    assert helpers.md5_hex(s3.get_object(Bucket=bucket, Key="dir/big.bin")["Body"].read()) \
        == helpers.md5_hex(big)
    assert "dir/small.txt" not in helpers.list_keys(s3, bucket)

    assert refusals.injected == 0
    seen = [r for r in s3_proxy.recorded if to_bucket(r, bucket)
            and not (r.method == "HEAD" and r.path.split("?")[0].rstrip("/") == f"/{bucket}")]
    lacking = [(r.method, r.path) for r in seen if r.headers.get("x-amz-request-payer") != "requester"]
    assert not lacking, lacking
    kinds = {(r.method, "list" if "list-type=2" in r.path else "uploads" if "upload" in r.path
              else "object") for r in seen}
    for kind in [("GET", "list"), ("GET", "object"), ("HEAD", "object"), ("PUT", "object"),
                 ("POST", "uploads"), ("PUT", "uploads"), ("DELETE", "object")]:
        assert kind in kinds, (kind, sorted(kinds))
    for r in seen:
        m_ = re.search(r"SignedHeaders=([^,]+)", r.headers.get("authorization", ""))
        assert m_ and "x-amz-request-payer" in m_.group(1).split(";"), (r.method, r.path)
    assert any(r.direct and r.method == "GET" for r in seen)


@pytest.mark.expect_log(r"AccessDenied|\b403\b|access denied")
def test_requester_pays_refusal_is_explained_once(s3_proxy: HttpProxy, mount, bucket, s3):
    """Without --requester-pays, S3 refuses a requester-pays bucket's requests with a bare 403:
    each access gets EACCES, and the hint naming the flag is given once, in the log and in
    `status`."""
    helpers.put_object(s3, bucket, "dir/a.txt", b"paid for\n")
    refusals = s3_proxy.inject(Fault("403", when=requester_pays_model(bucket)))
    m = mount(bucket=bucket, endpoint_url=s3_proxy.url)
    for _ in range(2):  # a second time: the refusal is not remembered
        with pytest.raises(PermissionError) as e:
            os.listdir(m.path)
        assert e.value.errno == errno.EACCES
        with pytest.raises(PermissionError) as e:
            (m.path / "dir" / "a.txt").read_bytes()
        assert e.value.errno == errno.EACCES
    assert refusals.injected >= 4

    expected = hint(bucket)
    helpers.wait_for(lambda: expected in m.log_text(), timeout=10, message="the hint in the log")
    lines = [ln for ln in m.log_text().splitlines() if "--requester-pays" in ln]
    assert len(lines) == 1 and " WARNING " in lines[0] and lines[0].endswith(expected), lines

    r = cli(m.env, "status", m.path)
    assert r.returncode == 0, r
    assert f"{bucket}: {expected}" in r.stdout
    st = json.loads(cli(m.env, "status", m.path, "--json").stdout)
    mine = [e for e in st["errors"] if e["message"] == expected]
    assert len(mine) == 1 and mine[0]["bucket"] == bucket and mine[0]["key"] == ""
    assert mine[0]["message"].count("--requester-pays") == 1


def test_refused_head_bucket_at_mount_names_the_flag(s3_proxy: HttpProxy, mount, bucket):
    """A bucket that refuses even HeadBucket fails the mount (exit 1), the hint in its line."""
    s3_proxy.inject(Fault("403", when=lambda method, path, h: method == "HEAD"
                          and path.rstrip("/") == f"/{bucket}"))
    m, r = mount.run(bucket=bucket, endpoint_url=s3_proxy.url)
    assert r.returncode == 1
    assert one_line(r.stderr) == (
        f"s3stashfs: S3 refused access (bucket {bucket}: 403 Forbidden); check the credentials, "
        f"profile and bucket; if {bucket} is a requester-pays bucket, mount with "
        "--requester-pays (S3STASHFS_REQUESTER_PAYS=1)")
    assert not m.is_mounted()
