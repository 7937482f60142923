"""Property: objects replaced at random moments under random readers never yield a mix.

Several reader processes open a few objects through a real mount and pread
them at random offsets, holding each handle across a random number of reads,
while the test replaces the objects in S3 (same size, shorter, longer) at
random moments. Every read must be bytes of exactly one version put (exact
length too: a short read is only allowed at that version's end) or end in
ESTALE; every read through one handle, and through one inode, must be of the
same version. Bounded: a fixed number of replacements, seeded.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import Bucket, Mounter, drop_page_cache

MIB = 1024 * 1024
SEED = 11
READERS = 3
REPLACEMENTS = 24
TTL = 0.3
SIZES = (200_000, MIB + 4321, 2 * MIB + 17)

# One reader process: random handles, random preads, one JSON line per read.
# A short read that is not at EOF is continued at once, so that each line is
# "everything up to ``want`` bytes, or up to EOF, or up to an error".
READER = r"""
import hashlib, json, os, random, sys, time
root, keys, seed, stop, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), *sys.argv[4:]
rng = random.Random(seed)
handle = 0
with open(out, "w") as log:
    while not os.path.exists(stop):
        key = rng.choice(keys)
        handle += 1
        try:
            fd = os.open(os.path.join(root, key), os.O_RDONLY)
        except OSError as exc:
            log.write(json.dumps({"h": handle, "key": key, "open_err": exc.errno}) + "\n")
            continue
        try:
            st = os.fstat(fd)
            for _ in range(rng.randint(1, 12)):
                off = rng.randrange(st.st_size + 1)
                want = rng.randint(1, 600_000)
                data, err = b"", 0
                while len(data) < want:
                    try:
                        chunk = os.pread(fd, want - len(data), off + len(data))
                    except OSError as exc:
                        err = exc.errno
                        break
                    if not chunk:
                        break
                    data += chunk
                log.write(json.dumps({
                    "h": handle, "key": key, "ino": st.st_ino, "size": st.st_size,
                    "off": off, "want": want, "n": len(data), "err": err,
                    "sha": hashlib.sha256(data).hexdigest(),
                    "head": data[:16].hex(), "tail": data[-16:].hex(),
                }) + "\n")
                time.sleep(rng.random() * 0.05)
        finally:
            os.close(fd)
"""


@dataclass
class Check:
    """What the reads told us, and the versions each handle and inode can still be."""

    versions: dict[str, list[bytes]]
    handles: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    inodes: dict[int, set[int]] = field(default_factory=dict)
    good: int = 0
    stale: int = 0
    seen: set[tuple[str, int]] = field(default_factory=set)

    def matches(self, read: dict[str, object], v: bytes) -> bool:
        off, n, want = int(str(read["off"])), int(str(read["n"])), int(str(read["want"]))
        if len(v) != read["size"]:  # an inode's size is its version's
            return False
        if read["err"] == 0 and n != max(0, min(want, len(v) - off)):
            return False  # a short read not at this version's end: a silent truncation
        piece = v[off : off + n]
        if piece[:16].hex() != read["head"] or piece[-16:].hex() != read["tail"]:
            return False
        return hashlib.sha256(piece).hexdigest() == read["sha"]

    def add(self, reader: int, read: dict[str, object]) -> None:
        assert "open_err" not in read, f"open failed: {read}"
        key, ino = str(read["key"]), int(str(read["ino"]))
        if read["err"] == 0:
            self.good += 1
        else:
            assert read["err"] == 116, f"only ESTALE may end a read: {read}"  # errno.ESTALE
            self.stale += 1
        fits = {i for i, v in enumerate(self.versions[key]) if self.matches(read, v)}
        assert fits, f"bytes of no single version: {read}"
        handle = self.handles.setdefault((reader, int(str(read["h"]))), set(fits))
        handle &= fits
        assert handle, f"one handle returned bytes of two versions: {read}"
        inode = self.inodes.setdefault(ino, set(fits))
        inode &= fits
        assert inode, f"one inode returned bytes of two versions: {read}"
        if read["n"] and len(handle) == 1:
            self.seen.add((key, next(iter(handle))))


def test_random_reads_while_objects_are_replaced_never_mix_versions(
    bucket: Bucket, mounter: Mounter, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    keys = ["a.bin", "d/b.bin", "d/c.bin"]
    versions: dict[str, list[bytes]] = {}
    for key in keys:
        versions[key] = [rng.randbytes(rng.choice(SIZES))]
        bucket.put(key, versions[key][0])
    mount = mounter(
        bucket.name, "--metadata-ttl", str(TTL), "--block-size", "64K", "--min-free", "0"
    )
    stop = tmp_path / "stop"
    outs = [tmp_path / f"reader{i}.jsonl" for i in range(READERS)]
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(mount.path), ",".join(keys), str(SEED + i), *paths]
        )
        for i, paths in enumerate((str(stop), str(out)) for out in outs)
    ]
    try:
        for n in range(REPLACEMENTS):
            time.sleep(rng.uniform(0.05, 0.35))
            key = rng.choice(keys)
            size = rng.choice((len(versions[key][-1]), *SIZES))  # same size, or another
            versions[key].append(rng.randbytes(size))
            bucket.put(key, versions[key][-1])
            if n % 8 == 7:  # now and then only the daemon's cache is warm
                drop_page_cache()
    finally:
        stop.touch()
        codes = [r.wait(timeout=60) for r in readers]
    assert codes == [0] * READERS

    check = Check(versions)
    for i, out in enumerate(outs):
        for line in out.read_text().splitlines():
            check.add(i, json.loads(line))
    print(f"reads={check.good} estale={check.stale} versions_seen={len(check.seen)}")
    assert check.good >= 100
    assert len(check.seen) > len(keys)  # reads of replaced objects did happen

    time.sleep(TTL + 0.2)  # a fresh open after the TTL reads the last version, whole
    for key in keys:
        assert (mount.path / key).read_bytes() == versions[key][-1]
    assert mount.stop() == 0
