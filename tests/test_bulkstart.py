"""The bulk workers (issue 12): they start with the daemon, so a prefetch does not wait
for them; their lean SigV4 signs as botocore does; they import no botocore (the daemon
sends them frozen credentials).

A worker takes 0.4-1.0 s to start (its imports) on a loaded 2-core machine,
which a prefetch started on the first job used to wait for after its listing.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import urllib.parse

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from s3cachefs.cache.bulksign import GetSigner, Secrets, signed_host
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


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/bucket/",
        "https://s3.eu-west-3.amazonaws.com/bucket/",
        "https://Bucket.S3.Example.com:443/",
        "http://[::1]:8080/bucket/",
    ],
)
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEB4aDPq+/token=="])
def test_the_workers_signer_signs_a_get_as_botocore_does(url: str, token: str | None) -> None:
    frozen = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    split = urllib.parse.urlsplit(url)
    path = split.path + urllib.parse.quote("dir/a  b+ü~(1).bin", safe="/~")
    headers = {"Range": "bytes=1048576-2097151", "If-Match": '"9b2cf535f27731c974343645a3985328"'}
    target = f"{split.scheme}://{split.netloc}{path}"
    request = AWSRequest(method="GET", url=target, headers=headers)
    S3SigV4Auth(frozen.get_frozen_credentials(), "s3", "eu-west-3").add_auth(request)
    theirs = dict(request.headers.items())
    now = datetime.datetime.strptime(theirs["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
    signer = GetSigner(signed_host(url), "eu-west-3")
    secrets = Secrets(frozen.access_key, frozen.secret_key, frozen.token)
    assert signer.sign(path, headers, secrets, now) == theirs
    assert signer.sign(path, headers, secrets, now) == theirs  # the day's key, kept


def test_the_worker_imports_no_botocore_boto3_or_awscrt() -> None:
    """The daemon owns the credential chain and sends frozen credentials: a worker that
    imported botocore (its credential chain pulls awscrt, urllib3, ...) took ~0.3 s of
    CPU more to start."""
    heavy = ("botocore", "boto3", "awscrt", "_awscrt", "urllib3")
    code = (
        "import sys, s3cachefs.cache.bulkworker\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.split() == []


def test_secrets_never_show_in_a_repr() -> None:
    secrets = Secrets("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token-xyz")
    assert "AKIDEXAMPLE" in repr(secrets)
    assert "wJalr" not in repr(secrets) and "token-xyz" not in repr(secrets)
