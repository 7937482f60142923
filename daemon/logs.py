"""Logging: one line per event, ``key=value`` context, journald-friendly."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str, log_file: Path | None = None) -> None:
    """Log to stderr (foreground, journald adds the time) or to ``log_file`` (background)."""
    handler: logging.Handler
    if log_file is None:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(levelname)s %(name)s: %(message)s"
    else:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # botocore logs credentials-adjacent detail at DEBUG; keep it out unless asked for.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
