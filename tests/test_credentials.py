"""Credentials that expire (docs/SEMANTICS.md, "Credentials that expire"), through a real mount.

The mount gets its credentials from a ``credential_process`` (a small Python script written here,
named by a profile in a temporary AWS config file, mounted with --profile) that hands out a new
session token each time, for a set lifetime, and can be switched to fail. moto takes any token,
so a proxy in front of it answers 400 ExpiredToken (S3's XML) to every request whose
X-Amz-Security-Token is not one the script issued, still valid and not revoked by the test.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers
from conftest import S3STASHFS_BIN, free_port
from proxy import Fault

pytestmark = [pytest.mark.timeout(180)]

PROFILE = "expiring"
SCRIPT = r'''
import datetime, json, os, sys, time, uuid
d = sys.argv[1]
with open(os.path.join(d, "calls"), "a") as f:
    f.write("x\n")
if open(os.path.join(d, "mode")).read().strip() == "fail":
    last = open(os.path.join(d, "issued")).read().split()[-1:] if os.path.exists(os.path.join(d, "issued")) else []
    # a careless provider: it names the last secret key in its complaint
    sys.stderr.write("token broker unavailable (last key %s)\n" % " ".join(last))
    sys.exit(1)
life = float(open(os.path.join(d, "lifetime")).read())
ak = "ASIA" + uuid.uuid4().hex[:16].upper()
sk = uuid.uuid4().hex + uuid.uuid4().hex[:8]
tok = "FQoGZXIvYXdzE" + uuid.uuid4().hex + uuid.uuid4().hex
exp = time.time() + life
line = "%s %r %s %s\n" % (tok, exp, ak, sk)
fd = os.open(os.path.join(d, "issued"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, line.encode())
os.close(fd)
print(json.dumps({"Version": 1, "AccessKeyId": ak, "SecretAccessKey": sk, "SessionToken": tok,
                  "Expiration": datetime.datetime.fromtimestamp(exp, datetime.timezone.utc).isoformat()}))
'''


@dataclasses.dataclass
class Issued:
    token: str
    expires: float
    access_key: str
    secret_key: str


class CredentialSource:
    """The credential_process's state directory: its mode, the lifetime of what it hands out,
    what it issued, how often it ran; and which tokens the proxy takes."""

    def __init__(self, d: Path, lifetime: float):
        d.mkdir()
        self.dir = d
        self.revoked: set[str] = set()
        self.seen: dict[str, set[str]] = {"direct": set(), "botocore": set()}  # tokens taken
        self.lifetime(lifetime)
        self.succeed()
        script = d / "creds.py"
        script.write_text(SCRIPT)
        self.config = d / "aws-config"
        self.config.write_text(f"[profile {PROFILE}]\n"
                               f"credential_process = {sys.executable} -S -I {script} {d}\n"
                               "region = us-east-1\n")

    def lifetime(self, seconds: float) -> None:
        (self.dir / "lifetime").write_text(str(seconds))

    def succeed(self) -> None:
        (self.dir / "mode").write_text("ok")

    def fail(self) -> None:
        (self.dir / "mode").write_text("fail")

    @property
    def calls(self) -> int:
        try:
            return len((self.dir / "calls").read_text().splitlines())
        except FileNotFoundError:
            return 0

    def issued(self) -> list[Issued]:
        try:
            lines = (self.dir / "issued").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            tok, exp, ak, sk = line.split()
            out.append(Issued(tok, float(exp), ak, sk))
        return out

    def revoke_all(self) -> None:
        self.revoked |= {i.token for i in self.issued()}

    def refused(self, method: str, path: str, headers: dict[str, str]) -> bool:
        """The proxy's test: True answers ExpiredToken."""
        token = headers.get("x-amz-security-token")
        now = time.time()
        ok = token is not None and token not in self.revoked and any(
            i.token == token and i.expires > now for i in self.issued())
        if ok:
            path_kind = "direct" if "(direct;" in headers.get("user-agent", "") else "botocore"
            self.seen[path_kind].add(token)
        return not ok

    def secrets(self) -> list[str]:
        return [s for i in self.issued() for s in (i.token, i.secret_key)]


@pytest.fixture
def source(tmp_path, s3_proxy):
    src = CredentialSource(tmp_path / "creds", lifetime=3600)
    src.fault = s3_proxy.inject(Fault(kind="expired", when=src.refused))
    return src


