"""``prefetch``, ``status``, ``verify``, ``evict``, ``staged``: requests to a running daemon."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from s3cachefs.base.errors import ConfigError
from s3cachefs.base.settings import BY_NAME
from s3cachefs.base.values import human_bytes
from s3cachefs.cli.exits import EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from s3cachefs.cli.progress import ProgressView, describe
from s3cachefs.cli.settings import read_file
from s3cachefs.daemon.client import dataset_in, final_event, find_daemon, request


def _last(events: Any, view: ProgressView | None = None) -> dict[str, Any]:
    if view is None:
        return final_event(events)
    return final_event(events, view.update, view.finish)


def cmd_prefetch(args: argparse.Namespace) -> int:
    """One dataset, or (with --config and no DATASET) every dataset the file lists."""
    if args.config is not None:
        values = read_file(args.config)
        if args.mount is None and "mountpoint" in values:
            args.mount = Path(str(values["mountpoint"]))
        if args.dataset is None:
            datasets = BY_NAME["prefetch"].convert(values.get("prefetch") or [])
            if not datasets:
                raise ConfigError(f"{args.config}: no `prefetch` datasets and no DATASET given")
            codes = []
            for dataset in datasets:
                args.dataset = dataset
                codes.append(_prefetch_one(args))
            return max(codes)
    if args.dataset is None:
        raise ConfigError("prefetch needs a DATASET (or --config with `prefetch = [...]`)")
    return _prefetch_one(args)


def _prefetch_one(args: argparse.Namespace) -> int:
    record = find_daemon(args.mount, args.dataset)
    view = ProgressView.choose(args.json)
    message = {
        "op": "prefetch",
        "dataset": dataset_in(record, args.dataset),
        "jobs": args.jobs,
        "dry_run": args.dry_run,
        "require_checksums": args.require_checksums,
        "shard": args.shard,
        "list_keys": args.list_out is not None,
    }
    final = _last(request(record, message), view)
    if args.list_out is not None:
        args.list_out.write_text("".join(k + "\n" for k in final.pop("keys", [])))
    if args.json:
        print(json.dumps(final), flush=True)
    elif args.dry_run:
        verdict = "fits" if final["fits"] else "does NOT fit"
        needed = human_bytes(final["bytes_needed"])
        reused = f" ({final['reused']}; {needed} to store)" if final.get("reused") else ""
        print(
            f"{final['dataset']}: {final['files_total']} objects, "
            f"{human_bytes(final['bytes_total'])}; "
            f"{human_bytes(final.get('bytes_to_download', final['bytes_needed']))} to "
            f"download{reused}, room for {human_bytes(final['room'])}: {verdict}"
        )
    else:
        print(
            f"{final['dataset']}: {describe(final)}, "
            f"{human_bytes(final['bytes_fetched'])} fetched in {final['elapsed']:.1f}s"
        )
        if final.get("reused"):  # copied inside the cache from the same content (no GET)
            print(f"{final['dataset']}: {final['reused']}")
        for key, reason in final["failed_objects"].items():
            print(f"FAILED {key}: {reason}", file=sys.stderr)
        if final["complete"] and not final["size_only"]:
            print(f"{final['dataset']}: complete, verified and pinned")
        elif final["complete"]:
            print(f"{final['dataset']}: complete and pinned, {_size_only(final)}")
        elif final["size_only"]:
            print(f"{final['dataset']}: {_size_only(final)}")
    if args.dry_run:
        return EXIT_OK if final["fits"] else EXIT_USAGE
    return EXIT_OK if final["ok"] else EXIT_INCOMPLETE


def _size_only(answer: dict[str, Any]) -> str:
    """The objects S3 gave nothing to verify end to end against, named plainly."""
    count, keys = answer["size_only"], answer["size_only_keys"]
    more = f", ... ({count - len(keys)} more)" if count > len(keys) else ""
    return (
        f"{count} object{'s' if count != 1 else ''} size-checked only, not verified end to end "
        f"(S3 gives no checksum for them and their ETags are not MD5s): {', '.join(keys)}{more}"
    )


def cmd_status(args: argparse.Namespace) -> int:
    from s3cachefs.daemon.runtime import all_records

    records = [find_daemon(args.mountpoint)] if args.mountpoint else all_records()
    if not records:
        raise ConfigError("no s3cachefs daemon is running")
    answers = [_last(request(r, {"op": "status"})) for r in records]
    if args.json:
        print(json.dumps(answers if not args.mountpoint else answers[0], indent=2))
        return EXIT_OK
    for status in answers:
        _print_status(status)
    return EXIT_OK


def _print_status(s: dict[str, Any]) -> None:
    c = s["cache"]
    ratio = "n/a" if c["hit_ratio"] is None else f"{c['hit_ratio']:.1%}"
    print(f"{s['mountpoint']}  <- {s['source']}  (pid {s['pid']}, up {s['uptime']}s)")
    print(
        f"  cache {c['dir']}: {human_bytes(c['used_bytes'])} of {human_bytes(c['limit_bytes'])}"
        f" ({human_bytes(c['pinned_bytes'])} pinned), disk free "
        f"{human_bytes(c['disk_free_bytes'])} (keeps {human_bytes(c['min_free_bytes'])})"
    )
    s3 = s.get("s3") or {}
    if s3.get("unreachable_since"):
        since = _when(s3["unreachable_since"])
        print(
            f"  ! S3 UNREACHABLE since {since} (start): {s3.get('reason')}; pinned datasets served"
        )
    d = s["daemon"]
    print(
        f"  daemon RSS {human_bytes(d['rss_bytes'])}, CPU {d['cpu_seconds']:.1f}s, "
        f"metrics {d['metrics_address'] or 'off'}, sentry {'on' if d['sentry'] else 'off'}"
    )
    print(
        f"  hit ratio {ratio}, {human_bytes(c['bytes_from_s3'])} from S3, "
        f"{c['in_flight_blocks']} blocks in flight, {c['corrupt_blocks']} corrupt blocks found"
    )
    for d in s["datasets"]:
        when = (
            "never"
            if d["verified_at"] is None
            else datetime.datetime.fromtimestamp(d["verified_at"]).isoformat(timespec="seconds")
        )
        state = "complete" if d["complete"] else "INCOMPLETE"
        shard = f" shard {d['shard']}" if d["shard"] else ""
        if d.get("kernel_served"):
            served = f"kernel-served ({d.get('kernel_mount') or 'bind'} on {d['bind']})"
        else:
            served = f"through FUSE ({d.get('kernel_note') or 'not bound'})"
        print(
            f"  dataset {d['dataset']}{shard}: {d['objects']} objects, "
            f"{human_bytes(d['bytes'])}, {d['cached_percent']}% cached, {state}, "
            f"verified {when}, {served}"
        )
        if d.get("size_only"):
            print(f"    {_size_only(d)}")
        check = d.get("kernel_check")
        if check:
            print(f"    {_describe_check(check, d.get('kernel_check_next'))}")
    for j in s["jobs"]:
        print(f"  prefetching {j['dataset']}: {describe(j)}")
    w = s["writes"]
    if w["writable"]:
        flags = [f for f in ("allow_overwrite", "allow_delete") if w[f]]
        print(
            f"  writable ({', '.join(flags) or 'create only'}): {w['uploads']} uploads, "
            f"{human_bytes(w['upload_bytes'])}, {w['upload_failures']} failed, "
            f"{w['open_for_writing']} open for writing"
        )
    for x in s["staged"]:
        where = f"s3://{x['bucket']}/{x['key']}"
        print(f"  ! NOT UPLOADED {where} ({human_bytes(x['size'])}, {x['state']}): {x['error']}")
    if s["staged"]:
        print("    resolve with `s3cachefs staged --upload` or `--discard`")
    for line in s["recent_errors"]:
        print(f"  ! {line}")


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).isoformat(timespec="seconds")


def _describe_check(check: dict[str, Any], next_at: float | None) -> str:
    """The last read-back of a kernel-served dataset's files, and when the next one is due."""
    what = f"{check['objects']} files, {human_bytes(check['bytes'])}"
    if check["ok"]:
        due = f"; next {_when(next_at)}" if next_at else ""
        return f"files checked {_when(check['at'])} ({check['trigger']}, {what}): intact{due}"
    first = check["damaged"][0] if check["damaged"] else "?"
    return (
        f"! files checked {_when(check['at'])} ({check['trigger']}, {what}): "
        f"{check['damaged_count']} DAMAGED (e.g. {first})"
    )


