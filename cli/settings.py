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

from s3cachefs.base import values as v
from s3cachefs.base.config import MountConfig, default_cache_dir
from s3cachefs.base.errors import ConfigError
from s3cachefs.base.values import parse_target

ENV_PREFIX = "S3CACHEFS_"
# Variables that are not mount settings.
OTHER_VARIABLES = {"S3CACHEFS_PROGRESS_INTERVAL"}
# How alike an unknown variable's name must be to a setting's to count as its typo
# (difflib ratio of the parts after the prefix: CACHE_SIZ 0.95, SOAK_SECONDS 0.45).
TYPO_CUTOFF = 0.8


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
        return v.count(text)
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
    Setting("endpoint-url", v.endpoint, None, "S3-compatible endpoint (MinIO, Ceph RGW, R2)"),
    Setting("region", str, None, "AWS region (default: from the AWS config)"),
    Setting("profile", str, None, "AWS profile for credentials"),
    Setting("cache-dir", Path, None, f"persistent cache (default {default_cache_dir()})"),
    Setting("cache-size", v.size, "10G", "cache limit, e.g. 200G (default 10G)"),
    Setting("min-free", v.size, "5G", "disk space to keep free (default 5G)"),
    Setting("metadata-ttl", v.ttl, "60", "seconds listings are trusted, or 'indefinite' (60)"),
    Setting("allow-other", v.boolean, False, "let other users (container uids) use the mount"),
    Setting("log-level", v.level, "info", "debug, info, warning or error"),
    Setting("log-file", Path, None, "background log (default: CACHE_DIR/daemon.log)"),
    Setting("s3-concurrency", v.count, 64, "parallel S3 requests (default 64)"),
    Setting("readahead", v.size, "32M", "most bytes fetched ahead of a reader (default 32M)"),
    Setting("block-size", v.size, "1M", "block size of a new cache dir (default 1M)"),
    Setting("fetch-size", v.size, "8M", "most bytes one ranged GET covers (default 8M)"),
    Setting("kernel-readahead", v.kib, "1M", "the mount's kernel readahead (0: kernel's)"),
    Setting("no-keep-cache", v.boolean, False, "drop the page cache at every open (measurements)"),
    Setting("metrics-address", str, None, "serve Prometheus /metrics at HOST:PORT (off)"),
    Setting(
        "s3-timeout", v.timeout, "30", "seconds an S3 connection may stall before a retry (30)"
    ),
    Setting("writable", v.boolean, False, "write-through: new files go to S3 on close (off)"),
    Setting("allow-overwrite", v.boolean, False, "with --writable: let writes replace objects"),
    Setting("allow-delete", v.boolean, False, "with --writable: let unlink/rmdir delete objects"),
    Setting("upload-part-size", v.size, "8M", "multipart part size for writes (default 8M)"),
    Setting(
        "kernel-serve-pinned",
        v.boolean,
        True,
        "bind complete pinned datasets read-only over their dirs: the kernel serves them (on)",
    ),
    Setting(
        "verify-interval",
        v.interval,
        "24h",
        "re-check kernel-served datasets this often, e.g. 12h (24h; off: at start only)",
    ),
    Setting(
        "etag-md5",
        v.etag_md5,
        "auto",
        "auto: single-part ETags are MD5s and reads check them; off: this server's are not",
    ),
    # Read by `s3cachefs prefetch --config`, not by the mount.
    Setting("prefetch", v.datasets, None, "datasets to prefetch", flag=False),
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
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
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