def mount_with(mount, bucket, proxy, src, *extra):
    return mount(bucket=bucket, endpoint_url=proxy.url, extra_args=["--profile", PROFILE, *extra],
                 env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                      "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None,
                      "AWS_CONFIG_FILE": str(src.config)})


def status(m, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(S3STASHFS_BIN), "status", str(m.path), *args], env=m.env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def status_json(m) -> dict:
    r = status(m, "--json")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def assert_no_secrets(src: CredentialSource, *texts: str) -> None:
    secrets = src.secrets()
    assert secrets
    for text in texts:
        for s in secrets:
            assert s not in text, "a secret key or session token was written out"


def wait_expired(src: CredentialSource) -> None:
    """Until everything the source issued so far has expired."""
    last = max(i.expires for i in src.issued())
    helpers.wait_for(lambda: time.time() > last + 0.05, timeout=30, interval=0.05,
                     message="the credentials to expire")


def test_mount_outlives_expiring_credentials(mount, s3, bucket, s3_proxy, source):
    """Credentials valid for 1.5 s, so botocore refreshes them for nearly every request: reads
    (direct GET/HEAD), listings (LIST) and writes (PUT) go on across several expiries, each
    with a token the proxy takes, on both the direct path and botocore's."""
    rounds = 4
    data = {i: helpers.random_bytes(200_000 + i, seed=f"exp{i}") for i in range(rounds)}
    for i in range(rounds):
        helpers.put_object(s3, bucket, f"r{i}/data.bin", data[i])
    source.lifetime(1.5)
    m = mount_with(mount, bucket, s3_proxy, source)
    for i in range(rounds):
        wait_expired(source)
        assert sorted(os.listdir(m.path / f"r{i}")) == ["data.bin"]
        assert (m.path / f"r{i}" / "data.bin").read_bytes() == data[i]
        body = f"written in round {i}\n".encode()
        with open(m.path / f"r{i}" / "new.txt", "wb") as f:
            f.write(body)  # close() uploads: its error would raise here
        assert s3.get_object(Bucket=bucket, Key=f"r{i}/new.txt")["Body"].read() == body
    # a fresh token for each round on each path; the process ran for each round, and not
    # wildly more often than S3 was asked (a refresh per signature at most, some forced)
    assert len(source.seen["direct"]) >= rounds and len(source.seen["botocore"]) >= rounds
    requests = len(s3_proxy.requests)
    assert rounds < source.calls <= 2 * requests + 2, (source.calls, requests)
    assert_no_secrets(source, m.log_text())


def test_refused_token_is_refreshed_once_and_retried(mount, s3, bucket, s3_proxy, source):
    """Credentials botocore thinks good for an hour, revoked by the proxy (ExpiredToken): the
    request is retried once with credentials fetched anew, and succeeds; one fetch per
    revocation, however many requests were refused at once."""
    data = helpers.random_bytes(300_000, seed="revoked")
    helpers.put_object(s3, bucket, "a.bin", data)
    helpers.put_object(s3, bucket, "sub/b.txt", b"b\n")
    m = mount_with(mount, bucket, s3_proxy, source)
    calls = source.calls

    source.revoke_all()  # a lookup (HEAD and LIST at once), then the direct GET
    assert (m.path / "a.bin").read_bytes() == data
    assert source.fault.injected >= 1
    assert source.calls == calls + 1
    assert source.seen["direct"] and source.seen["botocore"]

    source.revoke_all()  # LIST
    refused = source.fault.injected
    assert os.listdir(m.path / "sub") == ["b.txt"]
    assert source.fault.injected > refused and source.calls == calls + 2

    source.revoke_all()  # PUT, at close()
    refused = source.fault.injected
    with open(m.path / "sub" / "c.txt", "wb") as f:
        f.write(b"c\n")
    assert s3.get_object(Bucket=bucket, Key="sub/c.txt")["Body"].read() == b"c\n"
    assert source.fault.injected > refused and source.calls == calls + 3
    assert status_json(m)["credentials"] is None
    assert_no_secrets(source, m.log_text())


@pytest.mark.expect_log(r"AWS credentials: the credential provider failed|credential provider "
                        r"failed: credential_process")
