"""Kubernetes workload selection, enforced in the kernel: real servers moved into real cgroup v2
"pod" cgroups, the real agent against the local Kubernetes API endpoint, spans only for the pods
selection keeps, and the kernel's cgroup_skipped counter for the rest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.support.agent import ROOT, free_port, running_agent, service
from tests.support.ebpf import fail_or_skip, require_ebpf
from tests.support.k8s_api import FakeKubernetesApi, container_id, fake_kubernetes_api, make_pod, pod_uid
from tests.support.tls import make_cert, python_cmd
from tracer.pod_cgroups import find_cgroup2_root

pytestmark = pytest.mark.ebpf

CHAIN_SERVER = ROOT / "tests" / "support" / "chain_server.py"


@contextmanager
def pod_cgroups(pods: list[str]) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A kubelet-shaped tree `<test root>/kubepods/besteffort/pod<uid>/<container id>` in the
    machine's cgroup2 hierarchy; yields the test root and each pod's container cgroup. Removed
    afterwards, deepest first, once the processes moved into it have exited."""
    unified = find_cgroup2_root()
    if unified is None:
        fail_or_skip("no cgroup v2 hierarchy mounted (/sys/fs/cgroup or /sys/fs/cgroup/unified)")
    root = Path(unified) / f"kspan-test-{os.getpid()}-{time.monotonic_ns()}"
    leaves = {}
    try:
        for pod in pods:
            leaf = root / "kubepods" / "besteffort" / f"pod{pod_uid(pod)}" / container_id(pod + "/app")
            leaf.mkdir(parents=True)
            leaves[pod] = leaf
    except OSError as exc:
        fail_or_skip(f"cannot create cgroups under {unified}: {exc}")
    try:
        yield root, leaves
    finally:
        for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
            for _ in range(50):  # a killed process leaves its cgroup a moment after wait() returns
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