def cmd_verify(args: argparse.Namespace) -> int:
    record = find_daemon(args.mount, args.dataset)
    final = _last(request(record, {"op": "verify", "dataset": dataset_in(record, args.dataset)}))
    if args.json:
        print(json.dumps(final))
    else:
        print(
            f"{final['dataset']}: {final['files_checked']} files checked, "
            f"{len(final['repaired'])} repaired, {len(final['failed_objects'])} failed"
        )
        for key in final["repaired"]:
            print(f"repaired {key}")
        if final.get("size_only"):
            print(f"{final['dataset']}: {_size_only(final)}")
        for key, reason in final["failed_objects"].items():
            print(f"FAILED {key}: {reason}", file=sys.stderr)
    return EXIT_OK if final["ok"] else EXIT_INCOMPLETE


def cmd_evict(args: argparse.Namespace) -> int:
    record = find_daemon(args.mount, args.dataset)
    final = _last(request(record, {"op": "evict", "dataset": dataset_in(record, args.dataset)}))
    print(f"{final['dataset']}: unpinned, {human_bytes(final['freed_bytes'])} freed")
    if final.get("deferred_bytes"):  # an older daemon does not say
        print(f"{human_bytes(final['deferred_bytes'])} freed at their readers' last close")
    return EXIT_OK


def cmd_sentry_test(args: argparse.Namespace) -> int:
    record = find_daemon(args.mount)
    for event in request(record, {"op": "sentry-test"}):
        if event.get("event") == "error":
            print(
                f"the daemon of {record.mountpoint} raised a test error; with SENTRY_DSN set "
                "it is on its way to Sentry"
            )
            return EXIT_OK
    raise ConfigError("the daemon did not raise the test error")


def cmd_staged(args: argparse.Namespace) -> int:
    record = find_daemon(args.mount)
    action = "upload" if args.upload else "discard" if args.discard else "list"
    message = {"op": "staged", "action": action, "targets": args.targets, "all": args.all}
    final = _last(request(record, message))
    if args.json:
        print(json.dumps(final))
    elif action == "list":
        for x in final["staged"]:
            created = datetime.datetime.fromtimestamp(x["created"]).isoformat(timespec="seconds")
            where = f"s3://{x['bucket']}/{x['key']}"
            print(f"{x['id']}  {x['state']:10}  {human_bytes(x['size']):>9}  {created}  {where}")
            print(f"    {x['error']}")
        if not final["staged"]:
            print("nothing staged: every written file is in S3")
    else:
        for key in final["done"]:
            print(f"{'uploaded' if action == 'upload' else 'discarded'} {key}")
        for key, reason in final["failed"].items():
            print(f"FAILED {key}: {reason}", file=sys.stderr)
    return EXIT_OK if final["ok"] else EXIT_INCOMPLETE
