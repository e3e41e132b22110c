"""What the deploy tests know of the running mesh and Prometheus (started by conftest.py's
fixtures), and the small HTTP and polling helpers they use."""
from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import yaml

from tests.deploy.deploy_support import DEPLOY

T = TypeVar("T")

INSTANCE_ID = "deploy-test-instance"
LOCATION = "LocalCPUBackend"
METHOD = "int8"  # a fixed-rate codec: the ratio over fp16 is known to exceed 1
CHUNK_SIZE = 16
NUM_TOKENS = 40  # two full chunks and a partial one
NUM_CHUNKS = 3
KV_SHAPE = (2, 2, NUM_TOKENS, 64)  # [K/V, layers, tokens, channels]
DEADLINE_S = 60.0
# The shared bearer token every process of the test mesh reads from KVMESH_AUTH_TOKEN_FILE, as the
# deployments set it; every call the tests make carries it (the health routes need none).
TOKEN = "deploy-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


ENGINE_ID = "deploy-test-engine"
ENGINE_START_S = 240.0  # loads (and on a first run converts) the model


@dataclass
class EngineRun:
    """The embedded engine started beside the mesh."""

    port: int
    agent_port: int
    log: Path
    proc: subprocess.Popen | None = None


@dataclass
class Mesh:
    """Where the running controller and agent listen, and what the compress did."""

    http_port: int
    grpc_port: int
    agent_port: int
    agent_metrics_port: int
    tmp: Path
    env: dict[str, str]
    token_file: Path
    event: dict
    tokens: list[int]
    engine: EngineRun

    def scrape(self, port: int, headers: dict[str, str] | None = None) -> str:
        return scrape(port, headers)


def scrape(port: int, headers: dict[str, str] | None = None) -> str:
    """The /metrics page on loopback ``port``, fetched with the token (or with ``headers``)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=AUTH if headers is None else headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.read().decode()


def http_json(method: str, url: str, body: dict | None = None, headers: dict[str, str] | None = None) -> dict:
    """``method url`` with a JSON body and the mesh's token (or ``headers``); the JSON answer."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def poll(what: str, check: Callable[[], T], deadline_s: float = DEADLINE_S, proc_logs: Sequence[Path] = ()) -> T:
    """Call ``check`` until it returns something truthy, or fail with the last value and the logs."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as err:  # noqa: BLE001 - not there yet
            last = err
        else:
            if last:
                return last
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in proc_logs if p.exists())
    pytest.fail(f"{what}: not after {deadline_s}s (last: {last!r})\n{logs}")


@dataclass
class Prometheus:
    """A real Prometheus server on loopback, scraping the mesh with deploy/prometheus's config."""

    url: str
    config: dict
    # A kvmesh-agent target where nothing listens.
    dead_agent: str

    def query(self, expr: str) -> list[dict]:
        q = urllib.parse.urlencode({"query": expr})
        answer = http_json("GET", f"{self.url}/api/v1/query?{q}")
        if answer.get("status") != "success":
            raise AssertionError(f"query {expr!r} failed: {answer}")
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` now (None when it has no series yet)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr!r} gave {len(result)} series: {result}"
        return float(result[0]["value"][1])


def prometheus_config(targets: dict[str, list[str]], rules: Path, files: dict[str, Path]) -> dict:
    """deploy/prometheus/prometheus.yml pointed at ``targets`` (job -> host:port), scraping every
    second, the files it names (token, CA, client certificate) replaced by ``files`` (compose path ->
    test path, each one required); jobs not in ``targets`` are dropped."""
    config = yaml.safe_load(rewrite_paths((DEPLOY / "prometheus" / "prometheus.yml").read_text(), files))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    missing = set(targets) - set(jobs)
    assert not missing, f"prometheus.yml has no job {missing}"
    config["scrape_configs"] = [{**jobs[name], "static_configs": [{"targets": hosts}]}
                                for name, hosts in targets.items()]
    return config


def rewrite_paths(text: str, files: dict[str, Path]) -> str:
    """``text`` with each path of ``files`` replaced; every one must occur (the config names it)."""
    for old, new in files.items():
        assert old in text, f"{old} is not named in the config any more"
        text = text.replace(old, str(new))
    return text