def move_into(pid: int, cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text(f"{pid}\n")
    assert f"0::/{cgroup.relative_to(find_cgroup2_root() or '/')}" in Path(f"/proc/{pid}/cgroup").read_text()


def server_spans(path: Path) -> list[tuple[str, int, dict[str, object]]]:
    """(service.name, pid, attributes) of each server span in the agent's OTLP-JSON file."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            res = {a["key"]: next(iter(a["value"].values())) for a in rs["resource"]["attributes"]}
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    if s.get("kind") != 2:  # SPAN_KIND_SERVER
                        continue
                    attrs = {a["key"]: next(iter(a["value"].values())) for a in s["attributes"]}
                    out.append((str(res.get("service.name")), int(res.get("process.pid", 0)), {**res, **attrs}))
    return out


def counters_at_stop(stderr: str) -> dict[str, int]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("kspan: stopped; "))
    return {k: int(v) for k, v in (kv.split("=") for kv in line.removeprefix("kspan: stopped; ").split(", "))}


def curl(port: int, path: str, cafile: Path | None = None) -> None:
    scheme = "https" if cafile else "http"
    tls = ["--cacert", str(cafile)] if cafile else []
    subprocess.run(["curl", "-sf", *tls, "-o", "/dev/null", f"{scheme}://127.0.0.1:{port}{path}"], check=True,
                   timeout=10)


def chain_server(tmp_path: Path, pod: str, port: int) -> tuple[list[str], Path | None]:
    script = tmp_path / f"{pod.replace('-', '_')}.py"
    shutil.copy(CHAIN_SERVER, script)
    return ["python3", str(script), str(port)], None


def run_selection(tmp_path: Path, api: FakeKubernetesApi, pods: dict[str, dict], extra_args: list[str],
                  server: Callable[[Path, str, int], tuple[list[str], Path | None]] = chain_server,
                  path: str = "/chain",
                  ) -> tuple[dict[str, int], list[tuple[str, int, dict[str, object]]], str, dict[str, int]]:
    """Serve one server per pod (`server` gives its command and, for HTTPS, the CA file), each in
    its pod's container cgroup, under the agent; send each the same requests. Returns pod ->
    server pid, the server spans, the agent's stderr and its counters at stop."""
    api.pods = [make_pod(name, ip=f"10.244.1.{50 + i}", **spec) for i, (name, spec) in enumerate(pods.items())]
    ports = {pod: free_port() for pod in pods}
    out = tmp_path / "spans.jsonl"
    with ExitStack() as stack:
        root, leaves = stack.enter_context(pod_cgroups(list(pods)))
        pids, cafiles = {}, {}
        for pod in pods:
            cmd, cafiles[pod] = server(tmp_path, pod, ports[pod])
            proc = stack.enter_context(service(cmd, cwd=ROOT))
            move_into(proc.pid, leaves[pod])
            pids[pod] = proc.pid
        env = {"KSPAN_KUBERNETES_API": api.url, "NODE_NAME": "node-a", "KSPAN_CGROUP_ROOT": str(root),
               "POD_NAMESPACE": "kspan"}
        args = ["run", "--quiet", "--no-go", "--no-metrics", "--output", str(out), *extra_args]
        for port in ports.values():
            args += ["--port", str(port)]
        with running_agent(args, tmp_path, env=env) as agent:
            # The pods already running have their verdicts before the agent says it is ready.
            log = agent.stderr
            assert -1 < log.find("workload selection in the kernel") < log.find("kspan: ready"), log
            for _ in range(3):
                for pod in pods:
                    curl(ports[pod], path, cafiles[pod])
            time.sleep(1.0)
        assert agent.returncode == 0, agent.stderr
    return pids, server_spans(out), agent.stderr, counters_at_stop(agent.stderr)


def test_excluded_pods_cost_nothing_in_the_kernel(tmp_path: Path) -> None:
    """Default mode: a pod in kube-system and a pod that opted out are skipped by the kernel; the
    pod in an ordinary namespace is traced, named from the label the user chose."""
    require_ebpf()
    pods = {
        "web-1": {"namespace": "shop", "labels": {"team.example.com/app": "storefront"}},
        "coredns-1": {"namespace": "kube-system"},
        "quiet-1": {"namespace": "shop", "labels": {"kspan.io/trace": "false"}},
    }
    with fake_kubernetes_api(watch_hold_s=0.1) as api:
        pids, spans, stderr, counters = run_selection(
            tmp_path, api, pods, ["--service-name-label", "team.example.com/app"])
    assert "1 of this node's 3 pods traced, 2 skipped" in stderr, stderr
    by_pid = {pid for _, pid, _ in spans}
    assert pids["web-1"] in by_pid, (spans, stderr)
    assert pids["coredns-1"] not in by_pid and pids["quiet-1"] not in by_pid, spans
    web = [attrs for svc, pid, attrs in spans if pid == pids["web-1"]]
    assert len(web) == 3
    assert {svc for svc, pid, _ in spans if pid == pids["web-1"]} == {"storefront"}
    assert web[0]["k8s.namespace.name"] == "shop" and web[0]["k8s.pod.name"] == "web-1"
    # Each skipped server's reads and writes stopped at the first check: at least a request read
    # and a response written per request, for two servers.
    assert counters.get("cgroup_skipped", 0) >= 2 * 3 * 2, counters
    assert counters.get("requests_seen", 0) >= 3  # the traced pod's, at least


def test_opt_in_mode_traces_only_pods_that_asked(tmp_path: Path) -> None:
    """--trace-opt-in: the kernel's default is skip, so the host's own processes (curl here) and
    the pod that said nothing are not traced; the pod labelled kspan.io/trace: "true" is."""
    require_ebpf()
    pods = {
        "asked-1": {"namespace": "shop", "labels": {"kspan.io/trace": "true"}},
        "silent-1": {"namespace": "shop"},
    }
    with fake_kubernetes_api(watch_hold_s=0.1) as api:
        pids, spans, stderr, counters = run_selection(tmp_path, api, pods, ["--trace-opt-in"])
    assert "1 of this node's 2 pods traced, 1 skipped" in stderr, stderr
    assert {pid for _, pid, _ in spans} == {pids["asked-1"]}, spans
    assert len(spans) == 3
    assert counters.get("cgroup_skipped", 0) >= 3 * 2, counters


def test_tls_uprobes_skip_excluded_pods(tmp_path: Path) -> None:
    """Two Python HTTPS servers share one libssl, so the OpenSSL uprobes attached for the traced
    pod fire in the excluded one too: none of the excluded pod's plaintext comes out (the uprobes
    check the cgroup as the socket probes do, which skip and count its TLS socket transfers)."""
    require_ebpf()
    cert, key = make_cert(tmp_path)

    def https_server(_tmp: Path, _pod: str, port: int) -> tuple[list[str], Path | None]:
        return python_cmd("serve", "--port", str(port), "--cert", str(cert), "--key", str(key)), cert

    pods = {"shop-tls-1": {"namespace": "shop"}, "vault-tls-1": {"namespace": "secrets"}}
    with fake_kubernetes_api(watch_hold_s=0.1) as api:
        pids, spans, stderr, counters = run_selection(
            tmp_path, api, pods, ["--exclude-namespace", "secrets"], server=https_server, path="/work")
    assert "1 of this node's 2 pods traced, 1 skipped" in stderr, stderr
    assert {pid for _, pid, _ in spans} == {pids["shop-tls-1"]}, spans
    assert len(spans) == 3 and all(attrs["url.scheme"] == "https" for _, _, attrs in spans), spans
    assert counters.get("cgroup_skipped", 0) >= 3 * 2, counters
