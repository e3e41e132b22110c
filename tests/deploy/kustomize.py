"""Renders the kustomize subset deploy/kubernetes uses, for machines without kubectl/kustomize.

Supported: ``resources`` (files and folders holding a kustomization.yaml), ``components`` (folders
holding a ``kind: Component`` kustomization with ``resources`` and ``patches``, applied after the
resources and before the kustomization's own patches, as kustomize does), ``namespace``, ``images``
(newName / newTag / digest) and ``patches`` whose file is a JSON 6902 operation list (add, replace,
remove, test) with a ``target`` of kind/name (group and version checked when given). Anything else in a
kustomization is refused, so the manifests cannot drift into features this renderer would get
wrong. Where kubectl exists, a test checks that this renderer and ``kubectl kustomize`` agree.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
COMPONENT_FIELDS = {"apiVersion", "kind", "resources", "patches"}
# Kinds the namespace transformer leaves alone (cluster-scoped among those we use).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class KustomizeError(ValueError):
    """A kustomization that uses a feature this renderer does not support, or a bad patch."""


def render(folder: Path) -> list[dict[str, Any]]:
    """The resources ``kustomize build folder`` would output (order aside)."""
    kfile = folder / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    unknown = set(spec) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    if spec.get("kind") == "Component":
        raise KustomizeError(f"{kfile}: a Component is rendered only as part of a kustomization's components")
    resources = _load_resources(folder, spec)
    for entry in spec.get("components", []):
        _apply_component((folder / entry).resolve(), resources)
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, resources)
    if "namespace" in spec:
        for res in resources:
            if res["kind"] == "Namespace":
                # kustomize renames a Namespace object to the kustomization's namespace.
                res["metadata"]["name"] = spec["namespace"]
            elif res["kind"] not in CLUSTER_SCOPED:
                res["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for res in resources:
            _set_image(res, image)
    return resources


def _load_resources(folder: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        else:
            resources.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return resources


def _apply_component(folder: Path, resources: list[dict[str, Any]]) -> None:
    """Add a component's resources to ``resources`` and apply its patches to all of them."""
    kfile = folder / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    if spec.get("kind") != "Component":
        raise KustomizeError(f"{kfile}: a `components` entry must be a kind: Component")
    unknown = set(spec) - COMPONENT_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: unsupported fields {sorted(unknown)}")
    resources.extend(_load_resources(folder, spec))
    for patch in spec.get("patches", []):
        _apply_patch(folder, patch, resources)


def _apply_patch(folder: Path, patch: dict[str, Any], resources: list[dict[str, Any]]) -> None:
    if set(patch) - {"path", "target"} or "path" not in patch or "target" not in patch:
        raise KustomizeError(f"only patches with path + target are supported: {patch}")
    ops = yaml.safe_load((folder / patch["path"]).read_text())
    if not isinstance(ops, list):
        raise KustomizeError(f"{patch['path']}: only JSON 6902 patches (a list of operations)")
    target = patch["target"]
    matched = [r for r in resources if _matches(r, target)]
    if not matched:
        raise KustomizeError(f"patch {patch['path']}: no resource matches {target}")
    for res in matched:
        for op in ops:
            json_patch(res, op)


def _matches(res: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = res["apiVersion"].rpartition("/")
    checks = {"kind": res["kind"], "name": res["metadata"]["name"], "group": group,
              "version": version, "namespace": res["metadata"].get("namespace")}
    unknown = set(target) - set(checks)
    if unknown:
        raise KustomizeError(f"unsupported patch target fields {sorted(unknown)}")
    return all(checks[key] == value for key, value in target.items())


def json_patch(doc: Any, op: dict[str, Any]) -> None:
    """Apply one RFC 6902 operation (add, replace, remove, test) to ``doc`` in place."""
    kind = op.get("op")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    if not parts:
        raise KustomizeError(f"cannot patch the document root: {op}")
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if kind == "add":
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), value)
        else:
            parent[last] = value
    elif kind == "replace":
        if isinstance(parent, list):
            parent[int(last)] = copy.deepcopy(op["value"])
        else:
            if last not in parent:
                raise KustomizeError(f"replace of a missing path {op['path']}")
            parent[last] = copy.deepcopy(op["value"])
    elif kind == "test":
        actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)
        if actual != op["value"]:
            raise KustomizeError(f"test failed at {op['path']}: {actual!r} != {op['value']!r}")
    elif kind == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise KustomizeError(f"unsupported patch operation {kind!r}")


def _set_image(res: dict[str, Any], image: dict[str, Any]) -> None:
    for container in pod_containers(res):
        name, tag, digest = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            container["image"] = f"{name}:{image['newTag']}"
        else:
            container["image"] = name + (f"@{digest}" if digest else f":{tag}" if tag else "")


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference (a registry port is not a tag)."""
    digest = None
    if "@" in ref:
        ref, digest = ref.split("@", 1)
    name, tag = ref, None
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        name, tag = ref[:colon], ref[colon + 1:]
    return name, tag, digest


def pod_spec(res: dict[str, Any]) -> dict[str, Any] | None:
    """The pod spec of a workload (Deployment, StatefulSet, DaemonSet, Job, Pod), else None."""
    if res["kind"] == "Pod":
        return res["spec"]
    template = res.get("spec", {}).get("template")
    return template["spec"] if template else None


def pod_containers(res: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(res)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec.get("containers", [])]
