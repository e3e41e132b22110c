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
CERT_MANAGER = "cert-manager.io"
# The engines' NetworkPolicy and the cert-manager objects of components/tls.
SECURITY_OBJECTS = {
    ("NetworkPolicy", "kvmesh-engine"), ("Issuer", "kvmesh-selfsigned"), ("Issuer", "kvmesh-ca"),
    ("Certificate", "kvmesh-ca"), ("Certificate", "kvmesh-controller"), ("Certificate", "kvmesh-engine"),
    ("Certificate", "kvmesh-client"),
}
TOKEN_FILE = "/etc/kvmesh-token/token"
# The pod's stable DNS name the agents bind and register under TLS (components/tls/engine-tls.yaml).
ENGINE_DNS = "$(LMCACHE_LMCACHE_INSTANCE_ID).kvmesh-engine.kvmesh.svc.cluster.local"
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
        if doc["apiVersion"].startswith(f"{CERT_MANAGER}/"):
            continue  # a CRD: checked by test_cert_manager_issues_every_mounted_certificate
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{key} is invalid for Kubernetes {version}: {err}")


def test_overlay_has_the_expected_objects(overlay) -> None:
    _, res = overlay
    # (the security objects are listed apart: test_overlay_has_the_security_objects)
    assert set(res) - SECURITY_OBJECTS == {
        ("Namespace", "kvmesh"), ("ConfigMap", "kvmesh-controller"), ("ConfigMap", "kvmesh-lmcache"),
        ("Deployment", "kvmesh-controller"), ("Service", "kvmesh-controller"),
        ("NetworkPolicy", "kvmesh-controller"), ("Service", "kvmesh-engine"),
        ("StatefulSet", "kvmesh-engine"), ("Deployment", "kvmesh-redis"), ("Service", "kvmesh-redis"),
        ("NetworkPolicy", "kvmesh-redis"),
    }
    for key, doc in res.items():
        if key[0] != "Namespace":
            assert doc["metadata"]["namespace"] == "kvmesh", key


def test_overlay_has_the_security_objects(overlay) -> None:
    _, res = overlay
    assert SECURITY_OBJECTS <= set(res)


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
    env = container_env(c, res)
    # With TLS the kubelet cannot dial the gRPC health service itself: the image's health check does,
    # in the pod, on the same (open) service.
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["exec"]["command"] == ["kvmesh-healthcheck"], probe
    assert env["KVMESH_HEALTHCHECK"] == f"grpc://127.0.0.1:{ports['grpc']}"
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
    assert c["livenessProbe"]["exec"]["command"] == ["kvmesh-healthcheck"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in c["env"]}
    # Under TLS the agent binds and registers its pod's DNS name, which the certificate's wildcard names.
    assert env["LMCACHE_P2P_HOST"]["value"] == ENGINE_DNS
    assert env["KVMESH_HEALTHCHECK"]["value"] == f"grpc://$(LMCACHE_P2P_HOST):{ports['agent-grpc']}"
    names = [e["name"] for e in c["env"]]
    assert names.index("LMCACHE_LMCACHE_INSTANCE_ID") < names.index("LMCACHE_P2P_HOST") \
        < names.index("KVMESH_HEALTHCHECK"), "$(VAR) expands only variables defined before"
    assert res[("Service", "kvmesh-engine")]["spec"]["publishNotReadyAddresses"] is True
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
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization", "tlsConfig"}
            assert ep["port"] in port_names and ep["path"] == "/metrics"
            assert re.fullmatch(r"\d+[smh]", ep["interval"])
            # /metrics needs the token: the one Secret the pods mount.
            assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": "kvmesh-token", "key": "token"}}


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
    # What the kubelet puts in the environment of pod kvmesh-engine-1 at 10.1.2.3 ($(VAR) expanded in order).
    downward = {"metadata.name": "kvmesh-engine-1", "status.podIP": "10.1.2.3"}
    env: dict[str, str] = {}
    for e in c["env"]:
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
    env["LMCACHE_CONFIG_FILE"] = str(tmp_path / path.name)
    # The TLS files are mounted from cert-manager's Secret in a pod; here only the config is read.
    env = {k: v for k, v in env.items() if not k.startswith("KVMESH_TLS_") and k != "KVMESH_AUTH_TOKEN_FILE"}
    config = load_config(env=env)
    assert config.lmcache_instance_id == "kvmesh-engine-1"
    host = "kvmesh-engine-1.kvmesh-engine.kvmesh.svc.cluster.local"
    assert config.p2p_host == host and config.host == host
    assert config.controller_pull_url == "kvmesh-controller:9001" and config.enable_controller
    assert config.worker_port(0) == 8001