def test_failing_credential_source_is_eacces_not_offline(mount, s3, bucket, s3_proxy, source):
    """The source starts failing: whatever needs S3 gets EACCES (not ENETUNREACH), status says
    why and stays online (exit 0), cached files still read; when the source works again, the
    next request works and status clears."""
    cached = helpers.random_bytes(250_000, seed="cached")
    later = helpers.random_bytes(120_000, seed="later")
    helpers.put_object(s3, bucket, "cached.bin", cached)
    helpers.put_object(s3, bucket, "later.bin", later)
    helpers.put_object(s3, bucket, "dir/x.txt", b"x\n")
    helpers.put_object(s3, bucket, "edit.txt", b"one\n")
    source.lifetime(1.5)
    m = mount_with(mount, bucket, s3_proxy, source, "--metadata-ttl", "0")
    assert (m.path / "cached.bin").read_bytes() == cached
    assert (m.path / "edit.txt").read_bytes() == b"one\n"

    source.fail()
    wait_expired(source)
    with pytest.raises(OSError) as e:
        (m.path / "later.bin").read_bytes()
    assert e.value.errno == errno.EACCES, e.value
    with pytest.raises(OSError) as e:
        os.listdir(m.path / "dir")
    assert e.value.errno == errno.EACCES, e.value
    assert (m.path / "cached.bin").read_bytes() == cached  # served from the cache
    f = open(m.path / "edit.txt", "ab")  # a cached file takes a change; its upload fails
    f.write(b"two\n")
    with pytest.raises(OSError) as e:
        f.close()
    assert e.value.errno == errno.EACCES, e.value

    r = status(m)
    assert r.returncode == 0, (r.stdout, r.stderr)  # online: S3 was never unreachable
    assert ": online since" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("credentials"))
    assert "the credential provider failed: credential_process: token broker unavailable" in line
    st = status_json(m)
    assert st["online"] is True
    assert st["credentials"]["problem"].startswith(
        "the credential provider failed: credential_process: token broker unavailable")
    failing_status = r.stdout + json.dumps(st)

    source.succeed()
    assert (m.path / "later.bin").read_bytes() == later
    assert os.listdir(m.path / "dir") == ["x.txt"]
    helpers.wait_for(lambda: s3.get_object(Bucket=bucket, Key="edit.txt")["Body"].read()
                     == b"one\ntwo\n", timeout=60, interval=0.2,
                     message="the change kept in the cache to reach S3")
    st = status_json(m)
    assert st["credentials"] is None and st["online"] is True
    assert "credentials" not in status(m).stdout.replace("AWS credentials", "")
    log = m.log_text()
    assert "S3 is unreachable" not in log and "back online" not in log  # never offline
    # the provider put the last secret key in its complaint: it is in neither log nor status
    assert_no_secrets(source, log, failing_status)


@pytest.mark.expect_log(r"unreachable|offline|credential provider failed")
def test_failing_source_with_s3_unreachable_too_is_offline(mount, s3, bucket, s3_proxy, source):
    """The provider fails and S3 cannot be reached either (a laptop off the network with a
    login to renew): S3 was never asked, so an unsigned knock says whether it is there; it is
    not, so the mount goes offline and an uncached file gives ENETUNREACH, not EACCES. Once S3
    answers again, the provider's failure is what remains: EACCES; then it works."""
    data = helpers.random_bytes(50_000, seed="off")
    helpers.put_object(s3, bucket, "cached.bin", data)
    helpers.put_object(s3, bucket, "later.bin", b"later\n")
    source.lifetime(1.5)
    m = mount_with(mount, bucket, s3_proxy, source, "--metadata-ttl", "0")
    assert (m.path / "cached.bin").read_bytes() == data
    source.fail()
    wait_expired(source)
    s3_proxy.set_mode("refuse")
    with pytest.raises(OSError) as e:
        (m.path / "later.bin").read_bytes()
    assert e.value.errno == errno.ENETUNREACH, e.value
    assert (m.path / "cached.bin").read_bytes() == data  # served from the cache
    r = status(m)
    assert r.returncode == 3 and "OFFLINE" in r.stdout, (r.returncode, r.stdout, r.stderr)
    s3_proxy.set_mode("pass")

    def refused() -> bool:
        try:
            (m.path / "later.bin").read_bytes()
        except OSError as e:
            assert e.errno in (errno.ENETUNREACH, errno.EACCES), e
            return e.errno == errno.EACCES
        raise AssertionError("read with a failing credential source")
    helpers.wait_for(refused, timeout=30, interval=0.2, message="EACCES once S3 answers again")
    source.succeed()
    assert (m.path / "later.bin").read_bytes() == b"later\n"


