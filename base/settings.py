"""Every mount setting, defined once: its name, type and check, default, help text,
and the `MountConfig` field it fills.

From this table come the options of ``s3cachefs mount`` (``--cache-size``; built by
``cli/settings.py``), the keys of its TOML file (``cache-size`` or ``cache_size``),
its variables (``S3CACHEFS_CACHE_SIZE``) and the defaults of `MountConfig`
(``base/config.py``). A default is written in the user's syntax (``"10G"``) and goes
through the same check as a typed value.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from s3cachefs.base import values as v

ENV_PREFIX = "S3CACHEFS_"

# How a setting appears on the command line:
#   value       --NAME VALUE
#   switch      --NAME (on; default off)
#   toggle      --NAME and --no-NAME
#   positional  an argument of `mount` (BUCKET[/PREFIX], MOUNTPOINT)
#   file        no flag: the TOML file and the environment only
Kind = Literal["value", "switch", "toggle", "positional", "file"]


def _same(value: Any) -> Any:
    return value


def _not(value: Any) -> bool:
    return not value


def _auto_boolean(value: Any) -> bool | None:
    """A toggle that may be left to the daemon: "auto" -> None."""
    return None if str(value).strip().lower() == "auto" else v.boolean(value)


def _in_kib(value: Any) -> int:
    return int(value) // v.KIB


def default_cache_dir() -> Path:
    """``/var/cache/s3cachefs`` for root (the systemd service), XDG cache otherwise."""
    if os.geteuid() == 0:
        return Path("/var/cache/s3cachefs")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "s3cachefs"


@dataclass(frozen=True)
class Setting:
    name: str  # the long option without dashes; the TOML key (dashes or underscores)
    convert: Callable[[Any], Any]  # the user's text or a TOML value -> checked value
    default: Any  # in the user's syntax, e.g. "10G"; None: unset
    help: str
    kind: Kind = "value"
    # The MountConfig field it fills: "" the setting's own name with underscores
    # (cache-size -> cache_size), None none (the CLI reads it, or builds the field).
    field: str | None = ""
    to_field: Callable[[Any], Any] = _same  # checked value -> the field's value
    metavar: str | None = None  # in --help; None: argparse's (the name in capitals)

    @property
    def attr(self) -> str:
        """The name with underscores: argparse's attribute, and the variable's suffix."""
        return self.name.replace("-", "_")

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.attr.upper()

    @property
    def flag(self) -> str | None:
        return None if self.kind in ("positional", "file") else f"--{self.name}"

    @property
    def field_name(self) -> str | None:
        return self.attr if self.field == "" else self.field

    @property
    def checked_default(self) -> Any:
        """The default, checked and converted (None when unset)."""
        return None if self.default is None else self.convert(self.default)

    @property
    def shown_default(self) -> str | None:
        """The default as ``--help`` and the README show it."""
        if self.kind in ("switch", "toggle") and self.checked_default is not None:
            return "on" if self.checked_default else "off"
        return None if self.default is None else str(self.default)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "source",
        str,
        None,
        "the bucket (and a prefix in it) to mount",
        "positional",
        field=None,
        metavar="BUCKET[/PREFIX]",
    ),
    Setting(
        "mountpoint",
        Path,
        None,
        "an empty directory to mount it on",
        "positional",
        field=None,
        metavar="MOUNTPOINT",
    ),
    Setting("endpoint-url", v.endpoint, None, "S3-compatible endpoint (MinIO, Ceph RGW, R2)"),
    Setting("region", str, None, "AWS region (default: from the AWS config)"),
    Setting("profile", str, None, "AWS profile for credentials"),
    Setting(
        "cache-dir", Path, None, f"persistent cache (default {default_cache_dir()})", field=None
    ),
    Setting("cache-size", v.size, "10G", "cache limit, e.g. 200G"),
    Setting("min-free", v.size, "5G", "disk space to keep free"),
    Setting("metadata-ttl", v.ttl, "60", "seconds listings are trusted, or 'indefinite'"),
    Setting(
        "allow-other", v.boolean, False, "let other users (container uids) use the mount", "switch"
    ),
    Setting("log-level", v.level, "info", "debug, info, warning or error", field=None),
    Setting("log-file", Path, None, "background log (default: CACHE_DIR/daemon.log)", field=None),
    # Parallel S3 requests: also sizes the connection pools and the S3 thread limiter.
    # 64: a prefetch of small files over a 40 ms link needs ~32 GETs in flight to
    # fill it (`python -m bench.prefetchrss --large 0 --pages 1000 --latency 0.04
    # --jobs 8|32`: 41 against 69 MB/s; at 1 ms both are CPU-bound at 75 MB/s).
    Setting("s3-concurrency", v.count, 64, "parallel S3 requests"),
    # 32 MiB keeps a 20 ms-latency link busy at several hundred MB/s.
    Setting(
        "readahead", v.size, "32M", "most bytes fetched ahead of a reader", field="readahead_size"
    ),
    # 1 MiB: small enough that a 30 KB document image costs one small GET, large
    # enough that sequential reads of big objects are a few dozen parallel GETs.
    # bench/blocksize.py measures the alternatives (README, "Block size").
    Setting("block-size", v.size, "1M", "block size of a new cache dir"),
    # A run of missing blocks is one GET whose blocks are served as they arrive
    # (small blocks, few requests).
    Setting("fetch-size", v.size, "8M", "most bytes one ranged GET covers"),
    # Verified blocks kept in memory so that 128 KiB kernel reads of a 1 MiB block
    # do not re-read and re-check it from disk; 0 keeps none.
    Setting(
        "memory-cache-size",
        v.size,
        "64M",
        "verified blocks kept in memory for the reads that follow (0: none)",
        field="memory_cache_bytes",
    ),
    # 1 MiB lets sequential FUSE reads be 1 MiB instead of 128 KiB.
    Setting(
        "kernel-readahead",
        v.kib,
        "1M",
        "the mount's kernel readahead; 0: the kernel's",
        field="kernel_readahead_kib",
        to_field=_in_kib,
    ),
    # Off keeps the kernel's page cache across opens of an unchanged object version.
    Setting(
        "no-keep-cache",
        v.boolean,
        False,
        "drop the page cache at every open (measurements)",
        "switch",
        field="keep_cache",
        to_field=_not,
    ),
    Setting("metrics-address", str, None, "serve Prometheus /metrics at HOST:PORT (default off)"),
    # A read that S3 cannot serve within this budget fails with EIO, never hangs.
    Setting("s3-timeout", v.timeout, "30", "seconds an S3 connection may stall before a retry"),
    # Throttling, 5xx and connection errors are retried with backoff, this many tries
    # in all; a listing may take s3-timeout times this at most.
    Setting("s3-max-attempts", v.count, 3, "tries of one S3 request before it fails"),
    # Write-through (README "Writable mounts"): off unless asked; overwrite and
    # delete need their own flag on top.
    Setting("writable", v.boolean, False, "write-through: new files go to S3 on close", "switch"),
    Setting(
        "allow-overwrite", v.boolean, False, "with --writable: let writes replace objects", "switch"
    ),
    Setting(
        "allow-delete",
        v.boolean,
        False,
        "with --writable: let unlink/rmdir delete objects",
        "switch",
    ),
    # Files larger than one part go up as a multipart upload of parts this size.
    Setting("upload-part-size", v.size, "8M", "multipart part size for writes"),
    # A read-only bind of a tree of hard links to their cache files over the
    # dataset's directory (datasets/kernelserve.py).
    Setting(
        "kernel-serve-pinned",
        v.boolean,
        True,
        "bind complete pinned datasets read-only over their dirs: the kernel serves them",
        "toggle",
    ),
    # Files complete in the cache after a read, linked into the root overlay
    # (datasets/readserve.py); opt-in, needs --metadata-ttl indefinite (immutable data:
    # an overlay over FUSE turns a changed object into ESTALE); never --writable or non-root.
    Setting(
        "read-serve",
        v.boolean,
        False,
        "kernel-serve files complete in the cache after a read; needs --metadata-ttl indefinite",
        "toggle",
    ),
    # FUSE passthrough (fs/passthrough.py): an open of a file complete in the cache,
    # CRC-checked, hands the kernel the cache file: its reads never reach the daemon.
    # "auto" (no flag): on where available (root, Linux >= 6.9, the patched pyfuse3, a
    # read-only mount, the cache dir not on overlayfs), else one info line; --passthrough
    # where unavailable: a warning; --no-passthrough: off.
    Setting(
        "passthrough",
        _auto_boolean,
        "auto",
        "kernel-read files complete in the cache (FUSE passthrough; auto: where available)",
        "toggle",
    ),
    # A file up to this size is CRC-checked whole inside its first passthrough OPEN
    # (measured, page cache dropped, load ~5.6 on 2 cores: open+4 KiB 22-25 ms at 1 and
    # 16 MiB, 93-97 ms at 64 MiB, 340-590 ms at 256 MiB, against 9-21 ms on the FUSE
    # path); a bigger one's open takes the FUSE path while a background check registers
    # it for the next open (fs/passthrough.py).
    Setting(
        "passthrough-check-max",
        v.size,
        "16M",
        "passthrough: files up to this size are checked in their open, bigger in the background",
    ),
    # Between checks the kernel serves disk bytes unchecked.
    Setting(
        "verify-interval",
        v.interval,
        "24h",
        "re-check kernel-served datasets this often, e.g. 12h; off: at start only",
    ),
    # "auto": a single-part object's 32-hex ETag is taken as the MD5 of its bytes (S3's
    # rule, SSE-KMS/SSE-C excepted); "off": a server whose ETags are other digests.
    Setting(
        "etag-md5",
        v.etag_md5,
        "auto",
        "auto: single-part ETags are MD5s and reads check them; off: this server's are not",
    ),
    # Prefetch GETs, block writes, CRCs and digests in worker processes (issue 12): the
    # daemon's one interpreter saturates at ~0.4x the sync tools; 0 keeps them in the
    # daemon (the path reads always take; also used where workers cannot start).
    Setting(
        "prefetch-workers",
        v.workers,
        "auto",
        "worker processes that download prefetches (auto: one per usable CPU; 0: in the daemon)",
    ),
    # Read by `s3cachefs prefetch --config`, not by the mount.
    Setting("prefetch", v.datasets, None, "datasets to prefetch", "file", field=None),
)
BY_NAME = {s.name: s for s in SETTINGS}


def lookup(key: str) -> Setting | None:
    """The setting a TOML key (or a variable's suffix, lowercased) names: dashes or
    underscores."""
    return BY_NAME.get(key.replace("_", "-"))


def mount_default(field: str) -> Any:
    """The default of MountConfig's ``field``: its setting's default, checked and converted."""
    [setting] = [s for s in SETTINGS if s.field_name == field]
    return None if setting.default is None else setting.to_field(setting.checked_default)
