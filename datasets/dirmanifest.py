"""What a synced directory holds (`DirManifest`), kept crash-safe, and its offline check.

A `sync` keeps its state in ``DEST/.s3cachefs/``: ``manifest.json`` (every
object of the dataset, or of the shard, that DEST holds verified: size, ETag,
LastModified and the end-to-end check it passed, `store.checksums.Check`),
``journal.jsonl`` (one line per object verified or deleted since the manifest
was written: a kill -9 loses at most a line being written, never a verified
object recorded before it), ``tmp/`` (downloads in progress) and ``lock``.

The manifest is written whole (temp file, fsync, rename) at the end of a run;
the journal is then dropped. Loading replays the journal over the manifest,
so a run killed at any point resumes with every object it recorded.

`verify_dir` re-reads every file against its recorded check, with no S3
request: the check's expected digest is S3's, recorded when the object was
fetched and verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from s3cachefs.base.errors import ConfigError
from s3cachefs.store.checksums import Check, Digest

FORMAT = "s3cachefs-dir-v1"
STATE_DIR = ".s3cachefs"
READ_CHUNK = 1 << 20


def state_dir(dest: Path) -> Path:
    return dest / STATE_DIR


@dataclass(frozen=True)
class Entry:
    """One verified object in DEST: the S3 version it is, and the check it passed."""

    size: int
    etag: str
    mtime_ns: int
    check: Check

    def encode(self) -> list[Any]:
        return [self.size, self.etag, self.mtime_ns, self.check.encode()]

    @classmethod
    def decode(cls, data: Any) -> Entry:
        size, etag, mtime_ns, check = data
        return cls(int(size), str(etag), int(mtime_ns), Check.decode(check))


@dataclass
class DirManifest:
    """The objects a synced directory holds, keyed by path relative to DEST."""

    bucket: str
    prefix: str  # full key prefix of the dataset, ending in "/" (or "" for a whole bucket)
    endpoint_url: str | None
    shard: str | None = None  # "I/N" of the last run, or None for the whole dataset
    objects: dict[str, Entry] = field(default_factory=dict)
    # Files S3 no longer lists (deleted, or outside the shard) left in DEST: `--delete` removes.
    kept: dict[str, Entry] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason, of the last run
    complete: bool = False
    synced_at: float | None = None

    @property
    def source(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def encode(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint_url": self.endpoint_url,
            "shard": self.shard,
            "complete": self.complete,
            "synced_at": self.synced_at,
            "failed": self.failed,
            "objects": {k: e.encode() for k, e in sorted(self.objects.items())},
            "kept": {k: e.encode() for k, e in sorted(self.kept.items())},
        }

    @classmethod
    def decode(cls, data: dict[str, Any]) -> DirManifest:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} manifest")
        return cls(
            bucket=str(data["bucket"]),
            prefix=str(data["prefix"]),
            endpoint_url=data.get("endpoint_url"),
            shard=data.get("shard"),
            objects={str(k): Entry.decode(v) for k, v in data["objects"].items()},
            kept={str(k): Entry.decode(v) for k, v in data.get("kept", {}).items()},
            failed={str(k): str(v) for k, v in data.get("failed", {}).items()},
            complete=bool(data.get("complete")),
            synced_at=data.get("synced_at"),
        )

    def apply(self, line: dict[str, Any]) -> None:
        """One journal record: an object verified (``e``) or a file deleted (``d``)."""
        key = str(line["k"])
        if "e" in line:
            self.objects[key] = Entry.decode(line["e"])
            self.kept.pop(key, None)
        elif line.get("d"):
            self.objects.pop(key, None)
            self.kept.pop(key, None)


def load(dest: Path) -> DirManifest | None:
    """The manifest of DEST with its journal replayed; None if DEST was never synced.

    ConfigError if there is one and it cannot be read (not an s3cachefs manifest).
    """
    path = state_dir(dest) / "manifest.json"
    journal = state_dir(dest) / "journal.jsonl"
    try:
        manifest = DirManifest.decode(json.loads(path.read_text()))
    except FileNotFoundError:
        if not journal.exists():
            return None
        head = _journal_lines(journal)[:1]
        if not head or "source" not in head[0]:
            return None
        manifest = DirManifest(**head[0]["source"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: unreadable sync manifest ({exc})") from None
    for line in _journal_lines(journal):
        if "k" in line:
            manifest.apply(line)
    return manifest


def _journal_lines(journal: Path) -> list[dict[str, Any]]:
    """The journal's complete records (a last line cut by a kill is ignored)."""
    try:
        text = journal.read_text()
    except FileNotFoundError:
        return []
    lines = []
    for raw in text.splitlines():
        if not raw:
            continue  # records start on a fresh line (see `Journal._write`)
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # torn by a kill mid-write; the next run starts a fresh line
    return lines


