"""deploy/compose: `docker compose config` where the client has compose, and in any case the file
hangs together: pinned images, files that exist, distinct engines, Prometheus targets that are the
services' real ports, and the engines' config as the real agent loader reads it."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from kvmesh.instance_agent.config import load_config
from tests.deploy.deploy_support import DEPLOY, REPO

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
ENGINES = ["engine-a", "engine-b"]
# The seed's example config, committed unchanged (tests/agent/test_config.py loads it).
SEED_EXAMPLE = REPO / "example.yaml"


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("the docker CLI is not installed")
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:
        pytest.skip(f"the docker CLI has no compose plugin: {(version.stderr or version.stdout).strip()}")
    out = subprocess.run([docker, "compose", "-f", str(COMPOSE_DIR / "compose.yaml"), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_services_and_images() -> None:
    assert set(SERVICES) == {"controller", *ENGINES, "redis", "prometheus", "grafana"}
    for name, svc in SERVICES.items():
        image = svc["image"]
        _, _, tag = image.rpartition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned"
        if "build" in svc:
            dockerfile = (COMPOSE_DIR / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve()
            assert dockerfile.is_file(), f"{name}: {dockerfile}"
        if name in ("controller", *ENGINES):
            assert svc["healthcheck"]["test"] == ["CMD", "kvmesh-healthcheck"]
            assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]


def test_bind_mounts_exist() -> None:
    named = set(COMPOSE.get("volumes", {}))
    for name, svc in SERVICES.items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_host_ports_are_distinct() -> None:
    host_ports = [p.split(":")[0] for svc in SERVICES.values() for p in svc.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), host_ports
    assert {p.split(":")[0] for e in ENGINES for p in SERVICES[e]["ports"]} == {"8000", "8010"}


def test_engines_are_distinct_instances_that_find_the_controller() -> None:
    controller_grpc = int(flag(SERVICES["controller"]["command"], "--monitor-port"))
    seen = set()
    for name in ENGINES:
        svc = SERVICES[name]
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert svc["depends_on"]["controller"]["condition"] == "service_healthy"
        mount = next(m for m in svc["volumes"] if m.split(":")[1] == env["LMCACHE_CONFIG_FILE"])
        config = load_config(COMPOSE_DIR / mount.split(":")[0], env=env)
        assert config.lmcache_instance_id == name and config.p2p_host == name
        assert config.controller_pull_url == f"controller:{controller_grpc}"
        assert config.enable_controller
        seen.add(config.lmcache_instance_id)
        assert svc["command"][0] == "serve" and flag(svc["command"], "--host") == "0.0.0.0"
    assert len(seen) == len(ENGINES)


def test_lmcache_yaml_is_the_seed_example_with_the_controller_service() -> None:
    seed = yaml.safe_load(SEED_EXAMPLE.read_text())
    ours = yaml.safe_load((COMPOSE_DIR / "lmcache.yaml").read_text())
    assert ours == {**seed, "controller_pull_url": "controller:9001"}


def test_prometheus_targets_are_the_services_ports() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    listening = {"controller": {int(flag(SERVICES["controller"]["command"], "--port"))}}
    for name in ENGINES:
        # kvmesh-serve's HTTP port carries its /metrics, the agent's series included.
        listening[name] = {int(flag(SERVICES[name]["command"], "--port"))}
    for job in prom["scrape_configs"]:
        for target in (t for sc in job["static_configs"] for t in sc["targets"]):
            host, _, port = target.rpartition(":")
            assert host in listening and int(port) in listening[host], f"{job['job_name']}: {target}"
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    agents = {t for sc in jobs["kvmesh-agent"]["static_configs"] for t in sc["targets"]}
    assert agents == {f"{e}:8000" for e in ENGINES}
    mounts = SERVICES["prometheus"]["volumes"]
    for rules in prom["rule_files"]:
        assert any(m.endswith(f":/etc/prometheus/{rules}:ro") for m in mounts), rules
