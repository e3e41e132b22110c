"""The controller's scrape job of deploy/prometheus/prometheus.yml as written (HTTPS, the CA, a client
certificate, the token from a file) against a real ``kvmesh-controller`` serving HTTPS with mutual TLS
and the token, scraped by a real Prometheus; the same job without the token, or showing a certificate
from another CA, is refused. And the images' health check reaching that controller's open /healthz
over mutual TLS with the process's own files."""
from __future__ import annotations

import copy
import json
import os
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy.certs import make_certs
from tests.deploy.deploy_support import DEPLOY, tool
from tests.deploy.mesh import DEADLINE_S, TOKEN, Prometheus, poll, rewrite_paths
from tests.support import VENV_BIN, free_port, running, wait_http_ok

JOB = "kvmesh-controller"


@dataclass
class TlsController:
    port: int
    certs: Path
    token_file: Path
    log: Path


def _https_ok(url: str, certs: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        return resp.status == 200


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsController]:
    tmp = tmp_path_factory.mktemp("tls-controller")
    certs = make_certs(tmp / "certs")
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TMPDIR": str(tmp),
           "KVMESH_AUTH_TOKEN_FILE": str(token_file)}
    log = tmp / "controller.log"
    with running(["sh", str(DEPLOY / "docker" / "entrypoint.sh"), "controller", "--host", "127.0.0.1",
                  "--port", str(port), "--monitor-port", str(free_port()),
                  "--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
                  "--tls-ca", str(certs / "ca.crt")], env=env, log=log):
        poll("the controller serves HTTPS", lambda: _https_ok(f"https://127.0.0.1:{port}/healthz", certs),
             proc_logs=[log])
        yield TlsController(port, certs, token_file, log)


def test_prometheus_scrapes_the_controller_with_the_job_as_written(controller: TlsController) -> None:
    files = {"/run/secrets/kvmesh-token": controller.token_file,
             "/run/secrets/kvmesh-ca": controller.certs / "ca.crt",
             "/run/secrets/kvmesh-client-cert": controller.certs / "client.crt",
             "/run/secrets/kvmesh-client-key": controller.certs / "client.key"}
    config = yaml.safe_load(rewrite_paths((DEPLOY / "prometheus" / "prometheus.yml").read_text(), files))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{controller.port}"]}]
    no_token = {**copy.deepcopy(job), "job_name": "no-token"}
    del no_token["authorization"]
    stranger = copy.deepcopy(job)
    stranger["job_name"] = "stranger-certificate"
    stranger["tls_config"].update(cert_file=str(controller.certs / "stranger.crt"),
                                  key_file=str(controller.certs / "stranger.key"))
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [job, no_token, stranger]}
    tmp = controller.log.parent / "prometheus"
    tmp.mkdir()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with running([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                  f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                  "--log.level=warn"], log=log) as proc:
        wait_http_ok(f"http://127.0.0.1:{port}/-/ready", timeout=DEADLINE_S, proc=proc)
        prometheus = Prometheus(f"http://127.0.0.1:{port}", config, "")

        def scraped() -> dict[str, float] | None:
            ups = {r["metric"]["job"]: float(r["value"][1]) for r in prometheus.query("up")}
            return ups if len(ups) == 3 else None

        ups = poll("Prometheus scrapes every job once", scraped, proc_logs=[log, controller.log])
        assert ups == {JOB: 1.0, "no-token": 0.0, "stranger-certificate": 0.0}
        # What it scraped is the controller's own page.
        assert prometheus.value(f'count({{job="{JOB}",__name__=~"kvmesh_.+"}})') > 0
        targets = {t["labels"]["job"]: t for t in
                   _json(f"http://127.0.0.1:{port}/api/v1/targets")["data"]["activeTargets"]}
        assert "401" in targets["no-token"]["lastError"], targets["no-token"]
        assert targets[JOB]["scrapeUrl"].startswith("https://")


def _json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_healthcheck_reaches_the_open_route_over_mutual_tls(controller: TlsController) -> None:
    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    url = f"https://127.0.0.1:{controller.port}"
    mine = {"KVMESH_TLS_CA_FILE": str(controller.certs / "ca.crt"),
            "KVMESH_TLS_CERT_FILE": str(controller.certs / "server.crt"),
            "KVMESH_TLS_KEY_FILE": str(controller.certs / "server.key")}
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": f"{url}/healthz", **mine}, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # /metrics needs the token too; with it the check passes.
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": f"{url}/metrics", **mine,
                                      "KVMESH_AUTH_TOKEN_FILE": str(controller.token_file)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    # Without a client certificate the server refuses the handshake; without the CA the client
    # refuses the server.
    for env in ({k: v for k, v in mine.items() if k == "KVMESH_TLS_CA_FILE"},
                {k: v for k, v in mine.items() if k != "KVMESH_TLS_CA_FILE"}):
        out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": f"{url}/healthz", **env}, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 1 and "unhealthy:" in out.stderr, (env, out.stderr)
