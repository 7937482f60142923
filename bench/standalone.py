"""Run one first-profile workload on its own: the dataset, the local S3 server, one table.

``python -m bench.cluster`` and ``python -m bench.refresh`` share this: each
gives its options and how to run its rows on an open network.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import peers
from bench.dataset import Dataset, generate
from bench.network import PROFILES, Network
from bench.report import Report

MIB = 1024 * 1024

# (args, report, network, the bucket's folder, local disk copy, dataset, scratch) -> rows
Workload = Callable[
    [argparse.Namespace, Report, Network, Path, Path, Dataset, Callable[[str], Path]], None
]


def main(parser: argparse.ArgumentParser, prefix: str, workload: Workload) -> None:
    parser.add_argument("--small", action="store_true", help="1,000 pages + one 96 MiB object")
    parser.add_argument("--pages", type=int, default=0, help="override the number of pages")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    report = Report()
    try:
        pages, large, size = (1000, 1, 96 * MIB) if args.small else (4000, 3, 512 * MIB)
        s3root, local = work / "s3", work / "local"
        data = generate([s3root / peers.BUCKET, local], args.pages or pages, large, size)
        net = Network(PROFILES["local"], s3root)
        try:
            net.open()
            bucket = s3root / peers.BUCKET
            workload(args, report, net, bucket, local, data, lambda n: _scratch(work, n))
        finally:
            net.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report.table())
    if args.json:
        args.json.write_text(json.dumps(report.json(), indent=1))


def _scratch(work: Path, name: str) -> Path:
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
