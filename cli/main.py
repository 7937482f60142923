"""``s3cachefs`` command line: parse, run the subcommand's function, print one clear
line on failure (exit codes: cli/exits.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from s3cachefs.base.errors import S3CacheFSError
from s3cachefs.cli.exits import EXIT_BUG, exit_code_for
from s3cachefs.cli.parser import Command, build_parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `argv` rides along: `mount` starts itself again, in the background, with it.
    args = build_parser().parse_args(argv, namespace=argparse.Namespace(argv=argv))
    command: Command = args.func
    try:
        return command(args)
    except S3CacheFSError as exc:
        print(f"s3cachefs: {exc}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001  a bug: its traceback went to the log; the user gets one line
        print(f"s3cachefs: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BUG