def save(dest: Path, manifest: DirManifest) -> None:
    """Write the manifest atomically, then drop the journal it now contains."""
    folder = state_dir(dest)
    tmp = folder / "manifest.json.tmp"
    with tmp.open("w") as out:
        json.dump(manifest.encode(), out, separators=(",", ":"))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, folder / "manifest.json")
    fsync_dir(folder)
    with contextlib.suppress(FileNotFoundError):
        (folder / "journal.jsonl").unlink()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """Appends records for `DirManifest.apply`; flushed per record (kill -9 safe)."""

    def __init__(self, dest: Path, manifest: DirManifest) -> None:
        path = state_dir(dest) / "journal.jsonl"
        new = not path.exists() or path.stat().st_size == 0
        self._out: TextIO = path.open("a")
        if new:  # a journal without a manifest (first run killed) still names its source
            source = {
                "bucket": manifest.bucket,
                "prefix": manifest.prefix,
                "endpoint_url": manifest.endpoint_url,
                "shard": manifest.shard,
            }
            self._write({"source": source})

    def _write(self, record: dict[str, Any]) -> None:
        # A previous run killed mid-line left a torn line: start on a fresh one.
        self._out.write("\n" + json.dumps(record, separators=(",", ":")) + "\n")
        self._out.flush()

    def verified(self, key: str, entry: Entry) -> None:
        self._write({"k": key, "e": entry.encode()})

    def deleted(self, key: str) -> None:
        self._write({"k": key, "d": True})

    def close(self) -> None:
        self._out.close()


# ---- the offline check -------------------------------------------------------


@dataclass
class DirReport:
    """What `verify_dir` found."""

    source: str
    files_checked: int = 0
    bytes_checked: int = 0
    complete: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # key -> what is wrong
    size_only: list[str] = field(default_factory=list)  # keys with no end-to-end check

    @property
    def ok(self) -> bool:
        return self.complete and not self.failed


def file_matches(path: Path, entry: Entry) -> str | None:
    """None if the file at ``path`` is the object ``entry`` records, else what is wrong."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):  # a symlink or FIFO put in its place
            return "is not a regular file"
        if info.st_size != entry.size:
            return f"size is {info.st_size}, not {entry.size}"
        with path.open("rb") as f:
            digest = Digest(entry.check)
            while chunk := f.read(READ_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if digest.fed != entry.size:
        return f"size is not {entry.size}"
    if entry.check.kind != "size" and not digest.matches():
        return f"content does not match {entry.check.describe()} recorded from S3"
    return None


def verify_dir(dest: Path) -> DirReport:
    """Every file the manifest records, re-read and checked (no S3 request)."""
    manifest = load(dest)
    if manifest is None:
        raise ConfigError(f"{dest}: no sync manifest ({STATE_DIR}/manifest.json): not synced")
    report = DirReport(manifest.source, complete=manifest.complete)
    for key, entry in sorted(manifest.objects.items()):
        problem = file_matches(dest / key, entry)
        report.files_checked += 1
        if problem is None:
            report.bytes_checked += entry.size
            if not entry.check.end_to_end:
                report.size_only.append(key)
        else:
            report.failed[key] = problem
    for key, reason in manifest.failed.items():
        report.failed.setdefault(key, f"not synced: {reason}")
    return report
