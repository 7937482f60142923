"""Mount settings from a TOML file, the environment and flags, in rising precedence.

One table (`SETTINGS`) names every setting once: its long option
(``--cache-size``), its key in the file (``cache-size`` or ``cache_size``)
and its variable (``S3CACHEFS_CACHE_SIZE``). Unknown keys and variables, and
bad values, are errors that name where they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from s3cachefs.daemon.config import (
    MountConfig,
    default_cache_dir,
    parse_interval,
    parse_size,
    parse_target,
    parse_ttl,
)
from s3cachefs.daemon.errors import ConfigError
from s3cachefs.daemon.logs import LEVELS

ENV_PREFIX = "S3CACHEFS_"
# Variables that are not mount settings.
OTHER_VARIABLES = {"S3CACHEFS_PROGRESS_INTERVAL"}


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"bad size {value!r}")
    return value if isinstance(value, int) else parse_size(str(value))


def _ttl(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and value >= 0 else parse_ttl(str(value))


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


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad number {value!r}") from None


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
    Setting("endpoint-url", str, None, "S3-compatible endpoint (MinIO, Ceph RGW, R2)"),
    Setting("region", str, None, "AWS region (default: from the AWS config)"),
    Setting("profile", str, None, "AWS profile for credentials"),
    Setting("cache-dir", Path, None, f"persistent cache (default {default_cache_dir()})"),
    Setting("cache-size", _size, "10G", "cache limit, e.g. 200G (default 10G)"),
    Setting("min-free", _size, "5G", "disk space to keep free (default 5G)"),
    Setting("metadata-ttl", _ttl, "60", "seconds listings are trusted, or 'indefinite' (60)"),
    Setting("allow-other", _bool, False, "let other users (container uids) use the mount"),
    Setting("log-level", _level, "info", "debug, info, warning or error"),
    Setting("log-file", Path, None, "background log (default: CACHE_DIR/daemon.log)"),
    Setting("s3-concurrency", _int, 64, "parallel S3 requests (default 64)"),
    Setting("readahead", _size, "32M", "most bytes fetched ahead of a reader (default 32M)"),
    Setting("block-size", _size, "1M", "block size of a new cache dir (default 1M)"),
    Setting("fetch-size", _size, "8M", "most bytes one ranged GET covers (default 8M)"),
    Setting("kernel-readahead", _size, "1M", "the mount's kernel readahead (0: kernel's)"),
    Setting("no-keep-cache", _bool, False, "drop the page cache at every open (measurements)"),
    Setting("metrics-address", str, None, "serve Prometheus /metrics at HOST:PORT (off)"),
    Setting("s3-timeout", _ttl, "30", "seconds an S3 connection may stall before a retry (30)"),
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


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """Defaults < file < environment < flags; every value converted and checked."""
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
            raise ConfigError(f"unknown environment variable {variable}")
        values[name] = _convert(BY_NAME[name], raw, variable)
    for s in SETTINGS:
        raw = getattr(args, s.attr, None)
        if raw is not None:
            values[s.name] = _convert(s, raw, f"--{s.name}" if s.flag else s.name)
    return values


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
