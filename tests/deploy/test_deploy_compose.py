"""deploy/compose: `docker compose config` where the client has compose, and in any case the file
validates against the Compose Specification's schema and hangs together: pinned images, files that
exist, distinct engines, Prometheus targets that are the services' real ports, the engines' config as
the real agent loader reads it, the token and certificates as secrets every kvmesh process reads, and
make_secrets.sh making them.

compose-spec.json beside this file is the Compose Specification's schema (github.com/compose-spec/
compose-spec, schema/compose-spec.json at 170098ba07d9, Apache-2.0), kept here so that the check runs
where no docker CLI is installed."""
from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from kvmesh.instance_agent.config import load_config
from tests.deploy.deploy_support import DEPLOY, REPO

SECURITY_ENV = {"KVMESH_AUTH_TOKEN_FILE": "kvmesh-token", "KVMESH_TLS_CERT_FILE": "kvmesh-cert",
                "KVMESH_TLS_KEY_FILE": "kvmesh-key", "KVMESH_TLS_CA_FILE": "kvmesh-ca"}

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


# --- the schema, the token and the certificates ----------------------------------------------

def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads((Path(__file__).parent / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert not errors, "\n".join(errors)
    # The check sees mistakes: a misspelt key of a service is one.
    broken = {**COMPOSE, "services": {**SERVICES, "controller": {**SERVICES["controller"], "secret": ["x"]}}}
    assert any("secret" in e.message for e in validator.iter_errors(broken))


def _secret_names(svc: dict) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in svc.get("secrets", [])}


def test_every_kvmesh_process_reads_the_token_and_its_certificate_from_secrets() -> None:
    declared = COMPOSE["secrets"]
    for name, svc in SERVICES.items():
        assert _secret_names(svc) <= set(declared), f"{name}: undeclared secrets"
        if not svc["image"].startswith("kvmesh/"):
            continue
        env = {k: str(v) for k, v in svc["environment"].items()}
        for var, secret in SECURITY_ENV.items():
            # Compose mounts a secret at /run/secrets/<name>.
            assert env.get(var) == f"/run/secrets/{secret}", f"{name}: {var}"
            assert secret in _secret_names(svc), f"{name}: secret {secret} not mounted"
        assert "KVMESH_INSECURE" not in env and "--insecure" not in svc["command"]
    assert {n for n, s in SERVICES.items() if s["image"].startswith("kvmesh/")} == {"controller", *ENGINES}


def test_secret_files_are_made_by_make_secrets_and_git_ignored() -> None:
    for name, secret in COMPOSE["secrets"].items():
        path = Path(secret["file"])
        assert path.parts[0] in ("secrets", "certs"), f"{name}: {path}"
        # The file names scripts/make_certs.sh writes.
        assert path.parts[0] == "secrets" or path.name in {"ca.crt", "server.crt", "server.key", "client.crt",
                                                           "client.key"}, f"{name}: {path}"
        rel = (COMPOSE_DIR / path).relative_to(REPO)
        out = subprocess.run(["git", "check-ignore", "--no-index", "-q", str(rel)], cwd=REPO, timeout=30)
        assert out.returncode == 0, f"{rel} is not git-ignored: a token or key could be committed"


def test_healthchecks_use_the_open_routes() -> None:
    for name in ("controller", *ENGINES):
        targets = SERVICES[name]["environment"]["KVMESH_HEALTHCHECK"].split(",")
        for target in targets:
            # The gRPC health service, or the liveness routes: the ones that need no token.
            assert target.startswith("grpc://") or re.fullmatch(r"https?://127\.0\.0\.1:\d+/(health|healthz)",
                                                                target), f"{name}: {target}"
        host_ports = {t.split("//")[1].split("/")[0] for t in targets}
        if name != "controller":
            assert f"{name}:8001" in host_ports, f"{name}: the agent (bound to its p2p_host) is not checked"


def test_prometheus_mounts_every_file_its_config_names() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounted = {f"/run/secrets/{s}" for s in _secret_names(SERVICES["prometheus"])}
    named = set()
    for job in prom["scrape_configs"]:
        named.add(job["authorization"]["credentials_file"])
        named.update(v for k, v in job.get("tls_config", {}).items() if k.endswith("_file"))
    assert named == mounted
    # The controller's HTTPS is checked against the CA the processes use, with a client certificate.
    secrets = COMPOSE["secrets"]
    assert secrets["kvmesh-ca"]["file"] == "./certs/ca.crt"
    assert secrets["kvmesh-client-cert"]["file"] == "./certs/client.crt"


def test_make_secrets_makes_what_compose_mounts(tmp_path: Path) -> None:
    make_certs = REPO / "scripts" / "make_certs.sh"
    if not make_certs.exists():
        pytest.skip("scripts/make_certs.sh is not in this tree yet (make_secrets.sh calls it)")
    script = COMPOSE_DIR / "make_secrets.sh"
    out = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name, secret in COMPOSE["secrets"].items():
        path = tmp_path / secret["file"]
        # Readable by the containers' users (compose bind-mounts the file as it is).
        assert path.is_file() and path.stat().st_mode & stat.S_IROTH, f"{name}: {path}"
    token = (tmp_path / "secrets" / "token").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    for folder in ("secrets", "certs"):
        assert stat.S_IMODE((tmp_path / folder).stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((tmp_path / "certs" / "ca.key").stat().st_mode) == 0o600
    # A second run keeps the token and the certificates.
    before = (tmp_path / "certs" / "server.crt").read_bytes()
    again = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "secrets" / "token").read_text().strip() == token
    assert (tmp_path / "certs" / "server.crt").read_bytes() == before
