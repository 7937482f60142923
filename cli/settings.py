"""Mount settings from a TOML file, the environment and flags, in rising precedence.

One table (`SETTINGS`) names every setting once: its long option
(``--cache-size``), its key in the file (``cache-size`` or ``cache_size``)
and its variable (``S3CACHEFS_CACHE_SIZE``). Unknown keys and variables, and
bad values, are errors that name where they came from. An unknown
``S3CACHEFS_*`` variable is only a warning (wrapper scripts and the test suite
set their own), unless it looks like a misspelt setting: that stays an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from s3cachefs.base.config import (
    ETAG_MD5_MODES,
    MountConfig,
    default_cache_dir,
    parse_interval,
    parse_size,
    parse_target,
    parse_ttl,
)
from s3cachefs.base.errors import ConfigError
from s3cachefs.base.logs import LEVELS

ENV_PREFIX = "S3CACHEFS_"
# Variables that are not mount settings.
OTHER_VARIABLES = {"S3CACHEFS_PROGRESS_INTERVAL"}
# How alike an unknown variable's name must be to a setting's to count as its typo
# (difflib ratio of the parts after the prefix: CACHE_SIZ 0.95, SOAK_SECONDS 0.45).
TYPO_CUTOFF = 0.8


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"bad size {value!r}")
    return value if isinstance(value, int) else parse_size(str(value))


def _kib(value: Any) -> int:
    size = _size(value)
    if size % 1024:
        raise ConfigError(f"bad size {value!r}: the kernel takes whole KiB (e.g. 128K, 1M)")
    return size


def _ttl(value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"bad TTL {value!r}: use seconds or 'indefinite'")
    return parse_ttl(str(value))  # also TOML numbers: inf and nan are refused there


def _timeout(value: Any) -> float:
    if str(value).strip().lower() == "indefinite":  # a read must never wait forever
        raise ConfigError(f"bad timeout {value!r}: use a number of seconds")
    seconds = _ttl(value)
    if seconds <= 0:
        raise ConfigError(f"bad timeout {value!r}: must be more than 0 seconds")
    return seconds


def _endpoint(value: Any) -> str:
    """``http(s)://host[:port][/path]``: botocore's own error for anything else is a traceback."""
    text = str(value).strip()
    try:
        parts = urlsplit(text)
        port = parts.port  # ValueError when it is not a number in range
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or (port is not None and not 0 < port < 65536)
        or parts.query
        or parts.fragment
    ):
        raise ConfigError(
            f"bad endpoint URL {text!r}: use http://HOST[:PORT] or https://HOST[:PORT]"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"bad endpoint URL for {parts.hostname}: no credentials in the URL "
            "(they would be logged); use the AWS credential chain"
        )
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"bad boolean {value!r}: use true or false")


def _interval(value: Any) -> float | None:
    if value is False:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) or None
    return parse_interval(str(value))


def _etag_md5(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ETAG_MD5_MODES:
        raise ConfigError(f"bad value {value!r}: use auto or off")
    return text


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"bad number {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad number {value!r}") from None


def _count(value: Any) -> int:
    number = _int(value)
    if number < 1:
        raise ConfigError(f"bad number {value!r}: must be at least 1")
    return number


def _datasets(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f'bad dataset list {value!r}: use ["dataset-v3", ...]')


def _level(value: Any) -> str:
    if str(value).lower() not in LEVELS:
        raise ConfigError(f"bad log level {value!r}: one of {', '.join(LEVELS)}")
    return str(value).lower()


def seconds_variable(variable: str, default: float) -> float:
    """A variable holding seconds (``S3CACHEFS_PROGRESS_INTERVAL``): a finite number >= 0."""
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{variable}: bad value {raw!r}: use a number of seconds >= 0")
    return value


