"""`DatasetProvider`: datasets on this node, verified, for a job launcher written in Python.

One call, ``ensure(dataset, shard=(rank, world))``, gives a verified local
path either way a node works:

- **daemon mode** (``mountpoint=``): a running s3cachefs daemon serves the
  mount; ``ensure`` asks it to prefetch over its control socket
  (`daemon.client`), so the dataset is cached, verified, pinned and, when
  complete, kernel-served; the path is inside the mount.
- **directory mode** (``directory=``): no daemon and no FUSE (a pod without
  ``/dev/fuse``); ``ensure`` syncs into ``directory/DATASET`` with
  `datasets.dirsync` (the ``sync`` command's engine, same checks).

Both return the same `Dataset`: the path, the keys (relative to the path;
the shard's, with a shard), the object count and bytes. Failures are the
project's exceptions (`s3cachefs.base.errors`): `NotEnoughSpaceError` with
the numbers, `StoreError` subclasses for S3, `IncompleteError` with the
failed objects (or a timeout), `ConfigError` for the rest.

Every method blocks; none keeps state between calls, so threads may share
one provider. From asyncio: ``await asyncio.to_thread(provider.ensure, ...)``;
from trio: ``await trio.to_thread.run_sync(functools.partial(provider.ensure,
...))``; ``on_progress`` is then called in that worker thread.
"""

from __future__ import annotations

import os
import threading
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from s3cachefs.api import daemonmode
from s3cachefs.api.types import Dataset, DatasetState, Progress, VerifyReport
from s3cachefs.base.errors import ConfigError
from s3cachefs.base.values import endpoint, parse_target
from s3cachefs.datasets import dirmanifest
from s3cachefs.datasets.direvict import evict_dir
from s3cachefs.datasets.dirresult import SyncOptions, require_complete
from s3cachefs.datasets.dirsync import DEFAULT_JOBS, s3_sync
from s3cachefs.datasets.pins import Shard

__all__ = ["Dataset", "DatasetProvider", "DatasetState", "Progress", "VerifyReport"]

ProgressCallback = Callable[[Progress], None]
# Keys `from_config` takes (dashes or underscores), as `mount`'s TOML file spells them.
CONFIG_KEYS = ("source", "bucket", "endpoint-url", "mountpoint", "directory", "region", "profile")


