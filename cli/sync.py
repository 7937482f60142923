"""``sync`` (Sync-before-Run into a plain directory, no daemon) and ``verify --dir``."""

from __future__ import annotations

import argparse
import json
import sys

from s3cachefs.base.errors import ConfigError
from s3cachefs.base.values import endpoint, human_bytes, parse_shard, parse_target
from s3cachefs.cli import jobs
from s3cachefs.cli.exits import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from s3cachefs.cli.progress import ProgressView, describe
from s3cachefs.datasets.dirmanifest import verify_dir
from s3cachefs.datasets.dirresult import SyncOptions, SyncResult
from s3cachefs.datasets.dirsync import s3_sync
from s3cachefs.datasets.pins import Shard


def cmd_sync(args: argparse.Namespace) -> int:
    bucket, prefix = parse_target(args.source)
    options = SyncOptions(
        bucket=bucket,
        prefix=prefix,
        dest=args.dest,
        endpoint_url=endpoint(args.endpoint_url) if args.endpoint_url else None,
        shard=Shard(*parse_shard(args.shard)) if args.shard else None,
        delete=args.delete,
        dry_run=args.dry_run,
        require_checksums=args.require_checksums,
        etag_md5s=args.etag_md5 == "auto",
    )
    view = ProgressView.choose(args.json, "sync")
    try:
        result = s3_sync(
            options, region=args.region, profile=args.profile, jobs=args.jobs, on_event=view.update
        )
    finally:
        view.finish()
    if args.list_out is not None:
        args.list_out.write_text("".join(k + "\n" for k in result.keys))
    if args.json:
        print(json.dumps(result.event()), flush=True)
    else:
        _report(result)
    if args.dry_run:
        return EXIT_OK if result.ok else EXIT_USAGE
    return EXIT_OK if result.ok else EXIT_INCOMPLETE


def _report(r: SyncResult) -> None:
    event = r.event()
    if r.dry_run:
        verdict = "fits" if event["fits"] else "does NOT fit"
        print(
            f"{r.source} -> {r.dest}: {r.files_total} objects, {human_bytes(r.bytes_total)}; "
            f"{human_bytes(r.bytes_needed)} to download ({r.files_total - r.files_present} "
            f"objects), {human_bytes(r.room)} free: {verdict}"
        )
        for rel in r.deleted:
            print(f"would delete {rel}")
        if r.kept:
            print(f"{len(r.kept)} files S3 no longer lists would be kept (--delete removes them)")
        return
    print(
        f"{r.source} -> {r.dest}: {describe(event)}, {r.fetched} objects "
        f"({human_bytes(r.bytes_fetched)}) fetched in {r.elapsed:.1f}s, {len(r.deleted)} deleted"
    )
    if r.kept:
        print(f"{len(r.kept)} files S3 no longer lists were kept (--delete removes them)")
    for key, reason in sorted(r.failed.items()):
        print(f"FAILED {key}: {reason}", file=sys.stderr)
    if r.size_only:
        shown = ", ".join(sorted(r.size_only)[:5])
        more = f", ... ({len(r.size_only) - 5} more)" if len(r.size_only) > 5 else ""
        print(
            f"{len(r.size_only)} objects size-checked only, not verified end to end (S3 gives "
            f"no checksum for them and their ETags are not MD5s): {shown}{more}"
        )
    if r.complete:
        print(f"{r.dest}: complete and verified")
    else:
        missing = r.files_total - r.files_present - r.fetched
        why = " (stopped)" if r.stopped else ""
        print(f"{r.dest}: NOT complete{why}: {missing} objects missing", file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> int:
    """``verify DATASET`` asks the daemon; ``verify --dir DEST`` checks a synced directory."""
    if (args.dir is None) == (args.dataset is None):
        raise ConfigError("verify needs a DATASET (of a mount) or --dir DEST (of a sync)")
    return jobs.cmd_verify(args) if args.dir is None else cmd_verify_dir(args)


def cmd_verify_dir(args: argparse.Namespace) -> int:
    report = verify_dir(args.dir)
    if args.json:
        out = {
            "dir": str(args.dir),
            "source": report.source,
            "ok": report.ok,
            "complete": report.complete,
            "files_checked": report.files_checked,
            "bytes_checked": report.bytes_checked,
            "failed_objects": report.failed,
            "size_only": len(report.size_only),
            "size_only_keys": report.size_only[:5],
        }
        print(json.dumps(out))
        return EXIT_OK if report.ok else EXIT_INCOMPLETE
    print(
        f"{args.dir} ({report.source}): {report.files_checked} files checked, "
        f"{human_bytes(report.bytes_checked)} intact, {len(report.failed)} failed"
    )
    for key, reason in sorted(report.failed.items()):
        print(f"FAILED {key}: {reason}", file=sys.stderr)
    if report.size_only:
        print(f"{len(report.size_only)} files size-checked only: {', '.join(report.size_only[:5])}")
    if not report.complete:
        print(f"{args.dir}: NOT complete: its last sync did not finish", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_INCOMPLETE
