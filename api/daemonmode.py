"""`DatasetProvider`'s daemon mode: requests to the daemon serving a mount (blocking).

The daemon's answers are JSON events (`daemon.control`), read by
`daemon.client`; nothing here parses a command's text output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3cachefs.api.types import Dataset, DatasetState, Progress, VerifyReport
from s3cachefs.base.errors import ConfigError, IncompleteError
from s3cachefs.daemon.client import final_event, find_daemon, request
from s3cachefs.daemon.runtime import MountRecord
from s3cachefs.datasets.pins import Shard


def _daemon(mountpoint: Path, bucket: str) -> tuple[MountRecord, str]:
    """The daemon serving ``mountpoint`` and its mount's key prefix; ConfigError if none,
    or if it serves another bucket."""
    record = find_daemon(mountpoint)
    head = f"s3://{bucket}/"
    if not record.source.startswith(head):
        raise ConfigError(f"{mountpoint} serves {record.source}, not s3://{bucket}")
    return record, record.source[len(head) :].strip("/")


def _relative(record: MountRecord, mount_prefix: str, full: str) -> str:
    """The dataset's name under the mount (the daemon's DATASET): "." for the mount root,
    as the daemon names it (`daemon.commands`)."""
    root = mount_prefix + "/" if mount_prefix else ""
    if not full.startswith(root):
        raise ConfigError(f"{full.rstrip('/')} is not under the mount's {record.source}")
    return full[len(root) :].rstrip("/") or "."


def ensure(
    mountpoint: Path,
    bucket: str,
    full: str,
    *,
    name: str,
    shard: Shard | None,
    require_checksums: bool,
    on_progress: Callable[[Progress], None] | None,
    timeout: float | None,
) -> Dataset:
    record, mount_prefix = _daemon(mountpoint, bucket)
    rel = _relative(record, mount_prefix, full)
    message = {
        "op": "prefetch",
        "dataset": rel,
        "jobs": None,
        "dry_run": False,
        "require_checksums": require_checksums,
        "shard": str(shard) if shard else None,
        "list_keys": True,
    }

    def progress(event: dict[str, Any]) -> None:
        if on_progress is not None:
            on_progress(Progress.from_event(name, event))

    final = final_event(request(record, message, timeout=timeout), progress)
    if not final.get("ok"):
        failed = dict(final.get("failed_objects") or {})
        raise IncompleteError(
            f"{name}: not complete in the cache of {record.mountpoint}: "
            f"{len(failed)} objects failed",
            failed,
        )
    served = any(
        d["dataset"] == rel and d.get("shard") == message["shard"] and d.get("kernel_served")
        for d in _status(record)["datasets"]
    )
    return Dataset(
        name=name,
        path=Path(record.mountpoint) / rel,
        keys=tuple(sorted(key[len(full) :] for key in final.get("keys", []))),
        objects=int(final["files_total"]),
        bytes=int(final["bytes_total"]),
        kernel_served=served,
        shard=(shard.index, shard.count) if shard else None,
    )


def _status(record: MountRecord) -> dict[str, Any]:
    return final_event(request(record, {"op": "status"}))


def status(mountpoint: Path, bucket: str, prefix: str) -> list[DatasetState]:
    record, mount_prefix = _daemon(mountpoint, bucket)
    states = []
    for d in _status(record)["datasets"]:
        rel = "" if d["dataset"] == "." else str(d["dataset"])  # "." is the mount root
        full = "/".join(p for p in (mount_prefix, rel) if p)
        if not (full + "/").startswith(prefix):
            continue
        states.append(
            DatasetState(
                name=full[len(prefix) :],
                path=Path(record.mountpoint) / rel,
                objects=int(d["objects"]),
                bytes=int(d["bytes"]),
                complete=bool(d["complete"]),
                shard=d.get("shard"),
                kernel_served=bool(d.get("kernel_served")),
                verified_at=d.get("verified_at"),
            )
        )
    return states


def verify(mountpoint: Path, bucket: str, full: str, name: str) -> VerifyReport:
    record, mount_prefix = _daemon(mountpoint, bucket)
    rel = _relative(record, mount_prefix, full)
    final = final_event(request(record, {"op": "verify", "dataset": rel}))
    return VerifyReport(
        name=name,
        ok=bool(final["ok"]),
        complete=bool(final["complete"]),
        files_checked=int(final["files_checked"]),
        failed=dict(final["failed_objects"]),
        size_only=int(final.get("size_only", 0)),
        repaired=tuple(final.get("repaired", ())),
    )


def evict(mountpoint: Path, bucket: str, full: str) -> int:
    record, mount_prefix = _daemon(mountpoint, bucket)
    rel = _relative(record, mount_prefix, full)
    final = final_event(request(record, {"op": "evict", "dataset": rel}))
    return int(final.get("freed_bytes", 0))