class DatasetProvider:
    """Datasets of one bucket (or prefix) on this node: through a daemon's mount, or synced
    into a directory (exactly one of ``mountpoint`` and ``directory``). Its settings are
    read-only attributes of the same names (paths made absolute)."""

    def __init__(
        self,
        bucket: str,
        *,
        mountpoint: str | os.PathLike[str] | None = None,
        directory: str | os.PathLike[str] | None = None,
        endpoint_url: str | None = None,
        prefix: str = "",
        region: str | None = None,
        profile: str | None = None,
        jobs: int = DEFAULT_JOBS,
        require_checksums: bool = False,
    ) -> None:
        """``prefix``: datasets are named below it ("" = the bucket's root); ``jobs``: GETs
        at once in directory mode; ``require_checksums``: objects S3 gives nothing to check
        end to end against fail. ConfigError for a bad value."""
        self.bucket, self.prefix = parse_target(f"{bucket}/{prefix}")
        if (mountpoint is None) == (directory is None):
            raise ConfigError("DatasetProvider needs exactly one of mountpoint and directory")
        self.mountpoint = None if mountpoint is None else Path(mountpoint).absolute()
        self.directory = None if directory is None else Path(directory).absolute()
        self.endpoint_url = None if endpoint_url is None else endpoint(endpoint_url)
        self.region, self.profile = region, profile
        if jobs < 1:
            raise ConfigError("jobs must be at least 1")
        self.jobs, self.require_checksums = jobs, require_checksums

    def __repr__(self) -> str:
        where = (
            f"mountpoint={self.mountpoint}" if self.mountpoint else f"directory={self.directory}"
        )
        return f"DatasetProvider(s3://{self.bucket}/{self.prefix}, {where})"

    @classmethod
    def from_config(
        cls, config: str | os.PathLike[str] | Mapping[str, Any] | None = None, **overrides: Any
    ) -> DatasetProvider:
        """From a TOML file (default: ``S3CACHEFS_CONFIG``) or a mapping: ``source``
        (BUCKET[/PREFIX]) or ``bucket``, ``endpoint-url``, ``mountpoint`` or ``directory``,
        ``region``, ``profile``, ``jobs``, ``require-checksums``; other keys (a mount's file
        has many) are ignored; keyword arguments override it (``endpoint_url=...``)."""
        if config is None:
            config = os.environ.get("S3CACHEFS_CONFIG") or {}
        if isinstance(config, Mapping):
            values, where = dict(config), "the configuration"
        else:
            try:
                values = tomllib.loads(Path(config).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{config}: cannot read ({exc})") from None
            where = str(config)
        values = {str(k).replace("_", "-"): v for k, v in values.items()}
        values.update({k.replace("_", "-"): v for k, v in overrides.items()})
        source = values.pop("source", None) or values.pop("bucket", None)
        if not source:
            raise ConfigError(f"{where}: no `source` (BUCKET[/PREFIX]) or `bucket`")
        bucket, prefix = parse_target(str(source))
        known = {k: values[k] for k in CONFIG_KEYS if k in values}
        if values.get("prefix"):
            prefix = str(values["prefix"])
        return cls(
            bucket,
            mountpoint=known.get("mountpoint"),
            directory=known.get("directory"),
            endpoint_url=known.get("endpoint-url"),
            prefix=prefix,
            region=known.get("region"),
            profile=known.get("profile"),
            jobs=int(values.get("jobs", DEFAULT_JOBS)),
            require_checksums=bool(values.get("require-checksums", False)),
        )

    @property
    def mode(self) -> str:
        """ "daemon" (a mount served by a running daemon) or "directory" (sync, no FUSE)."""
        return "daemon" if self.mountpoint is not None else "directory"

    def _full(self, dataset: str) -> str:
        """The dataset's full key prefix (ending in "/"); ConfigError for a bad name."""
        name = dataset.strip("/")
        if not name:
            raise ConfigError("a dataset name is needed (a key prefix under the provider's)")
        return parse_target(f"{self.bucket}/{self.prefix}{name}")[1]

    def ensure(
        self,
        dataset: str,
        *,
        shard: tuple[int, int] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
    ) -> Dataset:
        """The dataset (or shard ``(index, count)``) on this node, complete and verified.

        Blocking. Raises `IncompleteError` (objects failed, or ``timeout`` seconds
        passed: the daemon's prefetch is cancelled, a sync stops; what was verified
        stays), `NotEnoughSpaceError`, `StoreError`, `ConfigError`.
        """
        full = self._full(dataset)
        picked = Shard(*shard) if shard is not None else None
        if picked is not None and not 0 <= picked.index < picked.count:
            raise ConfigError(f"bad shard {shard}: use (index, count) with 0 <= index < count")
        if self.mountpoint is not None:
            return daemonmode.ensure(
                self.mountpoint,
                self.bucket,
                full,
                name=dataset.strip("/"),
                shard=picked,
                require_checksums=self.require_checksums,
                on_progress=on_progress,
                timeout=timeout,
            )
        return self._sync(dataset.strip("/"), full, picked, on_progress, timeout)

    def _dest(self, name: str) -> Path:
        assert self.directory is not None
        return self.directory / name

    def _sync(
        self,
        name: str,
        full: str,
        shard: Shard | None,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> Dataset:
        dest = self._dest(name)
        options = SyncOptions(
            bucket=self.bucket,
            prefix=full,
            dest=dest,
            endpoint_url=self.endpoint_url,
            shard=shard,
            require_checksums=self.require_checksums,
            wait=True,  # threads or processes ensuring the same dataset: one after the other
        )
        stop = threading.Event()
        timer = threading.Timer(timeout, stop.set) if timeout and timeout > 0 else None
        if timeout is not None and timeout <= 0:
            stop.set()  # no time at all: check what is there, fetch nothing

        def event(e: dict[str, Any]) -> None:
            if on_progress is not None and e.get("event") == "progress":
                on_progress(Progress.from_event(name, e))

        if timer is not None:
            timer.start()
        try:
            result = s3_sync(
                options,
                region=self.region,
                profile=self.profile,
                jobs=self.jobs,
                on_event=event,
                stop=stop,
            )
        finally:
            if timer is not None:
                timer.cancel()
        require_complete(result)
        return Dataset(
            name=name,
            path=dest,
            keys=tuple(key[len(full) :] for key in result.keys),
            objects=result.files_total,
            bytes=result.bytes_total,
            kernel_served=False,
            shard=(shard.index, shard.count) if shard else None,
        )

    def status(self) -> list[DatasetState]:
        """The datasets on this node: pinned in the daemon's cache, or synced directories."""
        if self.mountpoint is not None:
            return daemonmode.status(self.mountpoint, self.bucket, self.prefix)
        assert self.directory is not None
        found: list[DatasetState] = []
        if not self.directory.is_dir():
            return found
        for root, dirs, _ in os.walk(self.directory):
            if dirmanifest.STATE_DIR not in dirs:
                continue
            dirs.clear()  # a dataset's own directories hold no other dataset
            manifest = dirmanifest.load(Path(root))
            if manifest is None:
                continue
            found.append(
                DatasetState(
                    name=os.path.relpath(root, self.directory),
                    path=Path(root),
                    objects=len(manifest.objects),
                    bytes=sum(e.size for e in manifest.objects.values()),
                    complete=manifest.complete,
                    shard=manifest.shard,
                    kernel_served=False,
                    verified_at=manifest.synced_at,
                )
            )
        return sorted(found, key=lambda s: s.name)

    def verify(self, dataset: str) -> VerifyReport:
        """Every file re-read and checked against what S3 said when it was fetched (no S3
        request in directory mode; the daemon re-fetches what fails). Check ``ok``."""
        full = self._full(dataset)
        name = dataset.strip("/")
        if self.mountpoint is not None:
            return daemonmode.verify(self.mountpoint, self.bucket, full, name)
        report = dirmanifest.verify_dir(self._dest(name))
        return VerifyReport(
            name=name,
            ok=report.ok,
            complete=report.complete,
            files_checked=report.files_checked,
            failed=dict(report.failed),
            size_only=len(report.size_only),
        )

    def evict(self, dataset: str) -> int:
        """Unpin and free the dataset (daemon), or delete the files its syncs wrote into its
        directory, under the sync lock (`datasets.direvict`); bytes freed."""
        full = self._full(dataset)
        name = dataset.strip("/")
        if self.mountpoint is not None:
            return daemonmode.evict(self.mountpoint, self.bucket, full)
        return evict_dir(self._dest(name))
