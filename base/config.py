"""`MountConfig`: everything a daemon needs to serve one mount, checked as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from s3cachefs.base.errors import ConfigError
from s3cachefs.base.settings import mount_default as default
from s3cachefs.base.values import ETAG_MD5_MODES, GIB, INDEFINITE_TTL, KIB, MIB

# S3 refuses a multipart part larger than this.
MAX_PART_SIZE = 5 * GIB


@dataclass(frozen=True)
class MountConfig:
    """Everything a daemon needs to serve one mount.

    The first four fields are built by ``cli/settings.py`` (from BUCKET[/PREFIX],
    MOUNTPOINT and --cache-dir); every default comes from the settings table
    (base/settings.py), where each is explained.
    """

    bucket: str
    prefix: str
    mountpoint: Path
    cache_dir: Path
    endpoint_url: str | None = default("endpoint_url")
    region: str | None = default("region")
    profile: str | None = default("profile")
    cache_size: int = default("cache_size")
    min_free: int = default("min_free")
    metadata_ttl: float = default("metadata_ttl")
    allow_other: bool = default("allow_other")
    block_size: int = default("block_size")
    # Parallel S3 requests: also sizes the connection pools and the S3 thread limiter.
    s3_concurrency: int = default("s3_concurrency")
    # Bytes fetched ahead of a sequential reader, at most.
    readahead_size: int = default("readahead_size")
    # Most bytes one ranged GET covers.
    fetch_size: int = default("fetch_size")
    # Verified blocks kept in memory (a 1 MiB block serves eight 128 KiB kernel reads).
    memory_cache_bytes: int = default("memory_cache_bytes")
    # Keep the kernel's page cache across opens of an unchanged object version.
    keep_cache: bool = default("keep_cache")
    kernel_readahead_kib: int = default("kernel_readahead_kib")
    # HOST:PORT for Prometheus /metrics; None: off.
    metrics_address: str | None = default("metrics_address")
    # A read that S3 cannot serve within this budget fails with EIO, never hangs.
    s3_timeout: float = default("s3_timeout")
    # Tries of one S3 request (throttling, 5xx, connection errors) before it fails.
    s3_max_attempts: int = default("s3_max_attempts")
    writable: bool = default("writable")
    allow_overwrite: bool = default("allow_overwrite")
    allow_delete: bool = default("allow_delete")
    # Files larger than one part go up as a multipart upload of parts this size.
    upload_part_size: int = default("upload_part_size")
    # Complete pinned datasets served by the kernel (datasets/kernelserve.py).
    kernel_serve_pinned: bool = default("kernel_serve_pinned")
    read_serve: bool = default("read_serve")
    # Files complete in the cache read by the kernel itself (fs/passthrough.py).
    passthrough: bool | None = default("passthrough")  # None: where available
    passthrough_check_max: int = default("passthrough_check_max")
    # How often the files of kernel-served datasets are read back and checked (None: only
    # at start and by `verify`).
    verify_interval: float | None = default("verify_interval")
    # "auto": a single-part object's 32-hex ETag is taken as the MD5 of its bytes.
    etag_md5: str = default("etag_md5")
    # Worker processes of the bulk path (prefetch); 0: prefetch runs in the daemon.
    prefetch_workers: int = default("prefetch_workers")

    def __post_init__(self) -> None:
        if self.block_size < 64 * KIB or self.block_size & (self.block_size - 1):
            raise ConfigError("block size must be a power of two of at least 64K")
        if self.cache_size < self.block_size:
            raise ConfigError(f"cache size {self.cache_size} is smaller than one block")
        if self.s3_concurrency < 1:
            raise ConfigError("S3 concurrency must be at least 1")
        if self.s3_max_attempts < 1:
            raise ConfigError("S3 max attempts must be at least 1")
        if self.memory_cache_bytes < 0:
            raise ConfigError("memory cache size must be at least 0")
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
        if self.read_serve and self.metadata_ttl < INDEFINITE_TTL:
            raise ConfigError(
                "--read-serve needs --metadata-ttl indefinite (immutable data): an overlay"
                " over FUSE turns an object changed in S3 into ESTALE"
            )

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
