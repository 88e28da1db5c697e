"""Unit tests of settings: precedence and clear one-line errors naming the key."""
import pytest

from s3stashfs import config
from s3stashfs.errors import ConfigError


def load(tmp_path, flags=None, env=None, file_text=None):
    environ = {"HOME": str(tmp_path)}
    if file_text is not None:
        (tmp_path / ".s3stashfs.env").write_text(file_text)
    environ.update(env or {})
    return config.load(flags or {}, environ)


def test_defaults(tmp_path):
    s = load(tmp_path)
    assert s.cache_dir == tmp_path / ".cache" / "s3stashfs"
    assert s.file_mode == 0o600
    assert s.metadata_ttl == config.DEFAULT_METADATA_TTL
    assert s.bucket is None and s.endpoint_url is None


def test_xdg_cache_home(tmp_path):
    s = load(tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert s.cache_dir == tmp_path / "xdg" / "s3stashfs"


def test_flags_beat_environment_beat_file(tmp_path):
    text = "S3STASHFS_METADATA_TTL=7\nS3STASHFS_REGION=eu-west-1\nS3STASHFS_FILE_MODE=0640\n"
    s = load(tmp_path, env={"S3STASHFS_METADATA_TTL": "3"}, file_text=text)
    assert (s.metadata_ttl, s.region, s.file_mode) == (3.0, "eu-west-1", 0o640)
    s = load(tmp_path, flags={"metadata_ttl": "1.5"}, env={"S3STASHFS_METADATA_TTL": "3"}, file_text=text)
    assert s.metadata_ttl == 1.5


def test_named_env_file(tmp_path):
    f = tmp_path / "other.env"
    f.write_text("S3STASHFS_BUCKET=lab-data/runs/2024\n")
    s = load(tmp_path, env={"S3STASHFS_ENV": str(f)})
    assert (s.bucket, s.prefix) == ("lab-data", "runs/2024/")


def test_missing_named_env_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="S3STASHFS_ENV.*does not exist"):
        load(tmp_path, env={"S3STASHFS_ENV": str(tmp_path / "nope.env")})


def test_unparsable_line_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"line 2: cannot parse"):
        load(tmp_path, file_text="S3STASHFS_REGION=x\nthis is not a setting\n")


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting S3STASHFS_CACHEDIR"):
        load(tmp_path, file_text="S3STASHFS_CACHEDIR=/tmp/x\n")


@pytest.mark.parametrize("key,value,message", [
    ("S3STASHFS_METADATA_TTL", "soon", "number of seconds"),
    ("S3STASHFS_METADATA_TTL", "-1", "between 0 and 86400"),
    ("S3STASHFS_FILE_MODE", "rw", "octal file mode"),
    ("S3STASHFS_FILE_MODE", "0400", "owner read and write"),
    ("S3STASHFS_ENDPOINT_URL", "localhost:9000", "http:// or https:// URL"),
    ("S3STASHFS_BUCKET", "Bad Bucket!", "not a valid bucket name"),
    ("S3STASHFS_LOG_LEVEL", "LOUD", "one of DEBUG"),
    ("S3STASHFS_OFFLINE_WRITES", "later", "must be refuse or queue"),
    ("S3STASHFS_TIMEOUT", "0.5", "between 1 and 300"),
    ("S3STASHFS_TIMEOUT", "never", "number of seconds"),
])
def test_bad_values_name_key_and_problem(tmp_path, key, value, message):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, file_text=f"{key}={value}\n")
    text = str(e.value)
    assert key in text and message in text and "\n" not in text


def test_aws_lines_go_to_boto3_and_not_to_repr(tmp_path):
    s = load(tmp_path, file_text="AWS_SECRET_ACCESS_KEY=sekrit-value\n")
    assert ("AWS_SECRET_ACCESS_KEY", "sekrit-value") in s.aws_env
    assert "sekrit-value" not in repr(s)


def test_offline_writes_default_refuse_and_its_sources(tmp_path):
    assert load(tmp_path).offline_writes == "refuse"
    assert load(tmp_path, file_text="S3STASHFS_OFFLINE_WRITES=queue\n").offline_writes == "queue"
    s = load(tmp_path, flags={"offline_writes": "refuse"}, env={"S3STASHFS_OFFLINE_WRITES": "queue"})
    assert s.offline_writes == "refuse"


def test_offline_writes_reaches_the_daemon(tmp_path):
    from s3stashfs import cli
    args = cli.build_parser().parse_args(["mount", str(tmp_path), "--offline-writes", "queue"])
    s = load(tmp_path, flags={"offline_writes": args.offline_writes})
    env = cli._settings_env(s)
    assert env["S3STASHFS_OFFLINE_WRITES"] == "queue"
    assert load(tmp_path, env=env).offline_writes == "queue"


def test_timeout_flag_reaches_the_settings(tmp_path, monkeypatch):
    from s3stashfs import cli
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("S3STASHFS_TIMEOUT", raising=False)
    args = cli.build_parser().parse_args(["mount", str(tmp_path), "--timeout", "12.5"])
    s = cli._settings(args)
    assert s.timeout == 12.5
    assert cli._settings_env(s)["S3STASHFS_TIMEOUT"] == "12.5"  # handed on to the daemon
    assert load(tmp_path).timeout == config.DEFAULT_TIMEOUT == 5.0


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_reply_the_kernel_no_longer_waits_for_is_not_an_error(tmp_path, level):
    """pyfuse3 logs an ERROR when the kernel refuses a reply; ENOENT (the request was
    interrupted, or aborted at unmount) is harmless and goes to DEBUG. Other refusals stay."""
    import logging
    from s3stashfs import mount as mount_mod
    log_file = tmp_path / "daemon.log"
    settings = load(tmp_path, flags={"log_file": str(log_file), "log_level": level})
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        mount_mod.setup_logging(settings)
        mount_mod.setup_logging(settings)  # a second setup leaves one filter, not two
        pyfuse3_log = logging.getLogger("pyfuse3")
        assert sum(isinstance(f, mount_mod._GoneReplyFilter) for f in pyfuse3_log.filters) == 1
        pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", "No such file or directory")
        pyfuse3_log.error("fuse_read(): fuse_reply_* failed with %s", "Invalid argument")
        for h in root.handlers:
            h.flush()
        text = log_file.read_text()
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
    assert "ERROR pyfuse3: fuse_read(): fuse_reply_* failed with Invalid argument" in text
    assert "ERROR pyfuse3: fuse_release()" not in text
    assert ("DEBUG pyfuse3: fuse_release(): fuse_reply_* failed with No such file" in text) == (level == "DEBUG")
