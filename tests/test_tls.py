"""TLS and proxies, as boto3 does them, on both paths (botocore and the direct GET/HEAD).

A moto_server of its own serves HTTPS on 127.0.0.1 with a certificate signed by a CA this
module makes (the ``cryptography`` package); the mount trusts it through AWS_CA_BUNDLE or
--ca-bundle, refuses it without (exit 1, one line), or skips the check (--no-verify-ssl, with
a warning at every mount). The proxy test puts a recording forward proxy (tests/proxy.py) in
HTTP_PROXY in front of the plain-HTTP moto_server."""
from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import signal
import ssl
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY,
    MOTO_SERVER_BIN,
    _die_with_parent,
    clean_environ,
    free_port,
)
from helpers import read_recording, tail, wait_for
from proxy import HttpProxy

DIRECT_UA = "s3stashfs (direct"
UNTRUSTED = ("s3stashfs: cannot reach S3: the server's TLS certificate is not trusted (",
             "); give its CA with --ca-bundle or AWS_CA_BUNDLE")


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate for 127.0.0.1, its key), all PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3stashfs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


class TlsMoto:
    """A moto_server on https://127.0.0.1:PORT with a certificate of our CA; its requests
    recorded (MOTO_ENABLE_RECORDING) for checking which path sent them."""

    def __init__(self, d: Path):
        self.ca, cert, key = make_certs(d)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.log_path, self.recording = d / "moto_tls.log", d / "recording.jsonl"
        env = clean_environ()
        env.update(MOTO_ENABLE_RECORDING="1", MOTO_RECORDER_FILEPATH=str(self.recording))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER_BIN), "-H", "127.0.0.1", "-p", str(self.port), "-c", str(cert),
                 "-k", str(key)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=d, start_new_session=True, preexec_fn=_die_with_parent)

    def answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"moto_server (TLS) exited:\n{tail(self.log_path)}")
        ctx = ssl.create_default_context(cafile=str(self.ca))
        try:
            urllib.request.urlopen(f"{self.url}/moto-api/config", context=ctx, timeout=2).read()
            return True
        except OSError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # by PID only
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def user_agents(self, bucket: str) -> list[tuple[str, str | None, str]]:
        """(method, key, User-Agent) of every request for ``bucket`` so far."""
        records, _ = read_recording(self.recording)
        return [(r.method, r.key, r.user_agent) for r in records if r.bucket == bucket]


@pytest.fixture(scope="module")
def tls_moto(tmp_path_factory):
    server = TlsMoto(tmp_path_factory.mktemp("tls"))
    try:
        wait_for(server.answers, timeout=30, interval=0.1, message="moto_server over TLS")
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def tls_bucket(tls_moto):
    """A bucket on the TLS server with one file, made by a boto3 client trusting our CA."""
    import boto3
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=tls_moto.url, verify=str(tls_moto.ca), region_name="us-east-1",
        aws_access_key_id=AWS_ACCESS_KEY_ID, aws_secret_access_key=AWS_SECRET_ACCESS_KEY)
    s3.create_bucket(Bucket="tls-bucket")
    s3.put_object(Bucket="tls-bucket", Key="hello.txt", Body=b"over TLS\n")
    return "tls-bucket"


def read_through(m) -> None:
    assert os.listdir(m.path) == ["hello.txt"]
    assert Path(m.path, "hello.txt").read_bytes() == b"over TLS\n"


def assert_direct(tls_moto, bucket: str) -> None:
    """The object was read by the direct path (and nothing fell back to botocore)."""
    gets = [ua for method, key, ua in tls_moto.user_agents(bucket)
            if key == "hello.txt" and method in ("GET", "HEAD")]
    assert gets and all(ua.startswith(DIRECT_UA) for ua in gets), gets


def test_trusted_through_aws_ca_bundle(mount, tls_moto, tls_bucket):
    m = mount(tls_bucket, endpoint_url=tls_moto.url, env={"AWS_CA_BUNDLE": str(tls_moto.ca)})
    read_through(m)
    assert_direct(tls_moto, tls_bucket)


def test_trusted_through_the_ca_bundle_flag(mount, tls_moto, tls_bucket):
    m = mount(tls_bucket, endpoint_url=tls_moto.url, extra_args=["--ca-bundle", tls_moto.ca])
    read_through(m)
    assert_direct(tls_moto, tls_bucket)


