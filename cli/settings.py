"""Mount settings from a TOML file, the environment and flags, in rising precedence.

Built from the one settings table (base/settings.py): each setting's long option
(``--cache-size``), its key in the file (``cache-size`` or ``cache_size``) and its
variable (``S3CACHEFS_CACHE_SIZE``). Unknown keys and variables, and
bad values, are errors that name where they came from. An unknown
``S3CACHEFS_*`` variable is only a warning (wrapper scripts and the test suite
set their own), unless it looks like a misspelt setting: that stays an error.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from s3cachefs.base.config import MountConfig
from s3cachefs.base.errors import ConfigError
from s3cachefs.base.settings import ENV_PREFIX, SETTINGS, Setting, default_cache_dir, lookup
from s3cachefs.base.values import count, parse_shard, parse_target

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
        return count(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def shard_arg(text: str) -> str:
    """``prefetch --shard I/N`` with 0 <= I < N, checked while parsing."""
    try:
        parse_shard(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def add_mount_options(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only what the user typed overrides file and env."""
    for s in SETTINGS:
        if s.kind == "positional":  # optional here: the file or a variable may name it
            parser.add_argument(s.attr, metavar=s.metavar, nargs="?", help=s.help)
    parser.add_argument("--config", type=Path, help="TOML file with these settings")
    for s in SETTINGS:
        flag, shown = s.flag, s.shown_default
        if flag is None:
            continue
        text = s.help if shown is None else f"{s.help} (default {shown})"
        if s.kind == "switch":
            parser.add_argument(flag, action="store_const", const=True, help=text)
        elif s.kind == "toggle":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(flag, metavar=s.metavar, help=text)


def resolve(
    args: argparse.Namespace, environ: Mapping[str, str], notes: list[str] | None = None
) -> dict[str, Any]:
    """Defaults < file < environment < flags; every value converted and checked.

    Warnings (unknown variables) are appended to ``notes`` for the caller to show.
    """
    values = {s.name: s.checked_default for s in SETTINGS}
    config_path = args.config or (
        Path(environ["S3CACHEFS_CONFIG"]) if environ.get("S3CACHEFS_CONFIG") else None
    )
    if config_path is not None:
        for key, raw in read_file(config_path).items():
            setting = lookup(key)
            if setting is None:
                raise ConfigError(f"{config_path}: unknown key {key!r}")
            values[setting.name] = _convert(setting, raw, f"{config_path}: {key}")
    for variable, raw in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in OTHER_VARIABLES:
            continue
        if variable == "S3CACHEFS_CONFIG":
            continue
        setting = lookup(variable.removeprefix(ENV_PREFIX).lower())
        if setting is None:
            warning = unknown_variable(variable)
            if notes is not None:
                notes.append(warning)
            continue
        values[setting.name] = _convert(setting, raw, variable)
    for s in SETTINGS:
        raw = getattr(args, s.attr, None)
        if raw is not None:
            values[s.name] = _convert(s, raw, s.flag or s.name)
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
    # Every other field is a setting's value, as the table maps it.
    fields = {s.field_name: s.to_field(values[s.name]) for s in SETTINGS if s.field_name}
    return MountConfig(
        **fields,
        bucket=bucket,
        prefix=prefix,
        mountpoint=Path(os.path.abspath(values["mountpoint"])),
        cache_dir=Path(os.path.abspath(cache_dir)),
    )
