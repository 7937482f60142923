"""A cold small file's time to first byte (issue 12, W3): what each open-read-close costs
in FUSE round trips and S3 requests, counted at the daemon and at the server."""

from __future__ import annotations

import os

from tests.conftest import Bucket, Mounter, status


def test_closing_files_of_a_read_only_mount_costs_no_round_trip(
    bucket: Bucket, mounter: Mounter
) -> None:
    """The kernel sends FLUSH on every close; a read-only mount answers the first one
    ENOSYS, so the kernel sends no more: reads stay right, and a close is no round trip."""
    bodies = {f"f{i}.bin": os.urandom(1000 + i) for i in range(5)}
    for key, body in bodies.items():
        bucket.put(key, body)
    mount = mounter(bucket.name)
    for _ in range(2):
        for key, body in bodies.items():
            with (mount.path / key).open("rb") as f:
                assert f.read() == body
    counts = status(mount)["fuse_requests"]
    assert counts.get("flush_unsupported", 0) == 1, counts
    assert counts.get("flush", 0) == 0, counts
