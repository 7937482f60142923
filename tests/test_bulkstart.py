"""The bulk workers start with the daemon (issue 12): a prefetch does not wait for them.

A worker takes 0.4-0.9 s to start (its imports) on a loaded 2-core machine,
which a prefetch started on the first job used to wait for after its listing.
"""

from __future__ import annotations

import os

from tests.conftest import Bucket, Mounter, drop_page_cache
from tests.test_bulk import alive, wait_for, workers_of
from tests.test_prefetch import check_tree, fill, prefetch


def test_workers_run_before_any_prefetch_and_serve_it(bucket: Bucket, mounter: Mounter) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--prefetch-workers", "2")
    wait_for("two bulk workers, no prefetch yet", lambda: len(workers_of(mount.proc.pid)) == 2)
    before = sorted(workers_of(mount.proc.pid))
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert sorted(workers_of(mount.proc.pid)) == before  # the same two served it
    assert mount.log_text().count("bulk worker pid=") == 2  # none started for the job
    drop_page_cache()
    check_tree(mount, files)
    mount.stop()
    wait_for("the workers to exit with the daemon", lambda: not any(alive(p) for p in before))


def test_a_worker_that_dies_idle_is_replaced_for_the_next_prefetch(
    bucket: Bucket, mounter: Mounter
) -> None:
    files = fill(bucket, count=4)
    mount = mounter(bucket.name, "--prefetch-workers", "2")
    wait_for("two bulk workers", lambda: len(workers_of(mount.proc.pid)) == 2)
    dead = workers_of(mount.proc.pid)[0]
    os.kill(dead, 9)
    wait_for("the worker to die", lambda: not alive(dead))
    result = prefetch(mount, "dataset-v3")
    assert result.returncode == 0, result.stderr
    assert f"bulk worker pid={dead} ended (status -9)" in mount.log_text()
    assert dead not in workers_of(mount.proc.pid)
    drop_page_cache()
    check_tree(mount, files)
