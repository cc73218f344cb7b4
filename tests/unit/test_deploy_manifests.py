"""deploy/kubernetes/*.yaml: valid Kubernetes objects (the `kubernetes` client's models and its
create_from_yaml utility against a local API endpoint), and the settings kspan depends on."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, utils

from tests.support.k8s_api import fake_kubernetes_api

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))

Obj = dict[str, Any]


def documents() -> list[tuple[Path, Obj]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def by_kind(kind: str) -> list[Obj]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def daemonset() -> Obj:
    (ds,) = by_kind("DaemonSet")
    return ds


def missing_keys(original: Any, roundtrip: Any, where: str = "") -> list[str]:
    """Keys of `original` that did not survive model deserialisation (a typo or a field the API
    does not have is dropped silently by the client)."""
    if isinstance(original, dict):
        if not isinstance(roundtrip, dict):
            return [where or "/"]
        out = []
        for key, value in original.items():
            if key not in roundtrip:
                out.append(f"{where}/{key}")
            else:
                out.extend(missing_keys(value, roundtrip[key], f"{where}/{key}"))
        return out
    if isinstance(original, list):
        if not isinstance(roundtrip, list) or len(roundtrip) != len(original):
            return [where]
        return [m for i, (a, b) in enumerate(zip(original, roundtrip, strict=True))
                for m in missing_keys(a, b, f"{where}[{i}]")]
    return []


def test_manifests_exist_in_apply_order() -> None:
    names = [p.name for p in MANIFESTS]
    assert names == sorted(names)
    kinds = [doc["kind"] for _, doc in documents()]
    # `kubectl apply -f deploy/kubernetes/` goes in file-name order: the namespace first.
    assert kinds[0] == "Namespace"
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} <= set(kinds)


@pytest.mark.parametrize(("path", "doc"), documents(), ids=lambda v: v.name if isinstance(v, Path) else v["kind"])
def test_deserialises_into_client_models_without_losing_fields(path: Path, doc: Obj) -> None:
    api = client.ApiClient()
    model_name = "V1" + doc["kind"]
    assert doc["apiVersion"] in ("v1", "apps/v1", "rbac.authorization.k8s.io/v1")
    model = api.deserialize(json.dumps(doc), model_name, "application/json")
    assert type(model).__name__ == model_name
    roundtrip = api.sanitize_for_serialization(model)
    assert missing_keys(doc, roundtrip) == []


def test_create_from_yaml_against_a_local_api() -> None:
    with fake_kubernetes_api() as server:
        configuration = client.Configuration()
        configuration.host = server.url
        with client.ApiClient(configuration) as api_client:
            for path in MANIFESTS:
                utils.create_from_yaml(api_client, str(path), dry_run="All")
        paths = [p for p, _ in server.created]
    assert paths == [
        "/api/v1/namespaces",
        "/api/v1/namespaces/kspan/serviceaccounts",
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "/api/v1/namespaces/kspan/configmaps",
        "/apis/apps/v1/namespaces/kspan/daemonsets",
    ]
    assert all("dryRun=All" in r for r in server.requests)


def test_daemonset_host_access() -> None:
    spec = daemonset()["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    assert spec["serviceAccountName"] == "kspan"
    assert {"operator": "Exists"} in spec["tolerations"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    expected = {  # mount path -> (host path, read-only)
        "/sys/kernel/tracing": ("/sys/kernel/tracing", False),
        "/lib/modules": ("/lib/modules", True),
        "/usr/src": ("/usr/src", True),
        "/host/proc": ("/proc", True),
        "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
    }
    for mount_path, (host_path, read_only) in expected.items():
        mount = mounts[mount_path]
        assert volumes[mount["name"]]["hostPath"]["path"] == host_path
        assert bool(mount.get("readOnly")) is read_only, mount_path
    # Every mount names a declared volume, and every volume is mounted.
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)


def test_daemonset_security_and_resources() -> None:
    (container,) = daemonset()["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False
    added = set(security["capabilities"]["add"])
    assert {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"} <= added
    assert security["capabilities"]["drop"] == ["ALL"]
    # The API server rejects allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert not ("SYS_ADMIN" in added and security.get("allowPrivilegeEscalation") is False)
    limits = container["resources"]["limits"]
    assert utils.parse_quantity(limits["memory"]) <= utils.parse_quantity("512Mi")
    assert utils.parse_quantity(limits["cpu"]) <= utils.parse_quantity("1")
    assert container["resources"]["requests"]["memory"]


def test_configmap_feeds_the_agent() -> None:
    (configmap,) = by_kind("ConfigMap")
    (container,) = daemonset()["spec"]["template"]["spec"]["containers"]
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    data = configmap["data"]
    assert re.match(r"^https?://[a-z0-9.-]+:43(17|18)$", data["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert data["OTEL_EXPORTER_OTLP_PROTOCOL"] in ("grpc", "http/protobuf")
    assert data["KSPAN_PROC_ROOT"] == "/host/proc"
    # OTEL_SERVICE_NAME in the agent's environment would name EVERY traced process (the spec
    # ranks it above all detected names): each pod's own service.name must win.
    env_names = {e["name"] for e in container["env"]} | set(data)
    assert "OTEL_SERVICE_NAME" not in env_names


# What tracer/kubernetes.py asks the API for: (api group, resource, verb).
CALLS = {
    ("", "pods", "list"), ("", "pods", "watch"),
    ("", "services", "list"), ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch"),
    ("apps", "replicasets", "get"),
    ("batch", "jobs", "get"),
}


def test_rbac_covers_what_kubernetes_metadata_calls_and_no_writes() -> None:
    (role,) = by_kind("ClusterRole")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert CALLS <= granted
    assert {verb for _, _, verb in granted} <= {"get", "list", "watch"}
    (binding,) = by_kind("ClusterRoleBinding")
    (account,) = by_kind("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]


def test_rbac_matches_the_requests_kubernetes_metadata_really_makes(tmp_path: Path) -> None:
    """Run KubernetesMetadata against the local API and map each request it made to (group,
    resource, verb): the RBAC table above must be exactly what the code does."""
    from tracer.kubernetes import KubernetesMetadata

    with fake_kubernetes_api(watch_hold_s=0.05) as server:
        md = KubernetesMetadata(api_url=server.url, node_name="node-a", proc_root=str(tmp_path),
                                rewatch_pause_s=0.05)
        md.start()
        try:
            assert md.wait_synced(15)
            deadline = 50
            while deadline and not all(any("watch=true" in r and res in r for r in server.requests)
                                       for res in ("pods", "services", "endpointslices")):
                time.sleep(0.1)
                deadline -= 1
        finally:
            md.stop()
        requests = list(server.requests)
    made = set()
    for request in requests:
        path, _, query = request.partition("?")
        parts = [p for p in path.split("/") if p]
        group = "" if parts[0] == "api" else parts[1]
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        if rest and rest[0] == "namespaces":
            made.add((group, rest[2], "get"))
        else:
            made.add((group, rest[0], "watch" if "watch=true" in query else "list"))
    assert made == CALLS
