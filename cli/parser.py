"""The ``s3cachefs`` argument parser: every subcommand, its options, and the function
that runs it (``args.func``)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from s3cachefs import __version__
from s3cachefs.cli.exits import EXIT_USAGE
from s3cachefs.cli.settings import add_mount_options, jobs_arg, shard_arg

# A subcommand: its parsed arguments in, an exit code out.
Command = Callable[[argparse.Namespace], int]

# `sync`'s default --jobs: datasets.dirsync's DEFAULT_JOBS (a test keeps them equal);
# not imported from there, which would load boto3 into every command.
SYNC_JOBS = 16


# Each command imports its module when it runs: `status`, `prefetch`, `unmount` only
# talk to a daemon and must not pay for boto3 and awscrt (`sync`'s) at every start.
@dataclass(frozen=True)
class lazy:
    """The `Command` ``s3cachefs.cli.MODULE.NAME``, imported when the command runs."""

    module: str
    name: str

    def target(self) -> Command:
        found: Command = getattr(importlib.import_module(f"s3cachefs.cli.{self.module}"), self.name)
        return found

    def __call__(self, args: argparse.Namespace) -> int:
        return self.target()(args)


DESCRIPTION = "s3cachefs command line: parse, run, print one clear line on failure."


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"s3cachefs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Each subcommand's parser sets ``func``: the `Command` that runs it."""
    parser = _Parser(prog="s3cachefs", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"s3cachefs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, func: Command, text: str) -> argparse.ArgumentParser:
        """A subcommand and the function that runs it, named together."""
        parsed = sub.add_parser(name, help=text)
        parsed.set_defaults(func=func)
        return parsed

    m = command(
        "mount",
        lazy("mount", "cmd_mount"),
        "mount BUCKET[/PREFIX] at MOUNTPOINT (read-only by default)",
    )
    add_mount_options(m)
    m.add_argument("--foreground", action="store_true", help="stay attached (systemd, debugging)")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    u = command(
        "unmount",
        lazy("mount", "cmd_unmount"),
        "unmount (also cleans a stale mount of a dead daemon)",
    )
    u.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    u.add_argument(
        "--lazy",
        action="store_true",
        help="detach it here now, even if files are open or other mount namespaces hold it",
    )

    p = command(
        "prefetch",
        lazy("jobs", "cmd_prefetch"),
        "download a dataset into the cache, verify and pin it",
    )
    p.add_argument(
        "dataset",
        metavar="DATASET",
        nargs="?",
        help="prefix under the mount, or a path in it (default: `prefetch` in --config)",
    )
    p.add_argument("--config", type=Path, help="a mount's TOML file: its mountpoint, datasets")
    p.add_argument("--mount", type=Path, help="the mount to use (default: the only one)")
    p.add_argument(
        "--jobs",
        type=jobs_arg,
        help="concurrent GETs (default: half of the mount's --s3-concurrency, 32)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, size and whether it fits")
    p.add_argument(
        "--require-checksums",
        action="store_true",
        help="fail objects that S3 gives nothing to verify end to end against (size-checked only)",
    )
    p.add_argument(
        "--shard", metavar="I/N", type=shard_arg, help="only shard I of N (stable hash of the key)"
    )
    p.add_argument("--list-out", type=Path, help="write the (shard's) keys to this file")
    p.add_argument("--json", action="store_true", help="machine-readable progress events")

    st = command(
        "status", lazy("jobs", "cmd_status"), "mounts, cache, pinned datasets, jobs, recent errors"
    )
    st.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, nargs="?")
    st.add_argument("--json", action="store_true")

    v = command(
        "verify",
        lazy("sync", "cmd_verify"),
        "re-check a pinned dataset (re-fetch what fails), or a synced directory (--dir)",
    )
    v.add_argument("dataset", metavar="DATASET", nargs="?")
    v.add_argument("--mount", type=Path)
    v.add_argument(
        "--dir", type=Path, metavar="DEST", help="check a `sync`ed directory offline instead"
    )
    v.add_argument("--json", action="store_true")

    _add_sync(
        command(
            "sync", lazy("sync", "cmd_sync"), "Sync-before-Run: a dataset into a plain directory"
        )
    )

    e = command("evict", lazy("jobs", "cmd_evict"), "unpin a dataset and free its cache space")
    e.add_argument("dataset", metavar="DATASET")
    e.add_argument("--mount", type=Path)

    w = command(
        "staged",
        lazy("jobs", "cmd_staged"),
        "files written but not uploaded: list, --upload, --discard",
    )
    w.add_argument("targets", metavar="ID|KEY", nargs="*", help="staged files (see the list)")
    action = w.add_mutually_exclusive_group()
    action.add_argument("--upload", action="store_true", help="upload them now")
    action.add_argument("--discard", action="store_true", help="delete the staged data")
    w.add_argument("--all", action="store_true", help="every staged file")
    w.add_argument("--mount", type=Path)
    w.add_argument("--json", action="store_true")

    t = command(
        "sentry-test",
        lazy("jobs", "cmd_sentry_test"),
        "make the daemon report a test error to Sentry",
    )
    t.add_argument("--mount", type=Path)

    d = command(
        "demo", lazy("demo", "cmd_demo"), "run the quick start against an embedded local S3 server"
    )
    d.add_argument("--workdir", type=Path, help="where to mount and cache (default: a temp dir)")
    return parser


def _add_sync(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", metavar="s3://BUCKET/DATASET", help="the dataset (a key prefix)")
    s.add_argument("dest", metavar="DEST", type=Path, help="the directory to fill")
    s.add_argument("--endpoint-url", help="S3-compatible endpoint, http(s)://HOST[:PORT]")
    s.add_argument("--region")
    s.add_argument("--profile")
    s.add_argument("--jobs", type=jobs_arg, default=SYNC_JOBS, help=f"GETs at once ({SYNC_JOBS})")
    s.add_argument(
        "--delete", action="store_true", help="remove files of objects deleted in S3 (kept else)"
    )
    s.add_argument("--dry-run", action="store_true", help="what would be fetched, whether it fits")
    s.add_argument(
        "--require-checksums",
        action="store_true",
        help="fail objects that S3 gives nothing to verify end to end against (size-checked only)",
    )
    s.add_argument(
        "--etag-md5",
        choices=("auto", "off"),
        default="auto",
        help="off: this server's 32-hex ETags are not MD5s (as mount's --etag-md5)",
    )
    s.add_argument(
        "--shard", metavar="I/N", type=shard_arg, help="only shard I of N (stable hash of the key)"
    )
    s.add_argument("--list-out", type=Path, help="write the (shard's) keys to this file")
    s.add_argument("--json", action="store_true", help="machine-readable progress events")