def test_no_secret_in_debug_log_or_status(mount, s3, bucket, s3_proxy, source):
    """At DEBUG, through refreshes, a refused token and its retry: no secret key or session
    token in the log or in status."""
    helpers.put_object(s3, bucket, "f.txt", b"f\n")
    m = mount_with(mount, bucket, s3_proxy, source, "--debug")
    assert (m.path / "f.txt").read_bytes() == b"f\n"
    source.revoke_all()
    assert os.listdir(m.path) == ["f.txt"] or "f.txt" in os.listdir(m.path)
    with open(m.path / "g.txt", "wb") as f:
        f.write(b"g\n")
    assert source.fault.injected >= 1 and len(source.issued()) >= 2
    assert_no_secrets(source, m.log_text(), status(m).stdout, status(m, "--json").stdout)


def test_failing_source_at_mount_says_so(mount, bucket, s3_proxy, source):
    """A credential_process that fails when mounting: the mount fails with one line naming the
    provider, without its secrets."""
    source.fail()
    m, r = mount.run(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--profile", PROFILE],
                     env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                          "AWS_CONFIG_FILE": str(source.config)})
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "the credential provider failed: credential_process: token broker unavailable" in err


def test_sso_session_ended_at_mount_says_what_to_run(mount, bucket, s3_proxy, tmp_path):
    """An SSO profile whose login has no token (never logged in, or ended): `aws sso login`."""
    cfg = tmp_path / "aws-config"
    cfg.write_text("[profile work]\nsso_start_url = https://example.invalid/start\n"
                   "sso_region = us-east-1\nsso_account_id = 123456789012\n"
                   "sso_role_name = Reader\nregion = us-east-1\n")
    home = tmp_path / "home"
    home.mkdir()
    m, r = mount.run(bucket=bucket, endpoint_url=s3_proxy.url, extra_args=["--profile", "work"],
                     env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                          "AWS_CONFIG_FILE": str(cfg), "HOME": str(home)})
    assert r.returncode == 1
    assert "credentials expired: run `aws sso login --profile work`" in r.stderr.decode()


def test_credential_endpoint_failures_are_not_s3_unreachable():
    """A provider that cannot reach its own endpoint (STS, SSO, a container endpoint) fails the
    request with EACCES and a credential message; the same network error from S3 itself is
    still Unreachable (ENETUNREACH). Nothing secret in the message."""
    import datetime

    import botocore.exceptions as bexc
    from botocore.credentials import ContainerProvider, RefreshableCredentials
    from botocore.utils import ContainerMetadataFetcher

    from s3stashfs.errors import CredentialsFailed, Unreachable
    from s3stashfs.store import _classify

    def sts_down():
        raise bexc.EndpointConnectionError(endpoint_url="https://sts.example.invalid/")
    expired = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    creds = RefreshableCredentials("ASIAEXAMPLEEXAMPLE12", "s" * 40, "t" * 64, expired, sts_down,
                                   "assume-role")
    with pytest.raises(bexc.EndpointConnectionError) as e:
        creds.get_frozen_credentials()
    err = _classify(e.value, "GET s3://b/k")
    assert isinstance(err, CredentialsFailed) and err.errno == errno.EACCES
    assert str(err).startswith("GET s3://b/k: the credential provider failed: assume-role: "
                               "EndpointConnectionError")
    assert "s" * 40 not in str(err) and "t" * 64 not in str(err)
    try:
        raise bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/")
    except bexc.EndpointConnectionError as s3_down:
        assert isinstance(_classify(s3_down, "GET s3://b/k"), Unreachable)

    port = free_port()
    provider = ContainerProvider(
        environ={"AWS_CONTAINER_CREDENTIALS_FULL_URI": f"http://127.0.0.1:{port}/creds"},
        fetcher=ContainerMetadataFetcher(sleep=lambda s: None))
    with pytest.raises(bexc.CredentialRetrievalError) as e2:
        provider.load()
    err = _classify(e2.value, "LIST s3://b/")
    assert isinstance(err, CredentialsFailed) and err.errno == errno.EACCES
    assert "the credential provider failed: container credentials endpoint: " in str(err)
