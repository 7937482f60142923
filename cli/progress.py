"""Prefetch progress for people (a live bar on a terminal, a line every few seconds
otherwise) and for programs (``--json``: every event as one JSON line)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from s3cachefs.base.values import human_bytes
from s3cachefs.cli.settings import seconds_variable

# Seconds between plain progress lines (no terminal: systemd, CI logs).
PLAIN_INTERVAL = 5.0


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe(event: dict[str, Any]) -> str:
    total = f"{event['files_total']}" + ("" if event.get("listing_done") else "+")
    line = (
        f"{event['files_done']}/{total} files, "
        f"{human_bytes(event['bytes_done'])}/{human_bytes(event['bytes_total'])}, "
        f"{human_bytes(event['rate'])}/s, ETA {_eta(event.get('eta'))}"
    )
    if event.get("failed"):
        line += f", {event['failed']} failed"
    return line


class ProgressView:
    def __init__(self, mode: str, out: TextIO = sys.stderr, label: str = "prefetch") -> None:
        self.mode = mode  # "json", "bar" or "plain"
        self.out = out
        self.label = label  # the command, at the start of plain lines
        self._last_plain = time.monotonic()
        self.interval = seconds_variable("S3CACHEFS_PROGRESS_INTERVAL", PLAIN_INTERVAL)

    @classmethod
    def choose(cls, json_output: bool, label: str = "prefetch") -> ProgressView:
        if json_output:
            return cls("json", sys.stdout, label)
        return cls("bar" if sys.stderr.isatty() else "plain", label=label)

    def update(self, event: dict[str, Any]) -> None:
        if self.mode == "json":
            print(json.dumps(event), file=self.out, flush=True)
        elif self.mode == "bar":
            width = 30
            fraction = event["bytes_done"] / event["bytes_total"] if event["bytes_total"] else 0
            bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
            self.out.write(f"\r[{bar}] {fraction:4.0%} {describe(event)}\x1b[K")
            self.out.flush()
        elif time.monotonic() - self._last_plain >= self.interval:
            self._last_plain = time.monotonic()
            print(f"{self.label}: {describe(event)}", file=self.out, flush=True)

    def finish(self) -> None:
        if self.mode == "bar":
            self.out.write("\n")
