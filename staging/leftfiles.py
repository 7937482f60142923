"""The rules of ``s3cachefs staged``: which staged files are left, and which it may act on.

A file is *left* when no application has it open and no close is finishing it:
a failed upload, what a crash left over (`staging.crashscan`), or a copy
superseded by a later upload of its key. Only files written for the mounted
bucket are uploaded or discarded (a damaged record has no bucket: discard only),
and ``--all`` leaves superseded copies alone: uploading one would replace the
newer object.
"""

from __future__ import annotations

from collections.abc import Iterable

from s3cachefs.base.errors import BusyError, ConfigError
from s3cachefs.staging.records import SUPERSEDED, UNREADABLE, Staged


def left(staged: Iterable[Staged]) -> list[Staged]:
    """Staged files no application has open nor is closing, oldest first."""
    return sorted((s for s in staged if s.handles == 0 and not s.closing), key=lambda s: s.created)


def select(
    staged: Iterable[Staged], bucket: str, targets: list[str], every: bool, *, upload: bool
) -> list[Staged]:
    """Left files of ``bucket`` named by id or key, or all (``every`` skips superseded)."""
    everything = list(staged)
    remaining = left(everything)
    mine = [s for s in remaining if s.bucket == bucket or s.state == UNREADABLE]
    if every:
        return [s for s in mine if s.state != SUPERSEDED and not (upload and s.state == UNREADABLE)]
    chosen = [s for s in mine if s.id in targets or (s.key in targets and s.state != SUPERSEDED)]
    for target in targets:
        if any(target in (s.id, s.key) for s in chosen):
            continue
        other = [s for s in remaining if target in (s.id, s.key) and s not in mine]
        if other:
            raise ConfigError(
                f"{target} was written for s3://{other[0].bucket}; mount that bucket on "
                "this cache dir to upload or discard it"
            )
        if any(target == s.key for s in everything):
            raise BusyError(f"{target}: still open for writing, or superseded (name its id)")
        raise ConfigError(f"nothing staged as {target}")
    if upload and any(s.state == UNREADABLE for s in chosen):
        raise ConfigError("a staged file with a damaged record has no key: discard it")
    return chosen


def check_bucket(staged: Staged, bucket: str) -> None:
    """Refuse to act on a file written for another bucket (ConfigError)."""
    if staged.bucket != bucket and staged.state != UNREADABLE:
        raise ConfigError(
            f"{staged.key} was written for s3://{staged.bucket}; mount that bucket on "
            "this cache dir to upload or discard it"
        )
