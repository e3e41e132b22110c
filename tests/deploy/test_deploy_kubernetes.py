"""deploy/kubernetes: the overlays render, validate against the Kubernetes schemas offline
(kubernetes-validate), and hang together (selectors, ports, probes, config, policies)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.deploy_support import DEPLOY, REPO
from tests.deploy.kustomize import json_patch, pod_containers, pod_spec, render, split_image

K8S = DEPLOY / "kubernetes"
OVERLAYS = ["cpu", "gpu-vllm"]
# The oldest release we support (grpc probes are GA since 1.27) and the newest the schemas know.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# The seed's example config, committed unchanged (tests/agent/test_config.py loads it).
SEED_EXAMPLE = REPO / "example.yaml"
VLLM_KV_TRANSFER = {"kv_connector": "KVMeshConnector",
                    "kv_connector_module_path": "kvmesh.engine.vllm_connector",
                    "kv_role": "kv_both"}


def by_key(resources: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for res in resources:
        key = (res["kind"], res["metadata"]["name"])
        assert key not in out, f"duplicate resource {key}"
        out[key] = res
    return out


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, dict[tuple[str, str], dict[str, Any]]]:
    return request.param, by_key(render(K8S / "overlays" / request.param))


@pytest.fixture(scope="module")
def monitoring() -> dict[tuple[str, str], dict[str, Any]]:
    return by_key(render(K8S / "monitoring"))


def workloads(res: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in res.values() if pod_spec(r) is not None]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_containers(workload) for p in c.get("ports", [])}


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def container_env(container: dict[str, Any], res: dict[tuple[str, str], dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(res[("ConfigMap", src["configMapRef"]["name"])]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


# --- rendering and schemas -------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS + ["monitoring"])
def test_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays are rendered by tests/deploy/kustomize.py alone")
    folder = K8S / name if name == "monitoring" else K8S / "overlays" / name
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    theirs = by_key([d for d in yaml.safe_load_all(out) if d])
    assert by_key(render(folder)) == theirs


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_validates_against_kubernetes_schemas(overlay, version: str) -> None:
    _, res = overlay
    for key, doc in res.items():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{key} is invalid for Kubernetes {version}: {err}")


def test_overlay_has_the_expected_objects(overlay) -> None:
    _, res = overlay
    assert set(res) == {
        ("Namespace", "kvmesh"), ("ConfigMap", "kvmesh-controller"), ("ConfigMap", "kvmesh-lmcache"),
        ("Deployment", "kvmesh-controller"), ("Service", "kvmesh-controller"),
        ("NetworkPolicy", "kvmesh-controller"), ("Service", "kvmesh-engine"),
        ("StatefulSet", "kvmesh-engine"), ("Deployment", "kvmesh-redis"), ("Service", "kvmesh-redis"),
        ("NetworkPolicy", "kvmesh-redis"),
    }
    for key, doc in res.items():
        if key[0] != "Namespace":
            assert doc["metadata"]["namespace"] == "kvmesh", key


# --- wiring ----------------------------------------------------------------------------------

def test_services_select_pods_and_target_their_ports(overlay) -> None:
    _, res = overlay
    for (kind, name), svc in res.items():
        if kind != "Service":
            continue
        targets = [w for w in workloads(res)
                   if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert len(targets) == 1, f"Service {name} selects {len(targets)} workloads"
        ports = container_ports(targets[0])
        for port in svc["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"Service {name}: no container port {target}"
    engine = res[("StatefulSet", "kvmesh-engine")]
    assert engine["spec"]["serviceName"] == "kvmesh-engine"
    assert res[("Service", "kvmesh-engine")]["spec"]["clusterIP"] == "None"


def test_workloads_selectors_match_templates_and_config_exists(overlay) -> None:
    _, res = overlay
    for w in workloads(res):
        assert selects(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"])
        spec = pod_spec(w)
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in res
        mounts = {m["name"] for c in pod_containers(w) for m in c.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])}


def test_containers_are_unprivileged_with_resources_and_pinned_images(overlay) -> None:
    _, res = overlay
    for w in workloads(res):
        spec = pod_spec(w)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False and spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsUser"] != 0
        for c in pod_containers(w):
            name, tag, digest = split_image(c["image"])
            assert (tag and tag != "latest") or digest, f"{c['name']}: image {c['image']} not pinned"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{c['name']}: {kind}"


def test_controller_probes_use_the_grpc_health_service(overlay) -> None:
    _, res = overlay
    deploy = res[("Deployment", "kvmesh-controller")]
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    (c,) = pod_containers(deploy)
    ports = container_ports(deploy)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
    env = container_env(c, res)
    args = [expand(a, env) for a in c["args"]]
    assert args[0] == "controller"
    assert flag(args, "--host") == "0.0.0.0"
    assert int(flag(args, "--port")) == ports["http"] == 9000
    assert int(flag(args, "--monitor-port")) == ports["grpc"] == 9001
    # The Service exposes both, and the gRPC one says it is gRPC.
    svc_ports = {p["name"]: p for p in res[("Service", "kvmesh-controller")]["spec"]["ports"]}
    assert svc_ports["http"]["port"] == 9000 and svc_ports["grpc"]["port"] == 9001
    assert svc_ports["grpc"]["appProtocol"] == "grpc"


def test_engine_runs_its_agent_with_per_pod_identity(overlay) -> None:
    name, res = overlay
    engine = res[("StatefulSet", "kvmesh-engine")]
    (c,) = pod_containers(engine)
    ports = container_ports(engine)
    assert ports["agent-grpc"] == 8001 and ports["http"] == 8000
    assert c["livenessProbe"]["grpc"]["port"] == ports["agent-grpc"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in c["env"]}
    assert env["LMCACHE_P2P_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["LMCACHE_LMCACHE_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # LMCACHE_CONFIG_FILE names a key of the mounted ConfigMap.
    config_path = Path(env["LMCACHE_CONFIG_FILE"]["value"])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == config_path.parent)
    vol = next(v for v in pod_spec(engine)["volumes"] if v["name"] == mount["name"])
    assert config_path.name in res[("ConfigMap", vol["configMap"]["name"])]["data"]
    # The agent's metrics: on kvmesh-serve's HTTP port; inside vLLM on the agent's own 9101. The
    # annotation (kubernetes_sd) and the Service's `metrics` port (ServiceMonitor) agree on it.
    annotations = engine["spec"]["template"]["metadata"]["annotations"]
    metrics_port = ports["http"] if name == "cpu" else ports["metrics"]
    assert name == "cpu" or metrics_port == 9101
    assert int(annotations["prometheus.io/port"]) == metrics_port
    svc_metrics = next(p for p in res[("Service", "kvmesh-engine")]["spec"]["ports"] if p["name"] == "metrics")
    assert ports[svc_metrics["targetPort"]] == metrics_port
    args = c["args"]
    if name == "cpu":
        assert args[:1] == ["serve"] and flag(args, "--host") == "0.0.0.0"
        assert int(flag(args, "--port")) == ports["http"]
    else:
        assert args[:2] == ["vllm", "serve"] and flag(args, "--host") == "0.0.0.0"
        assert json.loads(flag(args, "--kv-transfer-config")) == VLLM_KV_TRANSFER
        assert split_image(c["image"])[1].endswith("cuda")
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_lmcache_configmap_is_the_seed_example_with_the_controller_service(overlay) -> None:
    _, res = overlay
    seed = yaml.safe_load(SEED_EXAMPLE.read_text())
    ours = yaml.safe_load(res[("ConfigMap", "kvmesh-lmcache")]["data"]["example.yaml"])
    svc = res[("Service", "kvmesh-controller")]
    grpc_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert seed["controller_pull_url"] == "localhost:9001"
    assert ours == {**seed, "controller_pull_url": f"{svc['metadata']['name']}:{grpc_port}"}


def test_network_policy_admits_only_agents_and_operators(overlay) -> None:
    _, res = overlay
    policy = res[("NetworkPolicy", "kvmesh-controller")]["spec"]
    controller = res[("Deployment", "kvmesh-controller")]
    engine = res[("StatefulSet", "kvmesh-engine")]
    assert selects(policy["podSelector"]["matchLabels"], controller["spec"]["template"]["metadata"]["labels"])
    assert policy["policyTypes"] == ["Ingress"]
    ports = container_ports(controller)
    peers = []
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` would admit everyone"
        for port in rule["ports"]:
            assert port["port"] in ports
        peers.extend(rule["from"])
    for peer in peers:
        assert set(peer) <= {"podSelector", "namespaceSelector"} and "ipBlock" not in peer
        assert all(sel.get("matchLabels") for sel in peer.values()), "an empty selector admits everyone"
    engine_labels = engine["spec"]["template"]["metadata"]["labels"]
    assert any(selects(p.get("podSelector", {}).get("matchLabels", {}), engine_labels)
               and "namespaceSelector" not in p for p in peers), "agents cannot reach the controller"
    assert any(p.get("namespaceSelector", {}).get("matchLabels") == {"kvmesh.io/operator": "true"} for p in peers)


def test_gpu_overlay_only_changes_the_engine() -> None:
    cpu = by_key(render(K8S / "overlays" / "cpu"))
    gpu = by_key(render(K8S / "overlays" / "gpu-vllm"))
    assert set(cpu) == set(gpu)
    for key in cpu:
        if key not in {("StatefulSet", "kvmesh-engine"), ("Service", "kvmesh-engine")}:
            assert cpu[key] == gpu[key], key


def test_json_patch_operations() -> None:
    doc = {"a": {"list": [1, 2]}, "b": 1}
    json_patch(doc, {"op": "add", "path": "/a/list/-", "value": 3})
    json_patch(doc, {"op": "add", "path": "/a/list/0", "value": 0})
    json_patch(doc, {"op": "replace", "path": "/b", "value": {"x": "y"}})
    json_patch(doc, {"op": "remove", "path": "/a/list/1"})
    json_patch(doc, {"op": "test", "path": "/b/x", "value": "y"})
    assert doc == {"a": {"list": [0, 2, 3]}, "b": {"x": "y"}}
    with pytest.raises(ValueError, match="test failed"):
        json_patch(doc, {"op": "test", "path": "/b/x", "value": "z"})
    with pytest.raises(ValueError, match="missing path"):
        json_patch(doc, {"op": "replace", "path": "/nope", "value": 1})


# --- Prometheus Operator objects (CRDs: not in the Kubernetes schemas, checked here) ----------

def test_service_monitors_select_services_and_ports(monitoring) -> None:
    cpu = by_key(render(K8S / "overlays" / "cpu"))
    services = [r for k, r in cpu.items() if k[0] == "Service"]
    monitors = [r for k, r in monitoring.items() if k[0] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"kvmesh-controller", "kvmesh-agent"}
    for mon in monitors:
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert mon["metadata"]["namespace"] == "kvmesh"
        spec = mon["spec"]
        assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector"}
        matched = [s for s in services if selects(spec["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(matched) == 1, f"{mon['metadata']['name']} selects {len(matched)} Services"
        (svc,) = matched
        # The job label becomes the Service's kvmesh.io/job: the name the alert rules use.
        assert svc["metadata"]["labels"][spec["jobLabel"]] == mon["metadata"]["name"]
        port_names = {p["name"] for p in svc["spec"]["ports"]}
        for ep in spec["endpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout"}
            assert ep["port"] in port_names and ep["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", ep["interval"])


def test_prometheus_rule_matches_alerts_yml(monitoring) -> None:
    rule = monitoring[("PrometheusRule", "kvmesh")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"], \
        "stale: run python deploy/kubernetes/monitoring/make_prometheusrule.py"


def test_job_annotations_match_the_service_monitors(overlay, monitoring) -> None:
    _, res = overlay
    jobs = {w["spec"]["template"]["metadata"]["annotations"]["kvmesh.io/job"] for w in workloads(res)
            if w["metadata"]["name"] != "kvmesh-redis"}  # Redis exports no metrics of its own
    assert jobs == {m["metadata"]["name"] for k, m in monitoring.items() if k[0] == "ServiceMonitor"}


def test_engine_config_as_the_real_agent_reads_it_in_a_pod(overlay, tmp_path: Path) -> None:
    from kvmesh.instance_agent.config import load_config

    _, res = overlay
    engine = res[("StatefulSet", "kvmesh-engine")]
    (c,) = pod_containers(engine)
    path = Path(next(e["value"] for e in c["env"] if e["name"] == "LMCACHE_CONFIG_FILE"))
    (tmp_path / path.name).write_text(res[("ConfigMap", "kvmesh-lmcache")]["data"][path.name])
    # What the kubelet puts in the environment of pod kvmesh-engine-1 at 10.1.2.3.
    downward = {"metadata.name": "kvmesh-engine-1", "status.podIP": "10.1.2.3"}
    env = {e["name"]: e["value"] if "value" in e else downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in c["env"] if "value" in e or "fieldRef" in e.get("valueFrom", {})}
    env["LMCACHE_CONFIG_FILE"] = str(tmp_path / path.name)
    config = load_config(env=env)
    assert config.lmcache_instance_id == "kvmesh-engine-1"
    assert config.p2p_host == "10.1.2.3" and config.host == "10.1.2.3"
    assert config.controller_pull_url == "kvmesh-controller:9001" and config.enable_controller
    assert config.worker_port(0) == 8001
