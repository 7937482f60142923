"""s3cachefs against local disk and its peers, on one dataset, in one run: one table.

    python -m bench [--small] [--profile local,lan,wan] [--json PATH]

Sets up what it needs (.venv via ./quickstart bench, rclone, s3fs, aws-cli), writes
the dataset to the S3 server's folder and to a plain local folder, then runs
W1 (prefetch/sync) and W3 (cold reads) on every profile, and W2 (parallel
reads), W4 (stat walk) and W5 (daemon RSS/CPU) on the first profile. Every
number is compared within the run (the machine is shared and noisy). See
bench/README.md.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"


def _ensure_venv() -> None:
    """Re-run inside the checkout's .venv, installed by ./quickstart: bench this code."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    os.execv(str(ROOT / "quickstart"), [str(ROOT / "quickstart"), "bench", *sys.argv[1:]])


if __name__ == "__main__":
    _ensure_venv()
    os.chdir(ROOT)  # the servers and proxies run as `python -m bench.*`
    from bench.run import main

    main()
