"""docker/: no engine runs here, so check what can be checked -- the compose file parses, its
references resolve, and the configuration it gives tusgate is valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import load_settings

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return doc


def test_services_of_the_scaled_mode(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"nats-1", "nats-2", "nats-3", "minio", "gateway-1", "gateway-2", "worker-1", "worker-2", "proxy"} <= services.keys()
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["command"][0] == "serve"
    for name in ("worker-1", "worker-2"):
        assert services[name]["command"][0] == "process"


def test_references_resolve(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], compose.get("volumes", {})
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for dependency in depends if isinstance(depends, list) else depends.keys():
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(".") or source in volumes, f"{name}: undeclared volume {source}"
        assert "image" in service or "build" in service


def test_nats_cluster_routes_name_each_other(compose: dict[str, Any]) -> None:
    for i in (1, 2, 3):
        command = " ".join(compose["services"][f"nats-{i}"]["command"])
        assert "-js" in command and "--cluster_name tusgate" in command
        for j in {1, 2, 3} - {i}:
            assert f"nats-{j}:6222" in command


@pytest.mark.parametrize("service", ["gateway-1", "worker-1"])
def test_tusgate_environment_is_valid_configuration(compose: dict[str, Any], service: str) -> None:
    env = {k: str(v) for k, v in compose["services"][service]["environment"].items() if k.startswith("TUSGATE_")}
    env = {k: v.replace("${TUSGATE_DESTINATION_KIND:-local}", "local").replace(
        "${TUSGATE_GRAPH_BASE_URL:-https://graph.microsoft.com/v1.0}", "https://graph.microsoft.com/v1.0") for k, v in env.items()}
    settings = load_settings(environ=env)
    assert settings.store_kind == "s3" and settings.nats_replicas == 3
    assert len(settings.nats_url.split(",")) == 3


def test_dockerfile_installs_the_package_and_runs_tusgate() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    for folder in ("gateway", "events", "processing"):
        assert f"COPY {folder} ./{folder}" in text
    assert 'ENTRYPOINT ["tusgate"]' in text
    assert "USER tusgate" in text


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode != 0,
    reason="no docker compose plugin on this machine",
)
def test_docker_compose_config_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
