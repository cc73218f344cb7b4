"""deploy/kubernetes renders with `kubectl kustomize` (Debian's kubernetes-client, installed or
unpacked by scripts/bootstrap.sh) into exactly the objects of its files, in apply order."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
UNPACKED = ROOT / ".cache" / "kubernetes-client" / "usr" / "bin" / "kubectl"


def debian_kubectl() -> Path:
    if UNPACKED.is_file():
        return UNPACKED
    owner = subprocess.run(["dpkg", "-S", "/usr/bin/kubectl"], capture_output=True, text=True)
    if owner.returncode == 0 and owner.stdout.split(":", 1)[0] == "kubernetes-client":
        return Path("/usr/bin/kubectl")
    pytest.fail("Debian's kubectl (kubernetes-client) is not set up: run `make setup`", pytrace=False)


def identity(doc: dict) -> tuple[str, str, str]:
    meta = doc["metadata"]
    return doc["kind"], meta.get("namespace", ""), meta["name"]


def test_kustomize_renders_every_manifest() -> None:
    kubectl = debian_kubectl()
    out = subprocess.run([str(kubectl), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    files = [d for p in sorted(DEPLOY.glob("0*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    assert [identity(d) for d in rendered] == [identity(d) for d in files]
    assert rendered[0]["kind"] == "Namespace"
    # kustomize passes the objects through unchanged: no field lost or renamed on the way.
    for got, want in zip(rendered, files, strict=True):
        assert got == want, identity(want)
    (kustomization,) = yaml.safe_load_all((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in DEPLOY.glob("0*.yaml"))


def test_daemonset_passes_the_downward_api_namespace() -> None:
    """Workload selection excludes kspan's own namespace by the POD_NAMESPACE it is given."""
    (ds,) = [d for d in yaml.safe_load_all((DEPLOY / "03-daemonset.yaml").read_text()) if d]
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (cm,) = [d for d in yaml.safe_load_all((DEPLOY / "02-configmap.yaml").read_text()) if d]
    assert cm["data"]["KSPAN_TRACE_OPT_IN"] == "false"
