"""CPU per ranged GET: a botocore ``get_object`` against the lean path (`store.rangeget`).

    python -m bench.getcost [--gets 600] [--size 100000]

Both read the same objects from `bench.dirs3` on loopback, one request at a
time; the figure is the calling thread's CPU time per GET (body read included).
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
    parser.add_argument("--gets", type=int, default=600)
    parser.add_argument("--size", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    work = Path(tempfile.mkdtemp(prefix="bench-getcost-"))
    try:
        (work / "bench").mkdir()
        for i in range(200):
            (work / "bench" / f"f{i}").write_bytes(os.urandom(args.size))
        server = DirS3(work, latency=0).start()
        config = MountConfig(
            bucket="bench",
            prefix="",
            mountpoint=work / "mnt",
            cache_dir=work / "cache",
            endpoint_url=server.endpoint_url,
        )
        store = S3Store(config)
        store.check_bucket()
        etags = {f"f{i}": store.head(f"f{i}").etag for i in range(200)}
        client = store._client  # the botocore path, as the daemon used it before
        print(f"{args.gets} GETs of {args.size:,} bytes from bench.dirs3, CPU per GET:")
        for name in ("botocore get_object", "lean path (rangeget)"):
            start = time.thread_time()
            for n in range(args.gets):
                key = f"f{n % 200}"
                if name.startswith("botocore"):
                    client.get_object(
                        Bucket="bench",
                        Key=key,
                        Range=f"bytes=0-{args.size - 1}",
                        IfMatch=etags[key],
                    )["Body"].read()
                else:
                    b"".join(
                        store.iter_range(key, etags[key], 0, args.size, 1 << 20, size=args.size)
                    )
            cpu = (time.thread_time() - start) / args.gets
            print(f"  {name:<24} {cpu * 1000:.2f} ms")
        server.stop()
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
