"""CPU per ListObjectsV2 page of 1,000 keys: botocore's parser against the lean path.

    python -m bench.listcost [--listings 20] [--keys 1000]

Both list the same prefix of `bench.dirs3` on loopback, one page at a time,
through `S3Store` (the lean path, `store.listing`; botocore's when a proxy
applies). The figure is the calling thread's CPU time per page (request, body
read and parse); the server's own time is not in it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.dirs3 import DirS3
from s3cachefs.base.config import MountConfig
from s3cachefs.store.s3 import S3Store


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listings", type=int, default=20)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-listcost-"))
    try:
        for i in range(args.keys):
            path = work / "bench" / "ds" / f"shard-{i // 250:02d}" / f"page-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        server = DirS3(work, latency=0).start()
        config = MountConfig(
            bucket="bench",
            prefix="",
            mountpoint=work / "mnt",
            cache_dir=work / "cache",
            endpoint_url=server.endpoint_url,
        )
        print(f"{args.listings} listings of {args.keys:,} keys from bench.dirs3, CPU per page:")
        for name in ("botocore list_objects_v2", "lean path (store.listing)"):
            lean = name.startswith("lean")
            store = S3Store(config)
            store.check_bucket()
            if not lean:  # what a proxy in the environment selects
                store._getter = None
            assert (store.range_getter is not None) == lean
            pages = 0.0
            start = time.thread_time()
            for _ in range(args.listings):
                for page in store.list_tree("ds/"):
                    pages += len(page) / args.keys
            cpu = (time.thread_time() - start) / pages
            print(f"  {name:<28} {cpu * 1000:.1f} ms")
        server.stop()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