def test_an_untrusted_certificate_is_a_clear_error_at_mount(mount, tls_moto, tls_bucket):
    m, r = mount.run(tls_bucket, endpoint_url=tls_moto.url)
    err = r.stderr.decode()
    assert r.returncode == 1 and not m.is_mounted(), err
    line = err.strip().splitlines()[-1]
    assert line.startswith(UNTRUSTED[0]) and line.endswith(UNTRUSTED[1]), line
    assert "certificate" in line.split("(", 1)[1]  # the reason, e.g. "unable to get local issuer..."


def test_an_untrusted_certificate_with_a_cache_does_not_mount_offline(mount, tls_moto, tls_bucket):
    """A cache that could be served offline does not turn a certificate error into 'offline'."""
    m = mount(tls_bucket, endpoint_url=tls_moto.url, extra_args=["--ca-bundle", tls_moto.ca])
    read_through(m)
    m.unmount()
    m2, r = mount.run(tls_bucket, endpoint_url=tls_moto.url, cache_dir=m.cache_dir)
    assert r.returncode == 1 and not m2.is_mounted()
    assert r.stderr.decode().strip().splitlines()[-1].startswith(UNTRUSTED[0])


def test_no_verify_ssl_mounts_and_warns(mount, tls_moto, tls_bucket):
    m = mount(tls_bucket, endpoint_url=tls_moto.url, extra_args=["--no-verify-ssl"])
    m.expect_log(r"WARNING .*TLS certificates are not checked \(--no-verify-ssl\): ", required=True)
    read_through(m)
    assert_direct(tls_moto, tls_bucket)


def test_a_ca_bundle_that_cannot_be_loaded_stops_the_mount(mount, tls_moto, tls_bucket, tmp_path):
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    for arg in (bad, tmp_path / "missing.pem"):
        m, r = mount.run(tls_bucket, endpoint_url=tls_moto.url, extra_args=["--ca-bundle", arg])
        line = r.stderr.decode().strip().splitlines()[-1]
        assert r.returncode == 2 and not m.is_mounted(), line
        assert line.startswith(f"s3stashfs: CA bundle {arg} (--ca-bundle) cannot be used: "), line


def test_certificate_errors_of_both_paths_are_untrusted_not_unreachable(tls_moto, tls_bucket):
    """The exceptions botocore and urllib3 really raise on an untrusted certificate."""
    import boto3
    import urllib3
    from s3stashfs.errors import Untrusted
    from s3stashfs.store import _classify
    s3 = boto3.session.Session().client(
        "s3", endpoint_url=tls_moto.url, region_name="us-east-1",
        aws_access_key_id=AWS_ACCESS_KEY_ID, aws_secret_access_key=AWS_SECRET_ACCESS_KEY)
    pool = urllib3.PoolManager(retries=False)
    errors = []
    for call in (lambda: s3.head_bucket(Bucket=tls_bucket),
                 lambda: pool.request("HEAD", f"{tls_moto.url}/{tls_bucket}/hello.txt")):
        with pytest.raises(Exception) as e:
            call()
        errors.append(_classify(e.value, "op"))
    for err in errors:
        assert isinstance(err, Untrusted) and err.errno == errno.EIO, repr(err)
        assert str(err).startswith("op: the server's TLS certificate is not trusted (")


# ------------------------------------------------------------------ proxies
def proxied(proxy: HttpProxy, bucket: str) -> list[tuple[str, str]]:
    """(method, User-Agent kind) of the requests for ``bucket`` the forward proxy carried."""
    return [(method, "direct" if h.get("user-agent", "").startswith(DIRECT_UA) else "botocore")
            for method, path, h in proxy.seen if f"/{bucket}" in path]


def test_http_proxy_carries_both_paths_and_no_proxy_bypasses_it(mount, moto_server, s3, bucket):
    s3.put_object(Bucket=bucket, Key="p.txt", Body=b"proxied\n")
    proxy = HttpProxy(moto_server.host, moto_server.port)
    try:
        env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": None, "no_proxy": None}
        m = mount(bucket, env=env)
        assert Path(m.path, "p.txt").read_bytes() == b"proxied\n"
        seen = proxied(proxy, bucket)
        assert ("GET", "direct") in seen and ("GET", "botocore") in seen, seen  # key; listing
        assert all(path.startswith(moto_server.url + "/") for _, path, _ in proxy.seen)
        m.unmount()
        before = len(proxy.seen)
        m2 = mount(bucket, env={**env, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
        assert Path(m2.path, "p.txt").read_bytes() == b"proxied\n"
        assert os.listdir(m2.path) == ["p.txt"]
        assert len(proxy.seen) == before
    finally:
        proxy.close()