def jobs_arg(text: str) -> int:
    """``prefetch --jobs``: checked while parsing, so a bad value is a usage error (exit 2)."""
    try:
        return _count(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shard_arg(text: str) -> str:
    """``prefetch --shard I/N`` with 0 <= I < N, checked while parsing."""
    from s3cachefs.datasets.prefetch import parse_shard

    try:
        parse_shard(text)
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


@dataclass(frozen=True)
class Setting:
    name: str  # long option without the dashes; also the file key
    convert: Callable[[Any], Any]
    default: Any
    help: str
    flag: bool = True  # False: only positional on the command line (source, mountpoint)

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.attr.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("source", str, None, "BUCKET[/PREFIX] to mount", flag=False),
    Setting("mountpoint", Path, None, "where to mount it", flag=False),
    Setting("endpoint-url", _endpoint, None, "S3-compatible endpoint (MinIO, Ceph RGW, R2)"),
    Setting("region", str, None, "AWS region (default: from the AWS config)"),
    Setting("profile", str, None, "AWS profile for credentials"),
    Setting("cache-dir", Path, None, f"persistent cache (default {default_cache_dir()})"),
    Setting("cache-size", _size, "10G", "cache limit, e.g. 200G (default 10G)"),
    Setting("min-free", _size, "5G", "disk space to keep free (default 5G)"),
    Setting("metadata-ttl", _ttl, "60", "seconds listings are trusted, or 'indefinite' (60)"),
    Setting("allow-other", _bool, False, "let other users (container uids) use the mount"),
    Setting("log-level", _level, "info", "debug, info, warning or error"),
    Setting("log-file", Path, None, "background log (default: CACHE_DIR/daemon.log)"),
    Setting("s3-concurrency", _count, 64, "parallel S3 requests (default 64)"),
    Setting("readahead", _size, "32M", "most bytes fetched ahead of a reader (default 32M)"),
    Setting("block-size", _size, "1M", "block size of a new cache dir (default 1M)"),
    Setting("fetch-size", _size, "8M", "most bytes one ranged GET covers (default 8M)"),
    Setting("kernel-readahead", _kib, "1M", "the mount's kernel readahead (0: kernel's)"),
    Setting("no-keep-cache", _bool, False, "drop the page cache at every open (measurements)"),
    Setting("metrics-address", str, None, "serve Prometheus /metrics at HOST:PORT (off)"),
    Setting("s3-timeout", _timeout, "30", "seconds an S3 connection may stall before a retry (30)"),
    Setting("writable", _bool, False, "write-through: new files go to S3 on close (off)"),
    Setting("allow-overwrite", _bool, False, "with --writable: let writes replace objects"),
    Setting("allow-delete", _bool, False, "with --writable: let unlink/rmdir delete objects"),
    Setting("upload-part-size", _size, "8M", "multipart part size for writes (default 8M)"),
    Setting(
        "kernel-serve-pinned",
        _bool,
        True,
        "bind complete pinned datasets read-only over their dirs: the kernel serves them (on)",
    ),
    Setting(
        "verify-interval",
        _interval,
        "24h",
        "re-check kernel-served datasets this often, e.g. 12h (24h; off: at start only)",
    ),
    Setting(
        "etag-md5",
        _etag_md5,
        "auto",
        "auto: single-part ETags are MD5s and reads check them; off: this server's are not",
    ),
    # Read by `s3cachefs prefetch --config`, not by the mount.
    Setting("prefetch", _datasets, None, "datasets to prefetch", flag=False),
)
BY_NAME = {s.name: s for s in SETTINGS}
_BOOLEAN = {"allow-other", "no-keep-cache", "writable", "allow-overwrite", "allow-delete"}
_TOGGLES = {"kernel-serve-pinned"}  # --NAME and --no-NAME


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only what the user typed overrides file and env."""
    parser.add_argument("source", metavar="BUCKET[/PREFIX]", nargs="?")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    parser.add_argument("--config", type=Path, help="TOML file with these settings")
    for s in SETTINGS:
        if not s.flag:
            continue
        if s.name in _BOOLEAN:
            parser.add_argument(f"--{s.name}", action="store_const", const=True, help=s.help)
        elif s.name in _TOGGLES:
            parser.add_argument(f"--{s.name}", action=argparse.BooleanOptionalAction, help=s.help)
        else:
            parser.add_argument(f"--{s.name}", help=s.help)


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str], notes: list[str] | None = None
) -> dict[str, Any]:
    """Defaults < file < environment < flags; every value converted and checked.

    Warnings (unknown variables) are appended to ``notes`` for the caller to show.
    """
    values = {s.name: s.convert(s.default) if s.default is not None else None for s in SETTINGS}
    config_path = args.config or (
        Path(environ["S3CACHEFS_CONFIG"]) if environ.get("S3CACHEFS_CONFIG") else None
    )
    if config_path is not None:
        for key, raw in read_file(config_path).items():
            name = key.replace("_", "-")
            if name not in BY_NAME:
                raise ConfigError(f"{config_path}: unknown key {key!r}")
            values[name] = _convert(BY_NAME[name], raw, f"{config_path}: {key}")
    for variable, raw in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in OTHER_VARIABLES:
            continue
        if variable == "S3CACHEFS_CONFIG":
            continue
        name = variable.removeprefix(ENV_PREFIX).lower().replace("_", "-")
        if name not in BY_NAME:
            warning = unknown_variable(variable)
            if notes is not None:
                notes.append(warning)
            continue
        values[name] = _convert(BY_NAME[name], raw, variable)
    for s in SETTINGS:
        raw = getattr(args, s.attr, None)
        if raw is not None:
            values[s.name] = _convert(s, raw, f"--{s.name}" if s.flag else s.name)
    return values


def unknown_variable(variable: str) -> str:
    """The warning for an ``S3CACHEFS_*`` variable that is no setting; a near miss is an error.

    Wrapper scripts and test suites name their own variables with our prefix
    (``S3CACHEFS_BIN``, ``S3CACHEFS_SOAK_SECONDS``): those only warn. One that
    is spelt almost like a setting (``S3CACHEFS_CACHE_SIZ``) is a typo whose
    value would silently not apply, so it stays an error.
    """
    known = [s.variable for s in SETTINGS] + sorted(OTHER_VARIABLES | {"S3CACHEFS_CONFIG"})
    suffixes = {v.removeprefix(ENV_PREFIX): v for v in known}
    close = difflib.get_close_matches(
        variable.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=TYPO_CUTOFF
    )
    if close:
        raise ConfigError(
            f"unknown environment variable {variable} (did you mean {suffixes[close[0]]}?)"
        )
    return f"ignoring environment variable {variable}: no such setting"


def read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return data


def _convert(setting: Setting, raw: Any, where: str) -> Any:
    try:
        return setting.convert(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: bad value {raw!r} ({exc})") from None


def mount_config(values: Mapping[str, Any]) -> MountConfig:
    if values["source"] is None or values["mountpoint"] is None:
        raise ConfigError(
            "mount needs BUCKET[/PREFIX] and MOUNTPOINT (arguments, or source and "
            "mountpoint in --config)"
        )
    bucket, prefix = parse_target(values["source"])
    cache_dir = values["cache-dir"] or default_cache_dir()
    # A setting named like a MountConfig field passes through; the rest are converted here.
    fields = {f.name for f in dataclasses.fields(MountConfig)} - {"cache_dir"}
    same = {s.attr: values[s.name] for s in SETTINGS if s.flag and s.attr in fields}
    return MountConfig(
        **same,
        bucket=bucket,
        prefix=prefix,
        mountpoint=Path(os.path.abspath(values["mountpoint"])),
        cache_dir=Path(os.path.abspath(cache_dir)),
        keep_cache=not values["no-keep-cache"],
        kernel_readahead_kib=values["kernel-readahead"] // 1024,
        readahead_size=values["readahead"],
    )
