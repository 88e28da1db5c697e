"""Mounting from /etc/fstab: mount.fuse's calling convention, -o options, install-mount-helper,
and every setting in one place (flag, S3STASHFS_* variable, env-file key, -o option, README).

The mounts are made by the real mount(8) and mount.fuse3 against moto_server; the real
/etc/fstab is never read or written (mount --fstab names a temporary one).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import helpers
from conftest import BIN_DIR, S3STASHFS_BIN, clean_environ
from s3stashfs import cli, config, fstab
from s3stashfs.config import Space

README = Path(__file__).resolve().parent.parent / "README.md"
SYSTEM_HELPER = Path(fstab.DEFAULT_HELPER_DIR) / "s3stashfs"
MOUNT_TIMEOUT = 60

# One -o option per setting and the value it must give. A setting added to config._SPECS
# without a line here fails test_every_setting_has_a_sample.
SAMPLES = {
    "endpoint_url": ("endpoint_url=http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "region": ("region=eu-west-1", "eu-west-1"),
    "profile": ("profile=lab", "lab"),
    "bucket": ("bucket=lab-data/runs", "lab-data"),
    "buckets": ("buckets=lab-a:lab-b", ("lab-a", "lab-b")),
    "cache_dir": ("cache_dir=/var/cache/s3", Path("/var/cache/s3")),
    "file_mode": ("file_mode=0640", 0o640),
    "metadata_ttl": ("metadata_ttl=30", 30.0),
    "log_file": ("log_file=/var/log/s3stashfs.log", Path("/var/log/s3stashfs.log")),
    "log_level": ("log_level=warning", "WARNING"),
    "read_only": ("read_only", True),
    "allow_other": ("allow_other", True),
    "xattrs": ("xattrs", True),
    "addressing_style": ("addressing_style=virtual", "virtual"),
    "local_only": ("local_only=*.tmp:~*", ("*.tmp", "~*")),
    "multipart_threshold_mb": ("multipart_threshold_mb=64", 64),
    "part_size_mb": ("part_size_mb=16", 16),
    "offline_writes": ("offline_writes=queue", "queue"),
    "cache_max_size": ("cache_max_size=20G", 20 << 30),
    "cache_min_free": ("cache_min_free=10%", Space(percent=10.0)),
    "read_ahead_memory": ("read_ahead_memory=256M", 256 << 20),
    "timeout": ("timeout=12.5", 12.5),
    "no_sign_request": ("no_sign_request", True),
    "requester_pays": ("requester_pays", True),
    "ca_bundle": ("ca_bundle=/etc/ssl/lab-ca.pem", Path("/etc/ssl/lab-ca.pem")),
    "no_verify_ssl": ("no_verify_ssl", True),
    "noexec": ("noexec", True),
}

# what mount(8), mount.fuse3 and systemd pass, or users write, that s3stashfs must accept
STANDARD = ("rw,defaults,auto,noauto,nofail,_netdev,user,users,nouser,owner,group,dev,nodev,"
            "suid,nosuid,exec,async,atime,noatime,relatime,strictatime,nodiratime,lazytime,"
            "default_permissions,x-systemd.automount,x-systemd.idle-timeout=10min,"
            "x-systemd.mount-timeout=30,x-gvfs-hide,comment=lab data")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """os.environ without S3STASHFS_*/AWS_* and with an empty home: settings come from the
    command line alone."""
    for name in list(os.environ):
        if name.startswith(("S3STASHFS_", "AWS_", "XDG_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def settings_of(argv):
    parser = cli.build_parser()
    return cli._settings(parser.parse_args(fstab.rewrite_argv(argv, parser.commands)))


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([str(S3STASHFS_BIN), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ------------------------------------------------------------------------ the -o options


def test_every_setting_has_a_sample():
    assert set(SAMPLES) == set(config.SETTINGS), "add the new setting to SAMPLES"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_setting_as_a_mount_option(name, clean_env):
    option, expected = SAMPLES[name]
    s = settings_of(["none", "/mnt/data", "-o", f"rw,{option},_netdev"])
    assert getattr(s, name) == expected
    if name == "bucket":
        assert s.prefix == "runs/"


def test_every_mount_option_also_reaches_the_daemon(clean_env):
    """The CLI hands what it resolved to the daemon as S3STASHFS_* variables (config.to_env):
    read back, they give the same settings."""
    options = ",".join(o for o, _ in SAMPLES.values())
    s = settings_of(["none", "/mnt/data", "-o", options])
    assert config.load({}, {**config.to_env(s), "HOME": str(clean_env)}) == s


def test_ro_and_debug_and_env_file(clean_env):
    env_file = clean_env / "lab.env"
    env_file.write_text("S3STASHFS_REGION=eu-north-1\nS3STASHFS_CACHE_DIR=/srv/cache\n")
    s = settings_of(["lab-data", "/mnt/data", "-o", f"ro,debug,env_file={env_file},cache_dir=/c"])
    assert (s.read_only, s.log_level, s.region) == (True, "DEBUG", "eu-north-1")
    assert s.cache_dir == Path("/c")  # an option wins over the env file
    assert os.environ["S3STASHFS_ENV"] == str(env_file)  # and the daemon reads the same file


def test_standard_options_are_accepted_and_change_nothing(clean_env):
    parser = cli.build_parser()
    argv = fstab.rewrite_argv(["lab-data", "/mnt/data", "-o", STANDARD], parser.commands)
    assert argv == ["mount", "/mnt/data", "--bucket", "lab-data"]
    assert settings_of(["lab-data", "/mnt/data", "-o", STANDARD]) == settings_of(
        ["mount", "/mnt/data", "--bucket", "lab-data"])


@pytest.mark.parametrize("argv,bucket,prefix", [
    (["lab-data/runs/2024", "/mnt/d", "-o", "rw"], "lab-data", "runs/2024/"),
    (["s3stashfs#lab-data", "/mnt/d", "-o", "rw"], "lab-data", ""),
    (["none", "/mnt/d", "-o", "rw"], None, ""),
    (["s3stashfs", "/mnt/d", "-o", "rw"], None, ""),
    (["/mnt/d", "-o", "rw,dev,suid"], None, ""),  # mount.fuse3 leaves out an empty SOURCE
    (["none", "/mnt/d", "-o", "bucket=other"], "other", ""),
])
def test_source_forms(argv, bucket, prefix, clean_env):
    s = settings_of(argv)
    assert (s.bucket, s.prefix) == (bucket, prefix)


def test_flags_and_options_the_later_wins_and_both_beat_the_environment(clean_env, monkeypatch):
    assert settings_of(["mount", "/m", "--cache-dir", "/a", "-o", "cache_dir=/b"]).cache_dir == Path("/b")
    assert settings_of(["mount", "/m", "-o", "cache_dir=/b", "--cache-dir", "/a"]).cache_dir == Path("/a")
    assert settings_of(["lab-data", "/m", "-o", "timeout=9", "--timeout", "7"]).timeout == 7.0
    monkeypatch.setenv("S3STASHFS_METADATA_TTL", "40")
    assert settings_of(["lab-data", "/m", "-o", "metadata_ttl=3"]).metadata_ttl == 3.0
    assert settings_of(["lab-data", "/m", "-o", "rw"]).metadata_ttl == 40.0


@pytest.mark.parametrize("options,message", [
    ("rw,foo,_netdev", "s3stashfs: unknown mount option 'foo' (see s3stashfs mount --help)"),
    ("uid=1000", "s3stashfs: unknown mount option 'uid=1000' (see s3stashfs mount --help)"),
    ("read_only=1", "s3stashfs: mount option 'read_only' takes no value (write just 'read_only')"),
    ("cache_dir", "s3stashfs: mount option 'cache_dir' needs a value (cache_dir=...)"),
    ("foreground", "s3stashfs: mount option 'foreground' is not available: mount(8) waits for "
                   "the program to exit, so it would never return"),
])
def test_bad_mount_option_exits_2_with_one_line(options, message, s3env, tmp_path):
    r = run_cli("lab-data", tmp_path, "-o", options, env=s3env)
    assert (r.returncode, r.stderr) == (2, message + "\n")
    assert not helpers.mounted_at(tmp_path)


def test_bad_value_in_an_option_names_its_flag(s3env, tmp_path):
    r = run_cli("lab-data", tmp_path, "-o", "metadata_ttl=soon", env=s3env)
    assert r.returncode == 2
    assert r.stderr == "s3stashfs: --metadata-ttl: 'soon' must be a number of seconds\n"


def test_a_mistyped_command_is_not_a_mount(s3env):
    r = run_cli("stauts", env=s3env)
    assert r.returncode == 2 and "invalid choice: 'stauts'" in r.stderr


# --------------------------------------------------------------- settings in one place


def readme_table() -> str:
    text = README.read_text()
    start = text.index("| setting | flag |")
    lines = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_every_setting_has_a_flag_a_variable_an_option_and_a_readme_row(tmp_path):
    """Walks config._SPECS: a setting added there without its flag, --help text or README row
    fails here."""
    help_text = re.sub(r"\s+", " ", run_cli("mount", "--help").stdout)
    table = readme_table()
    missing = []
    for name in config.SETTINGS:
        flag, key = "--" + name.replace("_", "-"), config.env_key(name)
        if not re.search(re.escape(flag) + r"\b(?!-)", help_text):
            missing.append(f"{flag} not in `s3stashfs mount --help`")
        if f"[{key}]" not in help_text:
            missing.append(f"[{key}] not in `s3stashfs mount --help`")
        if not re.search(r"`" + re.escape(flag) + r"[ `]", table):
            missing.append(f"{flag} not in README's settings table")
        if key not in table:
            missing.append(f"{key} not in README's settings table")
        option, expected = SAMPLES[name]
        value = option.partition("=")[2] or "1"
        if name in config.LISTS:
            value = value.replace(":", ",")
        (tmp_path / "x.env").write_text(f"{key}={value}\n")
        s = config.load({}, {"HOME": str(tmp_path), "S3STASHFS_ENV": str(tmp_path / "x.env")})
        if getattr(s, name) != expected:
            missing.append(f"{key} in an env file gives {getattr(s, name)!r}, not {expected!r}")
    assert not missing, "\n".join(missing)


# -------------------------------------------------------------- install-mount-helper


def test_install_mount_helper_links_and_uninstalls(tmp_path):
    target = os.path.realpath(S3STASHFS_BIN)
    r = run_cli("install-mount-helper", "--dir", tmp_path)
    assert r.returncode == 0, r.stderr
    link = tmp_path / "s3stashfs"
    assert os.readlink(link) == target
    assert f"linked {link} -> {target}" in r.stdout
    assert "is not on the PATH mount(8) gives helpers" in r.stdout
    assert subprocess.run([str(link), "--version"], capture_output=True).returncode == 0
    r = run_cli("install-mount-helper", "--dir", tmp_path)
    assert r.returncode == 0 and "already links to" in r.stdout
    r = run_cli("install-mount-helper", "--dir", tmp_path, "--uninstall")
    assert (r.returncode, r.stdout) == (0, f"s3stashfs: removed {link}\n")
    assert not os.path.lexists(link)
    r = run_cli("install-mount-helper", "--dir", tmp_path, "--uninstall")
    assert r.returncode == 0 and "nothing to remove" in r.stdout


def test_install_mount_helper_replaces_an_older_link_of_ours(tmp_path):
    old = tmp_path / "old-venv" / "bin" / "s3stashfs"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "s3stashfs").symlink_to(old)  # dangling: that venv is gone
    r = run_cli("install-mount-helper", "--dir", tmp_path / "bin")
    assert r.returncode == 0, r.stderr
    assert os.readlink(tmp_path / "bin" / "s3stashfs") == os.path.realpath(S3STASHFS_BIN)


def test_install_mount_helper_leaves_a_foreign_file_alone(tmp_path):
    foreign = tmp_path / "s3stashfs"
    foreign.write_text("#!/bin/sh\necho someone else's\n")
    r = run_cli("install-mount-helper", "--dir", tmp_path)
    assert r.returncode == 1
    assert r.stderr == (f"s3stashfs: {foreign} exists and is not a link made by "
                        "install-mount-helper; left alone (--force replaces it)\n")
    r = run_cli("install-mount-helper", "--dir", tmp_path, "--uninstall")
    assert r.returncode == 1
    assert r.stderr == f"s3stashfs: {foreign} is not a link made by install-mount-helper; left alone\n"
    assert foreign.read_text() == "#!/bin/sh\necho someone else's\n"
    r = run_cli("install-mount-helper", "--dir", tmp_path, "--force")
    assert r.returncode == 0 and os.readlink(foreign) == os.path.realpath(S3STASHFS_BIN)


# ----------------------------------------------------- real mounts by mount(8) and mount.fuse3


@pytest.fixture
def system_helper():
    """/usr/local/sbin/s3stashfs linking to this checkout's s3stashfs, made the way users make
    it (install-mount-helper) when nothing of that name is there, and removed afterwards."""
    target = os.path.realpath(S3STASHFS_BIN)
    if os.path.lexists(SYSTEM_HELPER):
        if os.path.realpath(SYSTEM_HELPER) != target:
            pytest.skip(f"{SYSTEM_HELPER} exists and is not this checkout's s3stashfs: not touched")
        yield SYSTEM_HELPER  # someone installed it: leave it as it was
        return
    created = False
    try:
        r = run_cli("install-mount-helper")
        assert r.returncode == 0, r.stderr
        created = True
        assert os.readlink(SYSTEM_HELPER) == target
        yield SYSTEM_HELPER
    finally:
        if created or os.path.lexists(SYSTEM_HELPER):
            r = run_cli("install-mount-helper", "--uninstall")
            assert r.returncode == 0, r.stderr
        assert not os.path.lexists(SYSTEM_HELPER)


def boot_env(s3env):
    """Like mount(8) at boot: no credentials or s3stashfs settings in the environment."""
    env = clean_environ(s3env)
    env.pop("S3STASHFS_ENV", None)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED"):
        env[name] = s3env[name]  # nothing of this machine's own AWS set-up
    return env


def mounted_by(tool_argv, m, env, log_file):
    """Run mount(8)/mount.fuse3; on success record the daemon on ``m`` (the mount fixture
    then unmounts it whatever happens)."""
    m.log_files.append(log_file)
    r = subprocess.run(tool_argv, capture_output=True, text=True, env=env, timeout=MOUNT_TIMEOUT)
    assert r.returncode == 0, f"{tool_argv}: {r.returncode} {r.stderr}\n{helpers.tail(log_file)}"
    m.pid = helpers.wait_for(m.read_pid, timeout=5, message=f"a PID in {m.lock_file}")
    m.mounted = True
    rows = helpers.mounted_at(m.path)
    assert rows and rows[0][2] == "fuse.s3stashfs", rows
    return r


def unmount_with_umount(m):
    """umount(8), as after an fstab mount; the daemon must finish by itself."""
    pid = m.pid
    try:
        r = subprocess.run(["umount", str(m.path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        helpers.wait_for(lambda: not helpers.pid_alive(pid), timeout=30,
                         message=f"daemon {pid} to exit after umount")
        assert not helpers.mounted_at(m.path)
        m.mounted = False
    finally:
        if helpers.mounted_at(m.path):
            subprocess.run(["umount", "-l", str(m.path)], capture_output=True, timeout=60)


def mount_options(path) -> set[str]:
    with open("/proc/mounts") as f:
        return next(set(line.split()[3].split(",")) for line in f if line.split()[1] == str(path))


def test_fstab_line_mounts_with_mount_and_unmounts_with_umount(
        mount, moto_server, s3, make_bucket, s3env, tmp_path, system_helper):
    """A line of a (temporary) fstab, as the user writes it, with credentials and endpoint in
    an env file named by env_file= since mount at boot passes no user's environment."""
    bucket = make_bucket()
    helpers.put_object(s3, bucket, "runs/2024/sample.txt", b"from S3\n")
    m = mount._new(bucket, (), None, None, moto_server.url)
    env_file = tmp_path / "s3stashfs.env"
    env_file.write_text(f"S3STASHFS_ENDPOINT_URL={moto_server.url}\n"
                        f"AWS_ACCESS_KEY_ID={s3env['AWS_ACCESS_KEY_ID']}\n"
                        f"AWS_SECRET_ACCESS_KEY={s3env['AWS_SECRET_ACCESS_KEY']}\n"
                        "AWS_DEFAULT_REGION=us-east-1\n")
    log_file = tmp_path / "fstab-mount.log"
    options = (f"noauto,_netdev,x-systemd.automount,x-systemd.idle-timeout=10min,allow_other,"
               f"env_file={env_file},cache_dir={m.cache_dir},log_file={log_file},"
               "offline_writes=queue")
    fstab_file = tmp_path / "fstab"
    fstab_file.write_text(f"# a test fstab\n{bucket}/runs {m.path} fuse.s3stashfs {options} 0 0\n")
    mounted_by(["mount", "--fstab", str(fstab_file), str(m.path)], m, boot_env(s3env), log_file)
    assert (m.path / "2024" / "sample.txt").read_bytes() == b"from S3\n"
    assert {"allow_other", "nosuid", "nodev"} <= mount_options(m.path)
    (m.path / "2024" / "new.txt").write_bytes(b"written\n")
    assert s3.get_object(Bucket=bucket, Key="runs/2024/new.txt")["Body"].read() == b"written\n"
    unmount_with_umount(m)


