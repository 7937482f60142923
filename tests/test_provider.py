"""``s3cachefs.DatasetProvider``: the same datasets through a daemon (real FUSE) or a sync.

Real S3 (moto on 127.0.0.1), real mounts (`mounter`), no mocks.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import random
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from s3cachefs import Dataset, DatasetProvider, Progress
from s3cachefs.base.errors import (
    ConfigError,
    IncompleteError,
    NoSuchBucketError,
    NotEnoughSpaceError,
)
from s3cachefs.datasets import dirmanifest
from tests.conftest import Bucket, Mounter

MIB = 1 << 20


def fill(bucket: Bucket, count: int = 16) -> dict[str, bytes]:
    data = {}
    for i in range(count):
        rel = f"part{i % 4}/page{i:03d}.png"
        data[rel] = random.Random(i).randbytes(2000 + 700 * i)
        bucket.put(f"ds/{rel}", data[rel])
    return data


def contents(dataset: Dataset) -> dict[str, bytes]:
    return {key: (dataset.path / key).read_bytes() for key in dataset.keys}


def directory_provider(bucket: Bucket, tmp_path: Path) -> DatasetProvider:
    return DatasetProvider(
        bucket.name, directory=tmp_path / "data", endpoint_url=bucket.server.endpoint_url
    )


def test_directory_mode_ensure_status_verify_evict(bucket: Bucket, tmp_path: Path) -> None:
    data = fill(bucket)
    provider = directory_provider(bucket, tmp_path)
    assert provider.mode == "directory"
    seen: list[Progress] = []
    whole = provider.ensure("ds", on_progress=seen.append)
    assert whole.path == tmp_path / "data" / "ds"
    assert contents(whole) == data
    assert whole.keys == tuple(sorted(data))
    assert (whole.objects, whole.bytes) == (len(data), sum(map(len, data.values())))
    assert not whole.kernel_served
    assert seen and seen[-1].files_done == len(data)

    shard = provider.ensure("ds", shard=(2, 4))
    assert set(shard.keys) < set(data) and shard.shard == (2, 4)
    assert bucket.server.counts()["get"] == len(data)  # the shard was already there

    [state] = provider.status()
    assert (state.name, state.complete, state.shard) == ("ds", True, "2/4")
    assert provider.verify("ds").ok
    target = whole.path / whole.keys[0]
    raw = bytearray(target.read_bytes())
    raw[0] ^= 0xFF
    target.write_bytes(bytes(raw))
    report = provider.verify("ds")
    assert not report.ok and list(report.failed) == [whole.keys[0]]

    assert provider.evict("ds") > 0
    assert not whole.path.exists() and provider.status() == []


def test_daemon_and_directory_modes_give_the_same_keys_and_bytes(
    bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> None:
    data = fill(bucket)
    mount = mounter(bucket.name)
    daemon = DatasetProvider(bucket.name, mountpoint=mount.path)
    directory = directory_provider(bucket, tmp_path)
    assert daemon.mode == "daemon"
    for shard in [(1, 4), None]:
        seen: list[Progress] = []
        served = daemon.ensure("ds", shard=shard, on_progress=seen.append)
        synced = directory.ensure("ds", shard=shard)
        assert served.keys == synced.keys
        assert (served.objects, served.bytes) == (synced.objects, synced.bytes)
        assert contents(served) == contents(synced)
        assert served.path == mount.path / "ds"
    assert served.keys == tuple(sorted(data))
    assert served.kernel_served  # the whole dataset, complete and pinned
    states = {(s.name, s.shard): s for s in daemon.status()}
    assert states[("ds", None)].complete and states[("ds", None)].kernel_served
    assert daemon.verify("ds").ok
    assert daemon.evict("ds") > 0
    assert ("ds", None) not in {(s.name, s.shard) for s in daemon.status()}


def test_errors_are_the_projects_exceptions(
    bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> None:
    bucket.put("big/blob.bin", random.Random(1).randbytes(3 * MIB))
    mount = mounter(bucket.name, "--cache-size", "1M")
    with pytest.raises(NotEnoughSpaceError) as refused:
        DatasetProvider(bucket.name, mountpoint=mount.path).ensure("big")
    assert refused.value.needed >= 3 * MIB and refused.value.available <= MIB
    with pytest.raises(ConfigError, match="no s3cachefs daemon serves"):
        DatasetProvider(bucket.name, mountpoint=tmp_path / "nothing").ensure("big")
    with pytest.raises(ConfigError, match="serves s3://"):
        DatasetProvider("other-bucket", mountpoint=mount.path).ensure("big")
    with pytest.raises(NoSuchBucketError):
        DatasetProvider(
            "no-such-bucket-here", directory=tmp_path, endpoint_url=bucket.server.endpoint_url
        ).ensure("ds")
    with pytest.raises(ConfigError, match="exactly one"):
        DatasetProvider(bucket.name)


def test_a_timeout_is_incomplete_error_and_what_was_verified_stays(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = fill(bucket, 3)
    provider = directory_provider(bucket, tmp_path)
    with pytest.raises(IncompleteError, match="stopped"):
        provider.ensure("ds", timeout=0)
    assert bucket.server.counts()["get"] == 0
    assert contents(provider.ensure("ds", timeout=60)) == data


def test_from_config_and_asyncio_without_blocking_the_loop(bucket: Bucket, tmp_path: Path) -> None:
    data = fill(bucket, 4)
    config = tmp_path / "node.toml"
    config.write_text(
        f'source = "{bucket.name}"\n'
        f'endpoint-url = "{bucket.server.endpoint_url}"\n'
        f'directory = "{tmp_path / "data"}"\n'
    )
    provider = DatasetProvider.from_config(config)
    assert provider.directory == tmp_path / "data"

    async def main() -> tuple[Dataset, int]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        dataset = await asyncio.to_thread(provider.ensure, "ds")
        done.set()
        await task
        return dataset, ticks

    dataset, ticks = asyncio.run(main())
    assert contents(dataset) == data
    assert ticks > 1  # the loop ran while ensure worked in its thread


def test_threads_and_trio_share_one_provider(bucket: Bucket, tmp_path: Path) -> None:
    data = fill(bucket, 12)
    provider = directory_provider(bucket, tmp_path)
    results: dict[int, Dataset] = {}

    def one(index: int) -> None:
        results[index] = provider.ensure("ds", shard=(index, 2))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Two shards into one directory at once: one sync after the other, each complete.
    assert sorted(results[0].keys + results[1].keys) == sorted(data)
    assert not set(results[0].keys) & set(results[1].keys)

    async def main() -> Dataset:
        ticks = 0
        async with trio.open_nursery() as nursery:

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(ticker)
            dataset = await trio.to_thread.run_sync(functools.partial(provider.ensure, "ds"))
            nursery.cancel_scope.cancel()
        assert ticks > 1  # the trio loop ran while ensure worked in its thread
        return dataset

    assert contents(trio.run(main)) == data


def test_a_dataset_at_the_mount_root_is_named_as_the_daemon_names_it(
    bucket: Bucket, mounter: Mounter
) -> None:
    """A mount of BUCKET/ds: dataset ``ds`` is the mount root, "." to the daemon. It is
    kernel-served once complete, and `status` names it ``ds`` at the mountpoint."""
    data = fill(bucket)
    mount = mounter(f"{bucket.name}/ds")
    daemon = DatasetProvider(bucket.name, mountpoint=mount.path)
    served = daemon.ensure("ds")
    assert served.path == mount.path and served.keys == tuple(sorted(data))
    assert served.kernel_served
    states = {s.name: s for s in daemon.status()}
    assert set(states) == {"ds"}
    assert states["ds"].path == mount.path and states["ds"].kernel_served
    assert daemon.verify("ds").ok
    assert daemon.evict("ds") > 0
    assert daemon.status() == []


def test_directory_mode_evict_takes_the_sync_lock_and_removes_only_the_syncs_files(
    bucket: Bucket, tmp_path: Path
) -> None:
    data = fill(bucket)
    provider = directory_provider(bucket, tmp_path)
    dataset = provider.ensure("ds")
    (dataset.path / "notes.txt").write_text("mine, not the sync's")
    (dataset.path / "part0" / "mine.bin").write_bytes(b"also mine")
    state = dataset.path / dirmanifest.STATE_DIR

    with (state / "lock").open("a") as lock:  # a sync writing into DEST
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another sync is writing into"):
            provider.evict("ds")
    assert contents(dataset) == data

    assert provider.evict("ds") == sum(map(len, data.values()))
    left = sorted(str(p.relative_to(dataset.path)) for p in dataset.path.rglob("*"))
    assert left == ["notes.txt", "part0", "part0/mine.bin"]
    assert provider.status() == []
    with pytest.raises(ConfigError, match="is not a synced dataset"):
        provider.evict("ds")


def test_both_modes_skip_a_key_that_is_also_a_directory(
    bucket: Bucket, tmp_path: Path, mounter: Mounter
) -> None:
    """With ``ds/a`` and ``ds/a/b`` in S3 the FUSE view shows ``a`` as a directory: neither
    mode returns the key ``a`` (prefetch does not pin it), so every key is a file a worker
    can open, and the counts agree (review 13/16). ``a-x`` sorts between ``a`` and ``a/``."""
    bucket.put("ds/a", b"file hidden by the directory a/")
    bucket.put("ds/a/b", b"inside a")
    bucket.put("ds/a-x", b"between a and a/ in the listing")
    bucket.put("ds/c", b"plain")
    mount = mounter(bucket.name, "--min-free", "0")
    served = DatasetProvider(bucket.name, mountpoint=mount.path).ensure("ds")
    synced = DatasetProvider(
        bucket.name, directory=tmp_path / "data", endpoint_url=bucket.server.endpoint_url
    ).ensure("ds")
    assert synced.keys == ("a-x", "a/b", "c")
    assert served.keys == synced.keys
    assert (served.objects, served.bytes) == (synced.objects, synced.bytes)
    assert all((served.path / key).is_file() for key in served.keys)
