"""Settings: one frozen object built from flags, then environment, then the env file.

Precedence (highest first): command-line flags, ``S3STASHFS_*`` environment variables, the env
file (``~/.s3stashfs.env`` or the file named by ``S3STASHFS_ENV``). Anything malformed raises
:class:`ConfigError` with one line naming the key and what is wrong.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dotenv.parser import parse_stream

from .errors import ConfigError

PREFIX = "S3STASHFS_"
ENV_FILE_VAR = "S3STASHFS_ENV"
DEFAULT_METADATA_TTL = 5.0
DEFAULT_TIMEOUT = 5.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
OFFLINE_WRITES = ("refuse", "queue")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


@dataclasses.dataclass(frozen=True)
class Space:
    """An amount of disk space: ``bytes``, or ``percent`` of the filesystem it is on."""

    bytes: int = 0
    percent: float = 0.0

    def of(self, fs_total: int) -> int:
        """In bytes, for a filesystem of ``fs_total`` bytes."""
        return self.bytes if not self.percent else int(fs_total * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else str(self.bytes)


DEFAULT_CACHE_MIN_FREE = Space(percent=5.0)
DEFAULT_READ_AHEAD_MEMORY = 64 << 20


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the mount needs to know; built once, never changed."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    bucket: str | None = None  # --bucket NAME[/PREFIX]: the root is this bucket
    prefix: str = ""  # with ``bucket``: the key prefix shown as the root ('' or ending in '/')
    buckets: tuple[str, ...] = ()  # buckets shown at the root instead of ListBuckets
    cache_dir: Path = Path()
    file_mode: int = 0o600
    metadata_ttl: float = DEFAULT_METADATA_TTL
    log_file: Path | None = None
    log_level: str = "INFO"
    read_only: bool = False
    allow_other: bool = False
    xattrs: bool = False  # user.* xattrs <-> x-amz-meta-* (costs `ls -l` a round trip per file)
    foreground: bool = False
    addressing_style: str = "auto"
    # names (globs on the last path component) that live in the cache only, never uploaded:
    # editors' swap, lock and probe files by default
    local_only: tuple[str, ...] = (".*.swp", ".*.swo", ".*.swx", ".*.swpx", "4913", ".#*", "#*#",
                                   ".~lock.*#", "~$*")
    multipart_threshold_mb: int = 8  # files larger than this are uploaded in parts
    part_size_mb: int = 8  # grown as needed so that an object fits in 10,000 parts
    # while S3 is unreachable: "refuse" every change at once (ENETUNREACH), or "queue" it in
    # the cache and apply it once S3 answers
    offline_writes: str = "refuse"
    cache_max_size: int | None = None  # bytes the cache may hold (None: no limit)
    cache_min_free: Space = DEFAULT_CACHE_MIN_FREE  # the cache evicts to keep this much free
    # read-ahead requested from S3 and not yet arrived, across all open files (budget.py)
    read_ahead_memory: int = DEFAULT_READ_AHEAD_MEMORY
    # seconds a metadata request waits for S3's answer; the other waits scale with it
    # (store.Timeouts): connecting 0.4x, between two reads of a download 2x, an upload 6x
    timeout: float = DEFAULT_TIMEOUT
    # real AWS (docs/SEMANTICS.md, "Real AWS"): unsigned requests for public buckets; the
    # requester-pays header on every request; the CA bundle and certificate checking of HTTPS
    no_sign_request: bool = False
    requester_pays: bool = False
    ca_bundle: Path | None = None  # None: boto3's (AWS_CA_BUNDLE, the profile's ca_bundle, certifi)
    no_verify_ssl: bool = False
    noexec: bool = False  # the mount refuses to execute its files (mount option noexec)
    # AWS_* lines of the env file, handed to boto3's credential chain; never logged.
    aws_env: tuple[tuple[str, str], ...] = dataclasses.field(default=(), repr=False)

    @property
    def origin(self) -> str:
        """Which S3 service the cache entries belong to."""
        return self.endpoint_url or "aws"


def _parse_endpoint(v: str) -> str:
    if not re.match(r"^https?://[^\s/]+", v):
        raise ValueError("must be an http:// or https:// URL")
    return v.rstrip("/")


def _parse_bucket(v: str) -> tuple[str, str]:
    name, _, prefix = v.strip("/").partition("/")
    if not _BUCKET_RE.match(name):
        raise ValueError(f"{name!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    return name, (prefix + "/") if prefix else ""


def _parse_buckets(v: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in v.split(",") if n.strip())
    for n in names:
        if not _BUCKET_RE.match(n):
            raise ValueError(f"{n!r} is not a valid bucket name")
    return names


def _parse_mode(v: str) -> int:
    if not re.fullmatch(r"0?o?[0-7]{3,4}", v.strip()):
        raise ValueError("must be an octal file mode such as 0600")
    mode = int(v.strip().replace("o", ""), 8)
    if mode & ~0o777:
        raise ValueError("must be a permission mode between 0000 and 0777")
    if not mode & 0o600 == 0o600:
        raise ValueError("must let the owner read and write (at least 0600)")
    return mode


def _parse_ttl(v: str) -> float:
    try:
        ttl = float(v)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0 <= ttl <= 86400:
        raise ValueError("must be between 0 and 86400 seconds")
    return ttl


def _parse_timeout(v: str) -> float:
    try:
        t = float(v)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 1 <= t <= 300:
        raise ValueError("must be between 1 and 300 seconds")
    return t


def _parse_level(v: str) -> str:
    if v.upper() not in LOG_LEVELS:
        raise ValueError("must be one of " + ", ".join(LOG_LEVELS))
    return v.upper()


def _parse_bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def _parse_style(v: str) -> str:
    if v not in ("auto", "path", "virtual"):
        raise ValueError("must be auto, path or virtual")
    return v


def _parse_offline_writes(v: str) -> str:
    if v.strip().lower() not in OFFLINE_WRITES:
        raise ValueError("must be " + " or ".join(OFFLINE_WRITES))
    return v.strip().lower()


def _mib(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise ValueError("must be a whole number of MiB") from None
    if not 5 <= n <= 5120:
        raise ValueError("must be between 5 and 5120 MiB (S3's part size limits)")
    return n


def parse_size(v: str) -> int:
    """``500M``, ``20G``, ``1.5T``, ``4096``: binary units (K = 1024), an optional ``B``/``iB``."""
    m = _SIZE_RE.fullmatch(v.strip())
    if not m:
        raise ValueError("must be a size such as 4096, 500M, 20G or 1.5T")
    n = float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if n != int(n) and not m.group(2):
        raise ValueError("must be a whole number of bytes")
    return int(n)


def _max_size(v: str) -> int | None:
    if v.strip().lower() in ("0", "none"):
        return None
    return parse_size(v)


def _read_ahead_memory(v: str) -> int:
    n = parse_size(v)
    if not 1 << 20 <= n <= 64 << 30:
        raise ValueError("must be between 1M and 64G")
    return n


def _min_free(v: str) -> Space:
    text = v.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError("must be a size such as 1G or a percentage such as 5%") from None
        if not 0 <= pct < 100:
            raise ValueError("must be a percentage from 0% to under 100%")
        return Space(percent=pct)
    try:
        return Space(bytes=parse_size(text))
    except ValueError:
        raise ValueError("must be a size such as 1G or a percentage such as 5%") from None


def _globs(v: str) -> tuple[str, ...]:
    globs = tuple(g.strip() for g in v.split(",") if g.strip())
    for g in globs:
        if "/" in g:
            raise ValueError(f"{g!r}: patterns match file names, so they cannot contain '/'")
    return globs


def _nonempty(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v.strip()


def _path(v: str) -> Path:
    return Path(_nonempty(v)).expanduser()


# setting name -> (parser, environment key). The flag of the same name wins over both.
_SPECS: dict[str, tuple[Callable[[str], Any], str]] = {
    "endpoint_url": (_parse_endpoint, "S3STASHFS_ENDPOINT_URL"),
    "region": (_nonempty, "S3STASHFS_REGION"),
    "profile": (_nonempty, "S3STASHFS_PROFILE"),
    "bucket": (_parse_bucket, "S3STASHFS_BUCKET"),
    "buckets": (_parse_buckets, "S3STASHFS_BUCKETS"),
    "cache_dir": (_path, "S3STASHFS_CACHE_DIR"),
    "file_mode": (_parse_mode, "S3STASHFS_FILE_MODE"),
    "metadata_ttl": (_parse_ttl, "S3STASHFS_METADATA_TTL"),
    "log_file": (_path, "S3STASHFS_LOG_FILE"),
    "log_level": (_parse_level, "S3STASHFS_LOG_LEVEL"),
    "read_only": (_parse_bool, "S3STASHFS_READ_ONLY"),
    "allow_other": (_parse_bool, "S3STASHFS_ALLOW_OTHER"),
    "xattrs": (_parse_bool, "S3STASHFS_XATTRS"),
    "addressing_style": (_parse_style, "S3STASHFS_ADDRESSING_STYLE"),
    "local_only": (_globs, "S3STASHFS_LOCAL_ONLY"),
    "multipart_threshold_mb": (_mib, "S3STASHFS_MULTIPART_THRESHOLD_MB"),
    "part_size_mb": (_mib, "S3STASHFS_PART_SIZE_MB"),
    "offline_writes": (_parse_offline_writes, "S3STASHFS_OFFLINE_WRITES"),
    "cache_max_size": (_max_size, "S3STASHFS_CACHE_MAX_SIZE"),
    "cache_min_free": (_min_free, "S3STASHFS_CACHE_MIN_FREE"),
    "read_ahead_memory": (_read_ahead_memory, "S3STASHFS_READ_AHEAD_MEMORY"),
    "timeout": (_parse_timeout, "S3STASHFS_TIMEOUT"),
    "no_sign_request": (_parse_bool, "S3STASHFS_NO_SIGN_REQUEST"),
    "requester_pays": (_parse_bool, "S3STASHFS_REQUESTER_PAYS"),
    "ca_bundle": (_path, "S3STASHFS_CA_BUNDLE"),
    "no_verify_ssl": (_parse_bool, "S3STASHFS_NO_VERIFY_SSL"),
    "noexec": (_parse_bool, "S3STASHFS_NOEXEC"),
}
_ENV_KEYS = {env for _, env in _SPECS.values()} | {ENV_FILE_VAR}
# The shape of each setting, for the command line (cli.py, fstab.py): every setting NAME is the
# flag --NAME-WITH-DASHES and the mount option NAME[=VALUE]; switches take no value.
SETTINGS = tuple(_SPECS)
SWITCHES = frozenset(n for n, (parse, _) in _SPECS.items() if parse is _parse_bool)
LISTS = frozenset(n for n, (parse, _) in _SPECS.items() if parse in (_parse_buckets, _globs))


def env_key(name: str) -> str:
    return _SPECS[name][1]


def to_env(settings: Settings) -> dict[str, str]:
    """The settings as ``S3STASHFS_*`` variables that :func:`load` reads back to the same
    values: how ``mount`` hands what it resolved (flags included) to its daemon."""
    env = {}
    for name, (_, key) in _SPECS.items():
        value = getattr(settings, name)
        if name == "bucket":
            value = value and value + ("/" + settings.prefix if settings.prefix else "")
        elif name == "file_mode":
            value = oct(value)[2:].rjust(4, "0")
        elif name == "cache_max_size" and value is None:
            value = "none"
        if value is None:
            continue
        if isinstance(value, bool):
            env[key] = "1" if value else "0"
        elif isinstance(value, tuple):
            env[key] = ",".join(value)
        elif isinstance(value, float):
            env[key] = repr(value)
        else:
            env[key] = str(value)
    return env


def env_file_path(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The env file to read, and whether the user named it explicitly."""
    named = environ.get(ENV_FILE_VAR)
    if named:
        return Path(named).expanduser(), True
    return Path(environ.get("HOME", "~")).expanduser() / ".s3stashfs.env", False


