"""The example worker: reads every file of its share of the dataset and reports.

It is told its share the way `examples/launcher.py` tells every worker: ``DATA_DIR``
(the dataset, read-only) and ``KEYS_FILE`` (its keys, one per line, relative to
``DATA_DIR``), plus ``RANK`` and ``WORLD_SIZE``. A real worker runs inference here.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def main() -> int:
    data = Path(os.environ["DATA_DIR"])
    keys = Path(os.environ["KEYS_FILE"]).read_text().split("\n")
    digest = hashlib.sha256()
    count = size = 0
    for key in filter(None, keys):
        body = (data / key).read_bytes()
        digest.update(key.encode() + b"\0" + hashlib.sha256(body).digest())
        count += 1
        size += len(body)
    line = (
        f"worker {os.environ['RANK']}/{os.environ['WORLD_SIZE']}: {count} files, "
        f"{size} bytes, sha256 {digest.hexdigest()}\n"
    )
    os.write(1, line.encode())  # one write: the workers share the launcher's stdout
    return 0


if __name__ == "__main__":
    sys.exit(main())
