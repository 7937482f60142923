"""What can be checked of the container deployment without a container engine here.

No Docker or Podman engine runs on this machine (and base images cannot be
pulled), so the image is not built in CI. These tests check the files an
operator runs: the compose file's structure and FUSE plumbing, that every
setting it and the example configs use is one the daemon accepts, and that
the Dockerfile ships every package folder and the entrypoint/healthcheck.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

import yaml

from s3cachefs.cli.main import build_parser
from s3cachefs.cli.settings import mount_config, resolve

REPO = Path(__file__).resolve().parent.parent


def _mount_args() -> argparse.Namespace:
    return build_parser().parse_args(["mount"])


def test_compose_wires_fuse_propagation_and_the_order_of_services() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "s3cachefs", "prefetch", "worker"}
    daemon = services["s3cachefs"]
    assert "/dev/fuse:/dev/fuse" in daemon["devices"] and "SYS_ADMIN" in daemon["cap_add"]
    [shared] = [v for v in daemon["volumes"] if isinstance(v, dict)]
    assert shared["bind"]["propagation"] == "rshared"
    worker = services["worker"]
    [data] = worker["volumes"]
    assert data["source"] == shared["source"] and data["read_only"] is True
    assert worker["depends_on"]["prefetch"]["condition"] == "service_completed_successfully"
    assert services["prefetch"]["depends_on"]["s3cachefs"]["condition"] == "service_healthy"
    # Every S3CACHEFS_* variable is a setting the daemon knows, with a valid value.
    env = {k: str(v) for k, v in daemon["environment"].items()}
    config = mount_config(resolve(_mount_args(), env))
    assert config.allow_other and config.endpoint_url == "http://minio:9000"
    assert config.metrics_address == "0.0.0.0:9108"


def test_example_configs_are_valid(tmp_path: Path) -> None:
    for path in (REPO / "systemd" / "example.toml", REPO / "deploy" / "s3cachefs.toml"):
        values = resolve(_mount_args(), {"S3CACHEFS_CONFIG": str(path)})
        assert values["cache-size"] > 0
    example = resolve(_mount_args(), {"S3CACHEFS_CONFIG": str(REPO / "systemd" / "example.toml")})
    assert mount_config(example).mountpoint == Path("/mnt/datasets")
    assert example["prefetch"] == ["dataset-v3"]


def test_dockerfile_ships_every_package_folder_and_a_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert f"COPY {folder} {folder}" in text, folder
    assert 'ENTRYPOINT ["s3cachefs"]' in text
    assert 'CMD ["s3cachefs", "status"]' in text
    assert "fuse3" in text