# --- the token, TLS and who may connect ------------------------------------------------------

def test_every_kvmesh_container_reads_the_token_from_the_secret(overlay) -> None:
    _, res = overlay
    kvmesh = [w for w in workloads(res) if any(c["image"].startswith("kvmesh/") for c in pod_containers(w))]
    assert {w["metadata"]["name"] for w in kvmesh} == {"kvmesh-controller", "kvmesh-engine"}
    for w in kvmesh:
        spec = pod_spec(w)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in pod_containers(w):
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env.get("KVMESH_AUTH_TOKEN_FILE") == TOKEN_FILE, f"{w['metadata']['name']}/{c['name']}"
            mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == Path(TOKEN_FILE).parent)
            assert mount.get("readOnly") is True
            secret = volumes[mount["name"]]["secret"]
            assert secret["secretName"] == "kvmesh-token" and not secret.get("optional", False)
            # Group-readable by the pod's fsGroup (the uid 10001 user is in it), by no one else.
            assert secret["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == 10001
            # With a token, listening on every interface is allowed (without one it is refused).
            assert "--insecure" not in c["args"] and "KVMESH_INSECURE" not in env


def _policy_ports(rule: dict[str, Any]) -> list[tuple[int, int]]:
    return [(p["port"], p.get("endPort", p["port"])) for p in rule["ports"]]


def _covers(rule: dict[str, Any], port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in _policy_ports(rule))


def test_network_policy_lets_only_the_controller_and_peers_reach_the_agents(overlay) -> None:
    _, res = overlay
    policy = res[("NetworkPolicy", "kvmesh-engine")]["spec"]
    engine = res[("StatefulSet", "kvmesh-engine")]
    controller = res[("Deployment", "kvmesh-controller")]
    engine_labels = engine["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], engine_labels) and policy["policyTypes"] == ["Ingress"]
    for rule in policy["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits everyone"
        assert all(isinstance(p["port"], int) for p in rule["ports"]), "ranges need numeric ports"
        for peer in rule["from"]:
            assert "ipBlock" not in peer and all(sel.get("matchLabels") for sel in peer.values())
    ports = container_ports(engine)
    # The agent ports of every worker (tensor parallel: 8001 + rank, 8200 + rank), rank 0..7 at least.
    agent_ports = [ports["agent-grpc"] + r for r in range(8)] + [ports["p2p"] + r for r in range(8)]
    for port in agent_ports:
        rules = [r for r in policy["ingress"] if _covers(r, port)]
        assert rules, f"agent port {port} is not covered: the default would admit nobody, a gap is a bug"
        for rule in rules:
            for peer in rule["from"]:
                # Pods of this namespace only (no namespaceSelector), and only the controller or engines.
                assert set(peer) == {"podSelector"}, f"port {port}: {peer}"
                labels = peer["podSelector"]["matchLabels"]
                assert selects(labels, engine_labels) or selects(
                    labels, controller["spec"]["template"]["metadata"]["labels"]), f"port {port}: {peer}"
    # /metrics (8000 with kvmesh-serve, 9101 + rank inside vLLM): Prometheus' namespace among the peers,
    # and the agents' own metrics ports for it alone.
    monitoring = {"namespaceSelector": {"matchLabels": {"kvmesh.io/monitoring": "true"}}}
    metrics_port = int(engine["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert any(_covers(r, metrics_port) and monitoring in r["from"] for r in policy["ingress"])
    for port in range(9101, 9109):
        rules = [r for r in policy["ingress"] if _covers(r, port)]
        assert rules and all(r["from"] == [monitoring] for r in rules), port


def test_cert_manager_issues_every_mounted_certificate(overlay) -> None:
    _, res = overlay
    issuers = {name: r for (kind, name), r in res.items() if kind == "Issuer"}
    certs = {r["spec"]["secretName"]: r for (kind, _), r in res.items() if kind == "Certificate"}
    for cert in certs.values():
        assert cert["apiVersion"] == f"{CERT_MANAGER}/v1" and cert["metadata"]["namespace"] == "kvmesh"
        ref = cert["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["group"] == CERT_MANAGER and ref["name"] in issuers
    # One CA signs every leaf: the CA Issuer holds the self-signed CA certificate's Secret.
    assert certs["kvmesh-ca"]["spec"]["isCA"] is True
    assert certs["kvmesh-ca"]["spec"]["issuerRef"]["name"] == "kvmesh-selfsigned"
    assert "selfSigned" in issuers["kvmesh-selfsigned"]["spec"]
    assert issuers["kvmesh-ca"]["spec"]["ca"]["secretName"] == "kvmesh-ca"
    for secret, cert in certs.items():
        if secret != "kvmesh-ca":
            assert cert["spec"]["issuerRef"]["name"] == "kvmesh-ca", secret
            assert "client auth" in cert["spec"]["usages"], secret
    # Each kvmesh pod mounts its certificate's Secret and names tls.crt / tls.key / ca.crt.
    wanted = {"kvmesh-controller": "kvmesh-controller-tls", "kvmesh-engine": "kvmesh-engine-tls"}
    for w in workloads(res):
        if w["metadata"]["name"] not in wanted:
            continue
        (c,) = pod_containers(w)
        env = {e["name"]: e.get("value") for e in c["env"]}
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        for var, key in (("KVMESH_TLS_CERT_FILE", "tls.crt"), ("KVMESH_TLS_KEY_FILE", "tls.key"),
                         ("KVMESH_TLS_CA_FILE", "ca.crt")):
            path = Path(env[var])
            assert path.name == key, var
            mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent)
            secret = volumes[mount["name"]]["secret"]["secretName"]
            assert secret == wanted[w["metadata"]["name"]] and secret in certs
            assert "server auth" in certs[secret]["spec"]["usages"]
    # The names peers dial are in the certificates: the controller's Service and loopback (the in-pod
    # health check); each engine pod's DNS name (under the wildcard) and loopback.
    controller = certs["kvmesh-controller-tls"]["spec"]
    assert {"kvmesh-controller", "kvmesh-controller.kvmesh.svc"} <= set(controller["dnsNames"])
    assert "127.0.0.1" in controller["ipAddresses"]
    engine = certs["kvmesh-engine-tls"]["spec"]
    pod_name = ENGINE_DNS.replace("$(LMCACHE_LMCACHE_INSTANCE_ID)", "kvmesh-engine-0")
    assert any(re.fullmatch(re.escape(d).replace(r"\*", r"[^.]+"), pod_name) for d in engine["dnsNames"])
    # The ServiceMonitor's client certificate is one of these.
    assert "server auth" not in certs["kvmesh-client-tls"]["spec"]["usages"]


def test_service_monitors_scrape_the_controller_over_mutual_tls(monitoring) -> None:
    cpu = by_key(render(K8S / "overlays" / "cpu"))
    certs = {r["spec"]["secretName"]: r for (kind, _), r in cpu.items() if kind == "Certificate"}
    (ep,) = monitoring[("ServiceMonitor", "kvmesh-controller")]["spec"]["endpoints"]
    assert ep["scheme"] == "https"
    tls = ep["tlsConfig"]
    secrets = {tls["ca"]["secret"]["name"], tls["cert"]["secret"]["name"], tls["keySecret"]["name"]}
    assert secrets == {"kvmesh-client-tls"} and "kvmesh-client-tls" in certs
    assert tls["serverName"] in certs["kvmesh-controller-tls"]["spec"]["dnsNames"]
    assert cpu[("Deployment", "kvmesh-controller")]["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scheme"] == "https"
