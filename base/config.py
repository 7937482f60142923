"""`MountConfig`: everything a daemon needs to serve one mount, checked as a whole."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from s3cachefs.base.errors import ConfigError
from s3cachefs.base.values import ETAG_MD5_MODES, GIB, KIB, MIB

# 1 MiB: small enough that a 30 KB document image costs one small GET, large
# enough that sequential reads of big objects are a few dozen parallel GETs.
# bench/blocksize.py measures the alternatives (README, "Block size").
DEFAULT_BLOCK_SIZE = 1 * MIB

# S3 refuses a multipart part larger than this.
MAX_PART_SIZE = 5 * GIB


def default_cache_dir() -> Path:
    """``/var/cache/s3cachefs`` for root (the systemd service), XDG cache otherwise."""
    if os.geteuid() == 0:
        return Path("/var/cache/s3cachefs")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "s3cachefs"


@dataclass(frozen=True)
class MountConfig:
    """Everything a daemon needs to serve one mount."""

    bucket: str
    prefix: str
    mountpoint: Path
    cache_dir: Path
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    cache_size: int = 10 * GIB
    min_free: int = 5 * GIB
    metadata_ttl: float = 60.0
    allow_other: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    # Parallel S3 requests: also sizes the connection pools and the S3 thread limiter.
    # 64: a prefetch of small files over a 40 ms link needs ~32 GETs in flight to
    # fill it (`python -m bench.prefetchrss --large 0 --pages 1000 --latency 0.04
    # --jobs 8|32`: 41 against 69 MB/s; at 1 ms both are CPU-bound at 75 MB/s).
    s3_concurrency: int = 64
    # Bytes fetched ahead of a sequential reader, at most: 32 MiB keeps a
    # 20 ms-latency link busy at several hundred MB/s.
    readahead_size: int = 32 * MIB
    # Most bytes one ranged GET covers: a run of missing blocks is one GET whose
    # blocks are served as they arrive (small blocks, few requests).
    fetch_size: int = 8 * MIB
    # Verified blocks kept in memory so that 128 KiB kernel reads of a 1 MiB
    # block do not re-read and re-check it from disk.
    memory_cache_bytes: int = 64 * MIB
    # Keep the kernel's page cache across opens of an unchanged object version.
    keep_cache: bool = True
    # The mount's kernel readahead: 1024 KiB lets sequential FUSE reads be 1 MiB.
    kernel_readahead_kib: int = 1024
    # HOST:PORT for Prometheus /metrics; None: off.
    metrics_address: str | None = None
    # A read that S3 cannot serve within this budget fails with EIO, never hangs.
    s3_timeout: float = 30.0
    s3_max_attempts: int = 3
    # Write-through (README "Writable mounts"): off unless asked; overwrite and
    # delete need their own flag on top.
    writable: bool = False
    allow_overwrite: bool = False
    allow_delete: bool = False
    # Files larger than one part go up as a multipart upload of parts this size.
    upload_part_size: int = 8 * MIB
    # Complete pinned datasets served by the kernel: a read-only bind of a tree of
    # hard links to their cache files over the dataset's directory (daemon.kernelserve).
    kernel_serve_pinned: bool = True
    # How often the files of kernel-served datasets are read back and checked (None: only
    # at start and by `verify`): between checks the kernel serves disk bytes unchecked.
    verify_interval: float | None = 24 * 3600.0
    # "auto": a single-part object's 32-hex ETag is taken as the MD5 of its bytes (S3's
    # rule, SSE-KMS/SSE-C excepted); "off": a server whose ETags are other digests.
    etag_md5: str = "auto"

    def __post_init__(self) -> None:
        if self.block_size < 64 * KIB or self.block_size & (self.block_size - 1):
            raise ConfigError("block size must be a power of two of at least 64K")
        if self.cache_size < self.block_size:
            raise ConfigError(f"cache size {self.cache_size} is smaller than one block")
        if self.s3_concurrency < 1:
            raise ConfigError("S3 concurrency must be at least 1")
        if self.upload_part_size < 5 * MIB or self.upload_part_size % self.block_size:
            raise ConfigError(
                "upload part size must be at least 5M and a multiple of the block size"
            )
        if self.upload_part_size > MAX_PART_SIZE:
            raise ConfigError("upload part size must be at most 5G (S3's limit for one part)")
        if self.fetch_size < self.block_size:
            raise ConfigError(
                f"fetch size {self.fetch_size} is smaller than the block size {self.block_size}"
            )
        if self.etag_md5 not in ETAG_MD5_MODES:
            raise ConfigError(f"bad --etag-md5 {self.etag_md5!r}: auto or off")
        if (self.allow_overwrite or self.allow_delete) and not self.writable:
            raise ConfigError("--allow-overwrite and --allow-delete need --writable")

    @property
    def prefetch_jobs(self) -> int:
        """Concurrent GETs of a prefetch: half the S3 slots, so foreground reads never
        queue behind a whole prefetch."""
        return max(1, self.s3_concurrency // 2)

    @property
    def etag_md5s(self) -> bool:
        """Whether a 32-hex single-part ETag is checked as the MD5 of the bytes."""
        return self.etag_md5 == "auto"

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