def test_mount_t_fuse_with_type_hash_source_and_ro(
        mount, moto_server, s3, make_bucket, s3env, tmp_path, system_helper):
    """The older fstab form `s3stashfs#BUCKET MOUNTPOINT fuse OPTIONS`, credentials from the
    environment (mount(8) keeps it), ro, noexec, and the options mount.fuse3 adds itself
    (dev,suid: the mount stays nosuid,nodev)."""
    bucket = make_bucket()
    helpers.put_object(s3, bucket, "hello.txt", b"hello\n")
    m = mount._new(bucket, (), None, None, moto_server.url)
    log_file = tmp_path / "fuse-mount.log"
    options = (f"endpoint_url={moto_server.url},cache_dir={m.cache_dir},log_file={log_file},"
               "ro,_netdev,x-systemd.automount,allow_other,noexec")
    mounted_by(["mount", "-t", "fuse", f"s3stashfs#{bucket}", str(m.path), "-o", options], m,
               dict(s3env), log_file)
    assert (m.path / "hello.txt").read_bytes() == b"hello\n"
    assert {"ro", "nosuid", "nodev", "allow_other", "noexec"} <= mount_options(m.path)
    with pytest.raises(OSError) as e:
        (m.path / "new.txt").write_bytes(b"x")
    assert e.value.errno == 30  # EROFS
    unmount_with_umount(m)


