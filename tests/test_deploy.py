"""The deployment files and the node install, without a container engine.

These check the files an operator runs: the compose file's structure and FUSE
plumbing, that every setting it and the example configs use is one the daemon
accepts, that the Dockerfile ships every package folder and the
entrypoint/healthcheck, and `./quickstart install`/`uninstall` staged under
DESTDIR (`systemd-analyze verify` of the installed units). tests/test_container.py
builds and runs the image for real.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from s3cachefs.cli.parser import build_parser
from s3cachefs.cli.settings import mount_config, resolve

pytestmark = pytest.mark.exclusive  # see the marker in pyproject.toml

REPO = Path(__file__).resolve().parent.parent


def _mount_args() -> argparse.Namespace:
    return build_parser().parse_args(["mount"])


def test_compose_wires_fuse_propagation_and_the_order_of_services() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"minio", "bucket", "s3cachefs", "prefetch", "worker"}
    daemon = services["s3cachefs"]
    assert "/dev/fuse:/dev/fuse" in daemon["devices"] and "SYS_ADMIN" in daemon["cap_add"]
    # The daemon binds the parent rshared and mounts below it; the others bind
    # the same parent rslave (a bind of the FUSE path dies with the daemon).
    [shared] = [v for v in daemon["volumes"] if isinstance(v, dict)]
    assert shared["bind"]["propagation"] == "rshared" and shared["target"] == "/mnt/host"
    assert daemon["environment"]["S3CACHEFS_MOUNTPOINT"] == "/mnt/host/datasets"
    for name in ("prefetch", "worker"):
        [parent] = [v for v in services[name]["volumes"] if isinstance(v, dict)]
        assert parent["source"] == shared["source"] and parent["target"] == "/mnt/host"
        assert parent["bind"]["propagation"] == "rslave"
    assert services["worker"]["volumes"][0]["read_only"] is True
    # The control socket on a named volume (podman-compose has no volumes_from).
    assert "s3cachefs-run:/run/s3cachefs" in daemon["volumes"]
    assert "s3cachefs-run:/run/s3cachefs" in services["prefetch"]["volumes"]
    assert not any("volumes_from" in s for s in services.values())
    # Start order by health, and restart policies.
    conditions = {
        (name, dep): spec["condition"]
        for name, service in services.items()
        for dep, spec in service.get("depends_on", {}).items()
    }
    assert conditions == {
        ("bucket", "minio"): "service_healthy",
        ("s3cachefs", "minio"): "service_healthy",
        ("s3cachefs", "bucket"): "service_completed_successfully",
        ("prefetch", "s3cachefs"): "service_healthy",
        ("worker", "prefetch"): "service_completed_successfully",
    }
    for name in ("minio", "s3cachefs"):
        assert services[name]["restart"] == "unless-stopped"
        assert services[name]["healthcheck"]["test"][0] == "CMD"
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


# --- `./quickstart install` / `uninstall`, staged under DESTDIR ------------------

UNITS = ("s3cachefs@.service", "s3cachefs-prefetch@.service")
INSTANCES = ("s3cachefs@datasets.service", "s3cachefs-prefetch@datasets.service")


def _quickstart(command: str, destdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DESTDIR": str(destdir)}
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        [str(REPO / "quickstart"), command],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _verify_units(root: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the installed instances as the node would see them.

    --root resolves ExecStart= (the /usr/local/bin link into /opt) inside the
    staged tree, which needs the machine's own units (sysinit.target, ...) there.
    """
    system = root / "usr" / "lib" / "systemd" / "system"
    if not system.exists():
        shutil.copytree("/lib/systemd/system", system, symlinks=True)
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *INSTANCES],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.timeout(1800)
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_quickstart_install_is_idempotent_passes_systemd_verify_and_uninstalls(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    etc = root / "etc" / "s3cachefs"
    etc.mkdir(parents=True)
    # The operator's mount config; the units' ConditionPathExists names it.
    shutil.copy(REPO / "systemd" / "example.toml", etc / "datasets.toml")
    # The units copied by hand, without the program (the README's old install):
    # systemd-analyze refuses them.
    system = root / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, system / unit)
    before = _verify_units(root)
    assert before.returncode != 0
    assert "/usr/local/bin/s3cachefs is not executable" in before.stderr

    first = _quickstart("install", root)
    assert first.returncode == 0, first.stderr
    link = root / "usr" / "local" / "bin" / "s3cachefs"
    assert os.readlink(link) == "../../../opt/s3cachefs/bin/s3cachefs"
    version = subprocess.run([str(link), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "s3cachefs 0.1.0"
    # The daemon's python has the patched pyfuse3, on its private libfuse 3.17.
    assert "passthrough build failed" not in first.stderr, first.stderr
    venv = root / "opt" / "s3cachefs"
    probe = "import pyfuse3; pyfuse3.passthrough_open; print(pyfuse3.__file__)"
    patched = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=False
    )
    assert patched.returncode == 0, patched.stderr
    ldd = subprocess.run(
        ["ldd", patched.stdout.strip()], capture_output=True, text=True, check=True
    )
    [libfuse] = [line.split()[2] for line in ldd.stdout.splitlines() if "libfuse3" in line]
    assert Path(libfuse).resolve().parent == (venv / "libfuse" / "lib").resolve(), ldd.stdout
    for unit in UNITS:
        installed = root / "etc" / "systemd" / "system" / unit
        assert installed.read_bytes() == (REPO / "systemd" / unit).read_bytes()
    example = etc / "example.toml"
    assert example.read_bytes() == (REPO / "systemd" / "example.toml").read_bytes()
    verified = _verify_units(root)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr

    # Re-run = upgrade: the package is reinstalled (a planted change is gone),
    # the operator's edits to the example are kept.
    site = next((root / "opt" / "s3cachefs" / "lib").glob("python3*/site-packages/s3cachefs"))
    (site / "__init__.py").write_text("raise SystemExit('stale install')\n")
    example.write_text(example.read_text() + "# edited by the operator\n")
    second = _quickstart("install", root)
    assert second.returncode == 0, second.stderr
    assert "keeping the existing /etc/s3cachefs/example.toml" in second.stdout
    assert example.read_text().endswith("# edited by the operator\n")
    again = subprocess.run([str(link), "--version"], capture_output=True, text=True, check=True)
    assert again.stdout.strip() == "s3cachefs 0.1.0"
    assert _verify_units(root).returncode == 0

    # An enabled instance (what `systemctl enable s3cachefs@datasets` links).
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir()
    (wants / "s3cachefs@datasets.service").symlink_to("/etc/systemd/system/s3cachefs@.service")
    (wants / "other.service").symlink_to("/etc/systemd/system/other.service")
    removed = _quickstart("uninstall", root)
    assert removed.returncode == 0, removed.stderr
    assert not (root / "opt" / "s3cachefs").exists()
    assert not link.is_symlink()
    for unit in UNITS:
        assert not (root / "etc" / "systemd" / "system" / unit).exists()
    assert not (wants / "s3cachefs@datasets.service").is_symlink()
    assert (wants / "other.service").is_symlink()
    # The operator's data stays.
    assert (etc / "datasets.toml").exists() and example.exists()
    # Uninstalling twice is fine; a foreign /usr/local/bin/s3cachefs is left alone.
    link.write_text("#!/bin/sh\n")
    assert _quickstart("uninstall", root).returncode == 0
    assert link.read_text() == "#!/bin/sh\n"


# --- Kubernetes ------------------------------------------------------------------

K8S_VERSION = "1.30.0"


def _k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((REPO / "deploy" / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_manifests_pass_the_api_schema_and_wire_propagation(tmp_path: Path) -> None:
    import kubernetes_validate

    docs = _k8s_documents()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The schema check is strict: a misspelt field fails it.
    [daemonset] = [d for d in docs if d["kind"] == "DaemonSet"]
    broken = json.loads(json.dumps(daemonset))
    mount = broken["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    mount["mountPropogation"] = mount.pop("mountPropagation")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)

    pod = daemonset["spec"]["template"]["spec"]
    [daemon] = pod["containers"]
    assert daemon["securityContext"]["privileged"] is True
    assert daemon["resources"]["requests"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [host_mnt] = [m for m in daemon["volumeMounts"] if m["name"] == "host-mnt"]
    assert host_mnt["mountPropagation"] == "Bidirectional" and host_mnt["mountPath"] == "/mnt/host"
    host_dir = volumes["host-mnt"]["hostPath"]["path"]
    env = {e["name"]: e["value"] for e in daemon["env"]}
    assert env["S3CACHEFS_MOUNTPOINT"] == "/mnt/host/datasets"
    # The ConfigMap's settings and the variables are ones the daemon accepts.
    [configmap] = [d for d in docs if d["kind"] == "ConfigMap"]
    config = tmp_path / "s3cachefs.toml"
    config.write_text(configmap["data"]["s3cachefs.toml"])
    mounted = mount_config(resolve(_mount_args(), {**env, "S3CACHEFS_CONFIG": str(config)}))
    assert mounted.mountpoint == Path("/mnt/host/datasets") and mounted.allow_other

    # Workloads: a prefetch init container on the daemon's socket, and every
    # container binds the same parent with HostToContainer, never the FUSE path.
    [job] = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    [prefetch] = spec["initContainers"]
    assert prefetch["args"][:2] == ["prefetch", "dataset-v3"]
    assert prefetch["args"][-1] == env["S3CACHEFS_MOUNTPOINT"]
    job_volumes = {v["name"]: v for v in spec["volumes"]}
    assert job_volumes["run"]["hostPath"]["path"] == volumes["run"]["hostPath"]["path"]
    for container in [prefetch, *spec["containers"]]:
        assert container["resources"]["requests"]
        [bind] = [m for m in container["volumeMounts"] if m["name"] == "host-mnt"]
        assert bind["mountPropagation"] == "HostToContainer" and bind["mountPath"] == "/mnt/host"
    assert job_volumes["host-mnt"]["hostPath"]["path"] == host_dir
