"""Reads go first (issue 12): while a read waits on S3, the bulk engine sends no new
job while one is out; it never stops the prefetch, and resumes when no read waits.

A real worker process and a real S3 server behind the proxy of `tests.test_bulk`,
which counts GETs per key and holds those of chosen keys until the test lets them go.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from s3cachefs.cache.bulkworker import Done
from s3cachefs.cli.locals3 import LocalS3
from tests.conftest import Bucket, make_store
from tests.test_bulk import BS, GateProxy, engine_cache, md5_check, put_object, run_engine, until

BACKGROUND = [f"bg-{i}" for i in range(6)]


@pytest.fixture
def gate_proxy(s3_server: LocalS3) -> Iterator[GateProxy]:
    p = GateProxy(s3_server.endpoint_url)
    p.start()
    yield p
    p.gate.set()
    p.stop()


def test_a_waiting_read_holds_back_new_jobs_until_it_has_its_bytes(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    """One worker with two GET threads: while a read's GET is held at the server, the
    six prefetch runs go one at a time (not two at once); once it is answered, all go, each
    object fetched once, and the read got its bytes."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    read_version, read_data = put_object(bucket, store, "read", BS + 3)
    runs = [put_object(bucket, store, key, 1000) for key in BACKGROUND]
    cache = engine_cache(store, tmp_path / "c", workers=1)  # bulk_threads=2
    gate_proxy.held = {"read", *BACKGROUND}

    async def body() -> None:
        results: list[Done | None] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                assert await cache.read(read_version, 0, len(read_data)) == read_data

            async def fetch(i: int) -> None:
                version, data = runs[i]
                results.append(await cache.bulk.fetch(version, range(1), md5_check(data)))

            nursery.start_soon(read)
            await until(lambda: gate_proxy.gets["read"] == 1)
            for i in range(len(runs)):
                nursery.start_soon(fetch, i)
            await until(lambda: sum(gate_proxy.gets[k] for k in BACKGROUND) >= 1)
            await trio.sleep(0.3)  # a second job would have reached the proxy by now
            assert sum(gate_proxy.gets[k] for k in BACKGROUND) == 1
            assert cache.bulk.pool.held == 1
            gate_proxy.gate.set()
        assert len(results) == len(runs) and all(r is not None for r in results)
        assert all(gate_proxy.gets[k] == 1 for k in BACKGROUND), gate_proxy.gets
        assert gate_proxy.gets["read"] == 1
        assert cache.bulk.reads_waiting.count == 0

    run_engine(cache, body)


def test_a_read_that_never_ends_does_not_stop_the_prefetch(
    bucket: Bucket, tmp_path: Path, gate_proxy: GateProxy
) -> None:
    """A read held at the server all along: the prefetch's runs still all complete
    (one at a time), so no stream of reads can starve it."""
    store = make_store(bucket, tmp_path, gate_proxy.endpoint_url)
    read_version, read_data = put_object(bucket, store, "read", 10)
    runs = [put_object(bucket, store, key, 1000) for key in BACKGROUND]
    cache = engine_cache(store, tmp_path / "c", workers=1)
    gate_proxy.held = {"read"}

    async def body() -> None:
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                assert await cache.read(read_version, 0, len(read_data)) == read_data

            nursery.start_soon(read)
            await until(lambda: gate_proxy.gets["read"] == 1)
            for version, data in runs:
                assert await cache.bulk.fetch(version, range(1), md5_check(data)) is not None
            assert cache.bulk.reads_waiting.count == 1  # the read still waits
            gate_proxy.gate.set()
        assert all(gate_proxy.gets[k] == 1 for k in BACKGROUND), gate_proxy.gets

    run_engine(cache, body)
