"""Launch N workers on a verified dataset: Sync-before-Run with `s3cachefs.DatasetProvider`.

    python examples/launcher.py dataset-v3 --bucket datasets --directory /data/s3 \\
        --workers 4 --local                       # 4 local processes (examples/worker.py)
    python examples/launcher.py dataset-v3 --bucket datasets --mount /mnt/datasets \\
        --workers 4 --runtime docker --image worker:latest -- python /app/infer.py

1. ``ensure`` the dataset (or this node's shard, ``--shard I/N``): through the node's
   daemon when ``--mount`` names a mount it serves, else synced into ``--directory``
   (a pod without FUSE). Progress on the terminal; any failure is one line and exit 1.
2. Split the keys it returns among the workers, round-robin in key order (balanced and
   deterministic; the node's ``--shard`` already used the stable hash), one key file each.
3. Start the workers: local processes, or containers (``docker``/``podman run -v
   PATH:/data:ro``); each gets ``RANK``, ``WORLD_SIZE``, ``DATA_DIR`` and ``KEYS_FILE``
   (a list of paths relative to ``DATA_DIR``). Exit 0 only if every worker did.

(With a daemon, a container that must survive a daemon restart binds the mount's
parent with ``rslave`` instead: see the README, "Deploy on a GPU node".)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from s3cachefs import Dataset, DatasetProvider, Progress
from s3cachefs.base.errors import S3CacheFSError

WORKER = Path(__file__).with_name("worker.py")


def show(progress: Progress) -> None:
    """A one-line bar on a terminal, a plain line otherwise."""
    done = progress.bytes_done / progress.bytes_total if progress.bytes_total else 1.0
    line = (
        f"{progress.dataset}: {progress.files_done}/{progress.files_total} files, "
        f"{done:4.0%}, {progress.rate / 2**20:.1f} MiB/s"
    )
    if sys.stderr.isatty():
        print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def worker_command(args: argparse.Namespace, rank: int, data: Path, keys: Path) -> list[str]:
    env = {"RANK": str(rank), "WORLD_SIZE": str(args.workers)}
    if args.local:
        return list(args.command) or [sys.executable, str(WORKER)]
    mounts = ["-v", f"{data}:/data:ro", "-v", f"{keys}:/keys.txt:ro"]
    envs = [f"-e{k}={v}" for k, v in {**env, "DATA_DIR": "/data", "KEYS_FILE": "/keys.txt"}.items()]
    return [args.runtime, "run", "--rm", *mounts, *envs, args.image, *args.command]


def launch(args: argparse.Namespace, dataset: Dataset, workdir: Path) -> int:
    procs = []
    for rank in range(args.workers):
        keys = workdir / f"worker-{rank}.keys"
        keys.write_text("".join(k + "\n" for k in dataset.keys[rank :: args.workers]))
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(args.workers),
            DATA_DIR=str(dataset.path),
            KEYS_FILE=str(keys),
        )
        procs.append(subprocess.Popen(worker_command(args, rank, dataset.path, keys), env=env))
    codes = [proc.wait() for proc in procs]
    failed = [rank for rank, code in enumerate(codes) if code != 0]
    if failed:
        print(f"launcher: workers {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dataset")
    parser.add_argument("--bucket", required=True, help="BUCKET[/PREFIX]")
    parser.add_argument("--endpoint-url")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--mount", type=Path, help="a mount served by the node's daemon")
    where.add_argument("--directory", type=Path, help="sync into DIRECTORY/DATASET (no FUSE)")
    parser.add_argument("--shard", help="this node's shard I/N of the dataset")
    parser.add_argument("--workers", type=int, default=1)
    run = parser.add_mutually_exclusive_group(required=True)
    run.add_argument("--local", action="store_true", help="workers are local processes")
    run.add_argument("--runtime", choices=("docker", "podman"), help="workers are containers")
    parser.add_argument("--image", help="the worker image (with --runtime)")
    parser.add_argument("--timeout", type=float, help="seconds for the dataset to be ready")
    parser.add_argument("command", nargs="*", help="the worker's command (after --)")
    args = parser.parse_args(argv)
    if args.runtime and not args.image:
        parser.error("--runtime needs --image")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    bucket, _, prefix = args.bucket.partition("/")
    try:
        provider = DatasetProvider(
            bucket,
            mountpoint=args.mount,
            directory=args.directory,
            endpoint_url=args.endpoint_url,
            prefix=prefix,
        )
        shard = tuple(int(n) for n in args.shard.split("/")) if args.shard else None
        dataset = provider.ensure(
            args.dataset,
            shard=(shard[0], shard[1]) if shard else None,
            on_progress=show,
            timeout=args.timeout,
        )
    except (S3CacheFSError, ValueError) as exc:
        print(f"\nlauncher: {exc}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(
        f"launcher: {dataset.name} ready at {dataset.path}: {dataset.objects} objects, "
        f"{dataset.bytes} bytes{', kernel-served' if dataset.kernel_served else ''}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="s3cachefs-launch-") as workdir:
        Path(workdir).chmod(0o755)  # containers running as another user read the key files
        return launch(args, dataset, Path(workdir))


if __name__ == "__main__":
    sys.exit(main())