def read_env_file(path: Path, explicit: bool) -> dict[str, str]:
    """Parse the env file strictly: any line python-dotenv cannot parse is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            bindings = list(parse_stream(f))
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{ENV_FILE_VAR}: env file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"env file {path}: cannot be read: {e}") from None
    values: dict[str, str] = {}
    for b in bindings:
        if b.error:
            raise ConfigError(f"env file {path}, line {b.original.line}: cannot parse "
                              f"{b.original.string.strip()[:40]!r} (expected KEY=value)")
        if b.key is None:
            continue
        if b.key.startswith(PREFIX) and b.key not in _ENV_KEYS:
            raise ConfigError(f"env file {path}, line {b.original.line}: unknown setting {b.key}")
        values[b.key] = b.value if b.value is not None else ""
    return values


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "s3stashfs"


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings. ``flags`` maps setting names to values already typed by argparse
    (None = not given); string values from flags are parsed like the environment's."""
    environ = os.environ if environ is None else environ
    path, explicit = env_file_path(environ)
    file_values = read_env_file(path, explicit)
    values: dict[str, Any] = {}
    for name, (parse, env_key) in _SPECS.items():
        flag = flags.get(name)
        if flag is not None and flag is not False:
            source, raw = f"--{name.replace('_', '-')}", flag
        elif env_key in environ:
            source, raw = env_key, environ[env_key]
        elif env_key in file_values:
            source, raw = f"{env_key} (in {path})", file_values[env_key]
        else:
            continue
        if not isinstance(raw, str):
            values[name] = raw
            continue
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise ConfigError(f"{source}: {raw!r} {e}") from None
    bucket = values.pop("bucket", None)
    if bucket is not None:
        values["bucket"], values["prefix"] = bucket
    values.setdefault("cache_dir", default_cache_dir(environ))
    values["cache_dir"] = Path(os.path.abspath(values["cache_dir"]))
    for name in ("log_file", "ca_bundle"):
        if values.get(name) is not None:
            values[name] = Path(os.path.abspath(values[name]))
    if flags.get("debug"):
        values["log_level"] = "DEBUG"
    values["foreground"] = bool(flags.get("foreground"))
    values["aws_env"] = tuple((k, v) for k, v in file_values.items() if k.startswith("AWS_"))
    return Settings(**values)