def test_mount_fuse3_with_no_source_mounts_every_bucket(
        mount, moto_server, s3, make_bucket, s3env, tmp_path):
    """mount.fuse3 run directly keeps PATH, so the venv's s3stashfs is found without
    install-mount-helper; `type#` with nothing after it mounts every bucket."""
    bucket = make_bucket()
    helpers.put_object(s3, bucket, "a.txt", b"a\n")
    m = mount._new(None, (), None, None, moto_server.url)
    log_file = tmp_path / "fuse3.log"
    env = {**s3env, "PATH": f"{BIN_DIR}:{':'.join(fstab.MOUNT_PATH)}"}
    mount_fuse3 = shutil.which("mount.fuse3", path=":".join(fstab.MOUNT_PATH))
    assert mount_fuse3, "mount.fuse3 (package fuse3) is not installed"
    options = f"endpoint_url={moto_server.url},cache_dir={m.cache_dir},log_file={log_file},rw,_netdev"
    mounted_by([mount_fuse3, "s3stashfs#", str(m.path), "-o", options], m, env, log_file)
    assert bucket in os.listdir(m.path)
    assert (m.path / bucket / "a.txt").read_bytes() == b"a\n"
    unmount_with_umount(m)


SYSTEM_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "s3stashfs@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_system_unit_verifies_and_finds_the_installed_helper(tmp_path, system_helper):
    """systemd resolves the unit's bare `ExecStart=s3stashfs` on its own fixed path, which
    install-mount-helper's /usr/local/sbin is on; and the check can fail."""
    text = SYSTEM_UNIT.read_text()
    assert "ExecStart=s3stashfs mount --foreground --env-file /etc/s3stashfs/%i.env /%I" in text
    unit = tmp_path / "s3stashfs@mnt-data.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    unit.write_text(text.replace("ExecStart=s3stashfs ", "ExecStart=s3stashfs-missing "))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "s3stashfs-missing" in r.stderr


def test_drop_privileges_is_refused(s3env):
    """What mount.fuse3 runs for drop_privileges: the mountpoint is its /dev/fd/N."""
    r = run_cli("lab-data", "/dev/fd/3", "-o", "rw,dev,suid", env=s3env)
    assert (r.returncode, r.stderr) == (2, "s3stashfs: mountpoint /dev/fd/3: mount.fuse3's "
                                        "drop_privileges is not supported; umount the mountpoint "
                                        "it left behind\n")
