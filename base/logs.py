"""Logging: one line per event, ``key=value`` context, journald-friendly."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log to stderr (foreground, journald adds the time) or to ``log_file`` (background)."""
    handler: logging.StreamHandler[Any]
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM"):  # under systemd: journald reads <N> as priority
            handler.setFormatter(JournalFormatter(fmt))
            _install(handler, level)
            return
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    _install(handler, level)


_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, which journald turns into the entry's level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def _install(handler: logging.StreamHandler[Any], level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore logs credentials-adjacent detail at DEBUG; keep it out unless asked for.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # `kill -USR1 PID` writes every thread's stack to the log: what a stuck daemon is doing.
    faulthandler.register(signal.SIGUSR1, file=handler.stream, all_threads=True)
