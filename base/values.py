"""The user-facing value syntaxes: sizes, TTLs, intervals, ``BUCKET[/PREFIX]``, booleans,
endpoint URLs, counts, shards; each checked, each failing as one `ConfigError` line.

The parsers take the user's text; the converters (``size``, ``ttl``, ...) also take what
a TOML file holds (numbers, booleans, lists) and are what the settings table uses.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any
from urllib.parse import urlsplit

from s3cachefs.base.errors import ConfigError
from s3cachefs.base.logs import LEVELS

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

# --etag-md5: whether single-part ETags are MD5s of the content (auto) or not (off).
ETAG_MD5_MODES = ("auto", "off")

# What "indefinite" means to the kernel: ten years is forever for a mount.
INDEFINITE_TTL = 10 * 365 * 24 * 3600.0

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB, "P": 1024 * 1024 * GIB}


def parse_size(text: str) -> int:
    """Parse a byte count like ``200G``, ``512MiB``, ``1.5T`` or ``4096``.

    Suffixes K, M, G, T, P are powers of 1024, with an optional ``B`` or
    ``iB`` (``G`` = ``GiB`` = ``GB`` = 2**30); no suffix means bytes.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(
            f"bad size {text!r}: use a number with an optional K, M, G, T or P suffix "
            "(powers of 1024)"
        )
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def parse_ttl(text: str) -> float:
    """Parse ``--metadata-ttl``: seconds (``0`` disables caching) or ``indefinite``."""
    if text.strip().lower() == "indefinite":
        return INDEFINITE_TTL
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"bad TTL {text!r}: use seconds or 'indefinite'") from None
    if value < 0 or not math.isfinite(value):
        raise ConfigError(f"bad TTL {text!r}: must be a finite number >= 0")
    return value


_INTERVAL_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_INTERVAL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float | None:
    """Parse ``--verify-interval``: ``24h``, ``30m``, ``90s``, ``2d`` or seconds; ``0``/``off``
    give None (no scheduled checks)."""
    if text.strip().lower() in ("off", "never", "false", "no"):
        return None
    match = _INTERVAL_RE.match(text)
    if not match:
        raise ConfigError(f"bad interval {text!r}: use e.g. 24h, 30m, 90s, 2d, or off")
    value = float(match.group(1)) * _INTERVAL_UNITS[match.group(2).lower()]
    return value or None


_BUCKET_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{1,254}$")


def parse_target(text: str) -> tuple[str, str]:
    """Split ``BUCKET[/PREFIX]`` (an ``s3://`` scheme is accepted) into bucket and prefix.

    The prefix is returned normalised to end with ``/`` (or empty for the whole bucket).
    """
    body = text.removeprefix("s3://")
    bucket, _, prefix = body.partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"bad bucket name {bucket!r} in {text!r}")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(f"bad prefix {prefix!r}: empty, '.' or '..' path segments")
    return bucket, (prefix + "/" if prefix else "")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``--shard I/N`` (shard I of N, 0 <= I < N) into ``(I, N)``."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"bad shard {text!r}: use I/N with 0 <= I < N")
    return int(match.group(1)), int(match.group(2))


# --- converters: the user's text or a TOML value -> a checked value --------------


def size(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise ConfigError(f"bad size {value!r}")  # a TOML number; text has no sign
    return value if isinstance(value, int) else parse_size(str(value))


def kib(value: Any) -> int:
    number = size(value)
    if number % 1024:
        raise ConfigError(f"bad size {value!r}: the kernel takes whole KiB (e.g. 128K, 1M)")
    return number


def ttl(value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"bad TTL {value!r}: use seconds or 'indefinite'")
    return parse_ttl(str(value))  # also TOML numbers: inf and nan are refused there


def timeout(value: Any) -> float:
    if str(value).strip().lower() == "indefinite":  # a read must never wait forever
        raise ConfigError(f"bad timeout {value!r}: use a number of seconds")
    seconds = ttl(value)
    if seconds <= 0:
        raise ConfigError(f"bad timeout {value!r}: must be more than 0 seconds")
    return seconds


def endpoint(value: Any) -> str:
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


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"bad boolean {value!r}: use true or false")


def interval(value: Any) -> float | None:
    if value is False:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value) or None
    return parse_interval(str(value))


def etag_md5(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ETAG_MD5_MODES:
        raise ConfigError(f"bad value {value!r}: use auto or off")
    return text


def integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"bad number {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad number {value!r}") from None


def count(value: Any) -> int:
    number = integer(value)
    if number < 1:
        raise ConfigError(f"bad number {value!r}: must be at least 1")
    return number


def workers(value: Any) -> int:
    """A count of processes: "auto" (one per usable CPU) or a number, 0 for none."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return usable_cpus()
    number = integer(value)
    if number < 0:
        raise ConfigError(f"bad number {value!r}: auto, 0 or more")
    return number


def usable_cpus(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may run on (affinity), capped by its cgroup's CPU quota and
    its parents': v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` (EKS AL2, RHEL 8 nodes): a
    2-CPU pod on a 96-core node is 2, not 96."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        with open(own) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = ["0::/"]
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        number, controllers, path = fields
        v1 = number != "0"
        if v1 and "cpu" not in controllers.split(","):
            continue
        parts = [p for p in path.strip().split("/") if p]
        if ".." in parts:  # outside our cgroup namespace: those files are another cgroup's
            continue
        # v1: the cgroup's path from the host's root, or (a container's view) the root.
        mounts = [os.path.join(root, "cpu,cpuacct"), os.path.join(root, "cpu")] if v1 else [root]
        for mount in mounts:
            for depth in range(len(parts), -1, -1):  # a quota anywhere above applies too
                quota = _cgroup_quota(os.path.join(mount, *parts[:depth]), v1=v1)
                if quota is not None:
                    cpus = min(cpus, quota)
    return max(1, cpus)


def _cgroup_quota(directory: str, *, v1: bool) -> int | None:
    try:
        if not v1:
            with open(os.path.join(directory, "cpu.max")) as f:
                return cpu_quota(f.read())
        files = [os.path.join(directory, f"cpu.cfs_{name}_us") for name in ("quota", "period")]
        with open(files[0]) as quota, open(files[1]) as period:
            return cpu_quota(f"{quota.read()} {period.read()}")  # quota -1: none
    except OSError:
        return None


def cpu_quota(text: str) -> int | None:
    """CPUs of a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD": none), or of
    v1's quota and period ("-1 PERIOD": none), rounded up."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def datasets(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f'bad dataset list {value!r}: use ["dataset-v3", ...]')


def level(value: Any) -> str:
    if str(value).lower() not in LEVELS:
        raise ConfigError(f"bad log level {value!r}: one of {', '.join(LEVELS)}")
    return str(value).lower()


def human_bytes(n: float) -> str:
    """Bytes for people: "2.0 MiB", "1.5 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError
