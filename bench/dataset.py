"""The benchmark dataset: document-image-like pages plus a few large objects.

Pages are 30 KB-3 MB with log-normal sizes (median ~250 KB), random
incompressible bytes, in ``dataset-v3/shard-NN/page-NNNNN.png``; large objects
are ``dataset-v3/archive/blob-N.bin``. The same bytes are written to every
root given (the S3 server's bucket folder and the local-disk baseline).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024
PREFIX = "dataset-v3"
# Files outside the dataset: cold reads while it is prefetched ("reads go first").
PROBE_PREFIX = "probe"
PROBES = 100
PROBE_SIZE = 100_000


@dataclass
class Dataset:
    pages: list[tuple[str, int]] = field(default_factory=list)  # (key, size)
    large: list[tuple[str, int]] = field(default_factory=list)

    @property
    def page_bytes(self) -> int:
        return sum(size for _, size in self.pages)

    @property
    def total_bytes(self) -> int:
        return self.page_bytes + sum(size for _, size in self.large)

    @property
    def count(self) -> int:
        return len(self.pages) + len(self.large)


def generate(roots: list[Path], pages: int, large: int, large_size: int, seed: int = 7) -> Dataset:
    rng = random.Random(seed)
    data = Dataset()
    per_shard = 250
    for i in range(pages):
        size = int(min(3_000_000, max(30_000, rng.lognormvariate(12.4, 0.9))))
        data.pages.append((f"{PREFIX}/shard-{i // per_shard:02d}/page-{i:05d}.png", size))
    for i in range(large):
        data.large.append((f"{PREFIX}/archive/blob-{i}.bin", large_size))
    probes = [(f"{PROBE_PREFIX}/p-{i:03d}.bin", PROBE_SIZE) for i in range(PROBES)]
    for key, size in probes + data.pages + data.large:
        body = rng.randbytes(size) if size <= 8 * MIB else None
        for root in roots:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            if body is not None:
                path.write_bytes(body)
        if body is None:  # large: stream in chunks, same bytes to every root
            files = [(root / key).open("wb") for root in roots]
            try:
                for _ in range(size // (8 * MIB)):
                    chunk = rng.randbytes(8 * MIB)
                    for f in files:
                        f.write(chunk)
                rest = rng.randbytes(size % (8 * MIB))
                for f in files:
                    f.write(rest)
            finally:
                for f in files:
                    f.close()
    return data
