"""tracer/kubernetes.py with the real `kubernetes` client against a real local API endpoint
(tests/support/k8s_api.py), and PIDs mapped to pods through a fake /proc root."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from tests.support.k8s_api import FakeKubernetesApi, container_id, fake_kubernetes_api, make_pod, pod_uid
from tracer.cgroups import pod_uid_from_component
from tracer.kubernetes import KubernetesMetadata
from tracer.workloads import WorkloadSelection, trace_choice

REPO = Path(__file__).resolve().parents[2]
ENV_VARS = ("KUBERNETES_SERVICE_HOST", "KSPAN_KUBERNETES_API", "KSPAN_KUBECONFIG", "NODE_NAME", "KSPAN_NODE_NAME")


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s}s")


def systemd_cgroup(pod: str, container: str, runtime: str = "cri-containerd") -> str:
    uid = pod_uid(pod).replace("-", "_")
    return (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/"
            f"{runtime}-{container_id(pod + '/' + container)}.scope\n")


def cgroupfs_cgroup(pod: str, container: str, prefix: str = "") -> str:
    cid = container_id(pod + "/" + container)
    return "".join(f"{h}:/kubepods/besteffort/pod{pod_uid(pod)}/{prefix}{cid}\n"
                   for h in ("12:memory", "11:cpu,cpuacct", "1:name=systemd"))


class ProcRoot:
    """A fake /proc holding only <pid>/cgroup files."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, pid: int, cgroup_text: str) -> int:
        (self.root / str(pid)).mkdir(exist_ok=True)
        (self.root / str(pid) / "cgroup").write_text(cgroup_text)
        return pid


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def api() -> Iterator[FakeKubernetesApi]:
    with fake_kubernetes_api(watch_hold_s=0.1) as server:
        yield server


@pytest.fixture
def proc(tmp_path: Path) -> ProcRoot:
    return ProcRoot(tmp_path)


@pytest.fixture
def metadata(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None) -> Iterator[KubernetesMetadata]:
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root), rewatch_pause_s=0.05)
    assert md.start()
    try:
        assert md.wait_synced(15)
        yield md
    finally:
        md.stop()


def test_off_cluster_is_off_silently_and_imports_nothing(clean_env: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="kspan")
    md = KubernetesMetadata()
    assert not md.enabled
    assert md.start() is False
    assert md.attributes_for_pid(1) == {}
    assert md.service_name_for_pid(1) is None
    assert KubernetesMetadata.from_environment() is None
    assert md.name_for_ip("10.0.0.1") is None
    assert caplog.records == []
    # A fresh interpreter: constructing and starting it off the cluster must not import the client.
    code = ("import sys; from tracer.kubernetes import KubernetesMetadata as K; k = K(); k.start(); "
            "print(k.enabled, 'kubernetes' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
    assert out.stderr == ""


def test_in_cluster_without_node_name_warns_and_stays_off(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    with caplog.at_level(logging.WARNING, logger="kspan.kubernetes"):
        md = KubernetesMetadata()
    assert not md.enabled
    assert any("NODE_NAME" in r.getMessage() for r in caplog.records)


def test_node_name_from_downward_api_env(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("NODE_NAME", "worker-7")
    md = KubernetesMetadata()
    assert md.enabled and md.node_name == "worker-7"
    monkeypatch.setenv("KSPAN_NODE_NAME", "worker-8")  # kspan's own name wins
    assert KubernetesMetadata().node_name == "worker-8"
    from_env = KubernetesMetadata.from_environment(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "NODE_NAME": "worker-9", "KSPAN_PROC_ROOT": "/host/proc"})
    assert from_env is not None and from_env.enabled
    assert (from_env.node_name, from_env.proc_root) == ("worker-9", "/host/proc")
    assert from_env.watch_peers
    no_peers = KubernetesMetadata.from_environment(
        {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "NODE_NAME": "w", "KSPAN_KUBERNETES_PEERS": "false"})
    assert no_peers is not None and not no_peers.watch_peers


def test_pod_container_attributes(metadata: KubernetesMetadata, proc: ProcRoot, api: FakeKubernetesApi) -> None:
    pod = "checkout-7d9f8b6c5d-x2k4p"
    pid = proc.add(101, systemd_cgroup(pod, "checkout"))
    assert metadata.attributes_for_pid(pid) == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": pod,
        "k8s.pod.uid": pod_uid(pod),
        "k8s.node.name": "node-a",
        "k8s.container.name": "checkout",
        "container.id": container_id(pod + "/checkout"),
        "k8s.replicaset.name": "checkout-7d9f8b6c5d",
        "k8s.deployment.name": "checkout",
        "service.namespace": "shop",
        "service.instance.id": f"shop.{pod}.checkout",
    }
    # The sidecar and the init container of the same pod: same pod, their own container name.
    assert metadata.attributes_for_pid(proc.add(102, systemd_cgroup(pod, "envoy")))["k8s.container.name"] == "envoy"
    assert metadata.attributes_for_pid(proc.add(103, systemd_cgroup(pod, "migrate")))["k8s.container.name"] == "migrate"
    # The only call to the API per lookup-free pod event: the ReplicaSet, read once for its Deployment.
    assert sum("/replicasets/checkout-7d9f8b6c5d" in r for r in api.requests) == 1
    assert metadata.service_name_for_pid(pid) == "checkout"


def test_resource_annotations_and_version_label(metadata: KubernetesMetadata, proc: ProcRoot,
                                                 api: FakeKubernetesApi) -> None:
    pod = make_pod("billing-0", ip="10.244.1.50", owner=("StatefulSet", "billing"),
                   labels={"app.kubernetes.io/version": "2.3.1"},
                   annotations={"resource.opentelemetry.io/service.namespace": "payments-team",
                                "resource.opentelemetry.io/deployment.environment.name": "staging",
                                "resource.opentelemetry.io/k8s.pod.name": "spoofed"})
    api.push_event("pods", "ADDED", pod)
    pid = proc.add(150, systemd_cgroup("billing-0", "app"))
    wait_for(lambda: "k8s.pod.name" in metadata.attributes_for_pid(pid))
    attrs = metadata.attributes_for_pid(pid)
    assert attrs["service.namespace"] == "payments-team"
    assert attrs["service.version"] == "2.3.1"
    assert attrs["deployment.environment.name"] == "staging"
    assert attrs["k8s.pod.name"] == "billing-0"  # the API's facts win over an annotation


def test_other_runtimes_and_owners(metadata: KubernetesMetadata, proc: ProcRoot) -> None:
    cart = metadata.attributes_for_pid(proc.add(201, systemd_cgroup("cart-0", "app", runtime="crio")))
    assert cart["k8s.statefulset.name"] == "cart"
    assert cart["container.id"] == container_id("cart-0/app")
    job = metadata.attributes_for_pid(proc.add(202, cgroupfs_cgroup("migrate-db-zx9yq", "app")))  # docker
    assert job["k8s.job.name"] == "migrate-db" and "k8s.cronjob.name" not in job
    cron = metadata.attributes_for_pid(proc.add(203, cgroupfs_cgroup("report-28911520-abcde", "app", "crio-")))
    assert (cron["k8s.job.name"], cron["k8s.cronjob.name"]) == ("report-28911520", "report")
    daemon = metadata.attributes_for_pid(proc.add(204, systemd_cgroup("frontend-agent-h5j6k", "app")))
    assert (daemon["k8s.namespace.name"], daemon["k8s.daemonset.name"]) == ("edge", "frontend-agent")
    bare = metadata.attributes_for_pid(proc.add(205, systemd_cgroup("debug-shell", "app", runtime="crio")))
    assert not any(k.endswith(("deployment.name", "replicaset.name", "job.name", "set.name")) for k in bare)


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        ("payments-5c6d7e8f9a-q8w7e", "payments-api"),  # annotation beats labels and owner
        ("cart-0", "cart-eu"),  # app.kubernetes.io/instance beats app.kubernetes.io/name
        ("frontend-agent-h5j6k", "frontend"),  # app.kubernetes.io/name beats the owner
        ("checkout-7d9f8b6c5d-x2k4p", "checkout"),  # Deployment, not its ReplicaSet
        ("report-28911520-abcde", "report"),  # CronJob beats Job
        ("migrate-db-zx9yq", "migrate-db"),  # Job
        ("debug-shell", "debug-shell"),  # no owner: the pod name
    ],
)
def test_service_name_precedence(metadata: KubernetesMetadata, proc: ProcRoot, pod: str, expected: str) -> None:
    pid = proc.add(300, systemd_cgroup(pod, "checkout" if pod.startswith("checkout") else "app"))
    assert metadata.service_name_for_pid(pid) == expected


def test_only_this_nodes_pods(metadata: KubernetesMetadata, proc: ProcRoot, api: FakeKubernetesApi) -> None:
    assert any("fieldSelector=spec.nodeName%3Dnode-a" in r for r in api.requests)
    other = proc.add(400, systemd_cgroup("inventory-6b7c8d9e0f-r4t5y", "app"))
    attrs = metadata.attributes_for_pid(other)
    # Not this node's pod: only what the cgroup path proves, never another pod's identity.
    assert attrs == {
        "container.id": container_id("inventory-6b7c8d9e0f-r4t5y/app"),
        "k8s.pod.uid": pod_uid("inventory-6b7c8d9e0f-r4t5y"),
        "k8s.node.name": "node-a",
    }
    assert metadata.stats()["pods"] == 8


def test_host_process_and_vanished_pid(metadata: KubernetesMetadata, proc: ProcRoot) -> None:
    assert metadata.attributes_for_pid(proc.add(500, "0::/system.slice/sshd.service\n")) == {}
    assert metadata.attributes_for_pid(99999) == {}
    assert metadata.service_name_for_pid(99999) is None


def test_real_process_maps_to_its_pod(metadata: KubernetesMetadata, proc: ProcRoot) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        proc.add(child.pid, systemd_cgroup("payments-5c6d7e8f9a-q8w7e", "app"))
        attrs = metadata.attributes_for_pid(child.pid)
        assert attrs["k8s.pod.name"] == "payments-5c6d7e8f9a-q8w7e"
        assert attrs["k8s.deployment.name"] == "payments"
        assert metadata.service_name_for_pid(child.pid) == "payments-api"
    finally:
        child.kill()
        child.wait()


def test_watch_events_add_modify_delete(metadata: KubernetesMetadata, proc: ProcRoot, api: FakeKubernetesApi) -> None:
    new = make_pod("search-0", namespace="shop", ip="10.244.1.40", owner=("StatefulSet", "search"),
                   labels={"app.kubernetes.io/name": "search"})
    pid = proc.add(600, systemd_cgroup("search-0", "app"))
    assert "k8s.pod.name" not in metadata.attributes_for_pid(pid)
    api.push_event("pods", "ADDED", new)
    wait_for(lambda: metadata.attributes_for_pid(pid).get("k8s.pod.name") == "search-0")
    assert metadata.name_for_ip("10.244.1.40") == "search"
    # The container restarts with a new id: the MODIFIED status replaces the old one.
    restarted = make_pod("search-0", namespace="shop", ip="10.244.1.40", owner=("StatefulSet", "search"),
                         labels={"app.kubernetes.io/name": "search"})
    restarted["status"]["containerStatuses"][0]["containerID"] = "containerd://" + container_id("restart")
    api.push_event("pods", "MODIFIED", restarted)
    pid2 = proc.add(601, systemd_cgroup("search-0", "app").replace(container_id("search-0/app"),
                                                                      container_id("restart")))
    wait_for(lambda: metadata.attributes_for_pid(pid2).get("k8s.container.name") == "app")
    api.push_event("pods", "DELETED", restarted)
    wait_for(lambda: "k8s.pod.name" not in metadata.attributes_for_pid(pid2))
    assert metadata.name_for_ip("10.244.1.40") is None
    assert metadata.stats()["watch_events"] >= 3


def test_name_for_ip(metadata: KubernetesMetadata, api: FakeKubernetesApi) -> None:
    wait_for(lambda: metadata.stats()["endpointslices"] == 1 and metadata.stats()["services"] == 3)
    assert metadata.name_for_ip("10.244.1.12") == "payments-api"  # a pod on this node: its service.name
    assert metadata.name_for_ip("::ffff:10.244.1.11") == "checkout"  # IPv4-mapped spelling
    assert metadata.name_for_ip("10.96.12.34") == "payments"  # a Service's cluster IP
    assert metadata.name_for_ip("10.244.2.17") == "inventory"  # a pod on another node, behind a Service
    assert metadata.name_for_ip("192.168.10.11") is None  # host-network pod: the node's IP
    assert metadata.name_for_ip("8.8.8.8") is None
    assert metadata.name_for_ip("not an ip") is None
    api.push_event("services", "DELETED", api.services[0])
    wait_for(lambda: metadata.name_for_ip("10.96.12.34") is None)


def test_api_down_is_counted_and_logged(
    proc: ProcRoot, clean_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="kspan.kubernetes")
    md = KubernetesMetadata(api_url=f"http://127.0.0.1:{port}", node_name="node-a", proc_root=str(proc.root),
                            max_backoff_s=0.2, request_timeout_s=2)
    assert md.start()
    try:
        wait_for(lambda: md.stats()["api_errors"] >= 3)
        assert not md.wait_synced(0)
        pid = proc.add(700, systemd_cgroup("debug-shell", "app"))
        # No crash, and the lookup still returns what the cgroup path proves.
        assert md.attributes_for_pid(pid)["container.id"] == container_id("debug-shell/app")
        assert md.service_name_for_pid(pid) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(f"127.0.0.1:{port}" in w and "pods" in w for w in warnings)
        # Logged once per resource, not once per retry.
        assert len(warnings) <= 3
    finally:
        md.stop()


def test_rbac_forbidden_is_actionable_and_pods_still_work(
    proc: ProcRoot, clean_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="kspan.kubernetes")
    with fake_kubernetes_api(watch_hold_s=0.1) as api:
        api.forbidden = {"services", "replicasets"}
        md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root),
                                rewatch_pause_s=0.05, max_backoff_s=0.2)
        md.start()
        try:
            assert md.wait_synced(15)
            pid = proc.add(800, systemd_cgroup("checkout-7d9f8b6c5d-x2k4p", "checkout"))
            attrs = md.attributes_for_pid(pid)
            # The ReplicaSet is unreadable: the Deployment comes from the pod-template-hash naming rule.
            assert attrs["k8s.deployment.name"] == "checkout"
            wait_for(lambda: any("rbac" in r.getMessage() and "services" in r.getMessage()
                                 for r in caplog.records))
            assert md.stats()["owner_lookup_errors"] >= 1
            assert md.name_for_ip("10.244.2.17") == "inventory"  # EndpointSlices still allowed
        finally:
            md.stop()


def test_a_span_from_a_process_in_a_pod_carries_the_pods_resource(
    metadata: KubernetesMetadata, proc: ProcRoot
) -> None:
    """The agent's glue end to end: ProcessTable asks KubernetesMetadata for the pid of a real
    process (its cgroup file in the fake proc root), and the OTLP resource of a span from that
    pid carries the pod's identity and its service.name."""
    from correlator.spans import Span, SpanKind
    from exporters.jsonfile import JsonRequestBuilder
    from exporters.otlp_proto import ResourceOverrides
    from tracer.processes import ProcessTable

    child = subprocess.Popen(["sleep", "30"])
    try:
        proc.add(child.pid, systemd_cgroup("checkout-7d9f8b6c5d-x2k4p", "checkout"))
        table = ProcessTable(extra=lambda pid: (metadata.service_name_for_pid(pid), metadata.attributes_for_pid(pid)))
        info = table.get(child.pid)
        span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=None, name="GET /cart",
                    kind=SpanKind.SERVER, start_ns=1, end_ns=2, pid=child.pid)
        request = JsonRequestBuilder(ResourceOverrides()).request([span], {child.pid: info})
    finally:
        child.kill()
        child.wait()
    (resource_spans,) = request["resourceSpans"]
    resource = {kv["key"]: next(iter(kv["value"].values())) for kv in resource_spans["resource"]["attributes"]}
    assert resource["service.name"] == "checkout"
    assert resource["process.executable.name"] == "sleep"
    assert resource["k8s.pod.name"] == "checkout-7d9f8b6c5d-x2k4p"
    assert resource["k8s.namespace.name"] == "shop"
    assert resource["k8s.deployment.name"] == "checkout"
    assert resource["k8s.container.name"] == "checkout"
    assert resource["k8s.node.name"] == "node-a"
    assert resource["container.id"] == container_id("checkout-7d9f8b6c5d-x2k4p/checkout")


def test_peer_watches_can_be_turned_off(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None) -> None:
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root), rewatch_pause_s=0.05,
                            watch_peers=False)
    md.start()
    try:
        assert md.wait_synced(15)
        assert md.name_for_ip("10.244.1.12") == "payments-api"  # this node's pods still resolve
        assert md.name_for_ip("10.96.12.34") is None
    finally:
        md.stop()
    assert not any("services" in r or "endpointslices" in r for r in api.requests)


def test_explicit_kubeconfig(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {api.url}
users:
- name: dev
  user:
    token: not-checked-by-the-fake-api
contexts:
- name: local
  context: {{cluster: local, user: dev}}
current-context: local
""")
    md = KubernetesMetadata(kubeconfig=str(kubeconfig), node_name="node-a", proc_root=str(proc.root),
                            rewatch_pause_s=0.05)
    assert md.enabled and md.start()
    try:
        assert md.wait_synced(15)
        pid = proc.add(900, systemd_cgroup("cart-0", "app", runtime="crio"))
        assert md.service_name_for_pid(pid) == "cart-eu"
    finally:
        md.stop()


def test_watch_expiry_relists_without_an_error(metadata: KubernetesMetadata, api: FakeKubernetesApi,
                                               proc: ProcRoot, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kspan.kubernetes")
    lists = metadata.stats()["lists"]
    # What the API server says when the watched resourceVersion was compacted away.
    api.push_event("pods", "ERROR", {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                     "message": "too old resource version: 1001 (2001)", "reason": "Expired",
                                     "code": 410})
    api.pods.append(make_pod("late-0", ip="10.244.1.60"))  # only a relist can find it
    wait_for(lambda: metadata.stats()["lists"] > lists)
    wait_for(lambda: "k8s.pod.name" in metadata.attributes_for_pid(proc.add(950, systemd_cgroup("late-0", "app"))))
    assert metadata.stats()["api_errors"] == 0
    assert caplog.records == []


def test_malformed_watch_lines_are_counted(metadata: KubernetesMetadata, api: FakeKubernetesApi) -> None:
    api.push_raw_watch_line("pods", b"{not json")
    api.push_event("pods", "ADDED", make_pod("after-garbage-0", ip="10.244.1.61"))
    wait_for(lambda: metadata.name_for_ip("10.244.1.61") == "after-garbage-0")
    assert metadata.stats()["bad_watch_events"] == 1


# ---------------------------------------------------------------- workload selection


class VerdictSink:
    """Capture's verdict interface (Capture.set_cgroup_verdicts) as a table, for the user-space
    half of the selection; the kernel half runs for real in tests/e2e/test_workload_selection.py."""

    def __init__(self) -> None:
        self.table: dict[int, bool] = {}
        self.calls = 0
        self.trace_gate: Callable[[int], bool] | None = None

    def set_cgroup_verdicts(self, trace: dict[int, bool], forget: Iterable[int] = ()) -> int:
        self.calls += 1
        for cgroup_id in forget:
            self.table.pop(cgroup_id, None)
        self.table.update(trace)
        return len(trace)


def cgroup_tree(root: Path, pods: dict[str, tuple[str, ...]], systemd: bool = True) -> dict[str, set[int]]:
    """A node's cgroup tree (directories named as the kubelet names them) under `root`; returns
    pod name -> inode numbers of the pod's directory and its containers'."""
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "system.slice" / "containerd.service").mkdir(parents=True)
    out: dict[str, set[int]] = {}
    for pod, containers in pods.items():
        if systemd:
            uid = pod_uid(pod).replace("-", "_")
            pod_dir = root / "kubepods.slice" / "kubepods-burstable.slice" / f"kubepods-burstable-pod{uid}.slice"
            names = [f"cri-containerd-{container_id(pod + '/' + c)}.scope" for c in containers]
        else:
            pod_dir = root / "kubepods" / "besteffort" / f"pod{pod_uid(pod)}"
            names = [container_id(pod + "/" + c) for c in containers]
        pod_dir.mkdir(parents=True)
        ids = {pod_dir.stat().st_ino}
        for name in names:
            (pod_dir / name).mkdir()
            ids.add((pod_dir / name).stat().st_ino)
        out[pod] = ids
    return out


@pytest.mark.parametrize(
    ("namespace", "labels", "annotations", "opt_in", "expected"),
    [
        ("shop", {}, {}, False, True),
        ("kube-system", {}, {}, False, False),  # excluded by default
        ("kspan", {}, {}, False, False),  # kspan's own namespace (POD_NAMESPACE)
        ("shop", {"kspan.io/trace": "false"}, {}, False, False),  # opt-out by label
        ("shop", {}, {"kspan.io/trace": "off"}, False, False),  # opt-out by annotation
        ("shop", {"kspan.io/trace": "true"}, {"kspan.io/trace": "false"}, False, False),  # annotation wins
        ("shop", {}, {}, True, False),  # opt-in mode: silence is no
        ("shop", {"kspan.io/trace": "true"}, {}, True, True),
        ("shop", {"kspan.io/trace": "maybe"}, {}, True, False),  # unreadable: no choice
        ("kube-system", {"kspan.io/trace": "true"}, {}, True, False),  # the namespace boundary holds
        ("dev-3", {}, {}, False, False),  # --exclude-namespace dev-* (below)
    ],
)
def test_selection_rules(namespace: str, labels: dict[str, str], annotations: dict[str, str], opt_in: bool,
                         expected: bool) -> None:
    env = {"POD_NAMESPACE": "kspan"}
    selection = WorkloadSelection.from_settings(opt_in=opt_in, env=env)
    if namespace == "dev-3":
        selection = WorkloadSelection.from_settings(exclude=["dev-*"], env=env)
        assert selection.namespace_selected("kube-system")  # a given list replaces the default
    assert selection.pod_traced(namespace, labels, annotations) is expected
    assert selection.default_trace is (not opt_in)


def test_selection_from_environment_and_command_line() -> None:
    env = {"KSPAN_INCLUDE_NAMESPACES": "shop, edge-*", "KSPAN_TRACE_OPT_IN": "true",
           "KSPAN_SERVICE_NAME_LABEL": "app", "KSPAN_NAMESPACE": "observability"}
    sel = WorkloadSelection.from_settings(env=env)
    assert sel.include_namespaces == ("shop", "edge-*")
    assert sel.exclude_namespaces == ("kube-system", "observability")
    assert sel.opt_in and sel.service_name_label == "app"
    assert sel.namespace_selected("edge-eu") and not sel.namespace_selected("batch")
    cli = WorkloadSelection.from_settings(include=["batch"], exclude=[""], service_name_label="team", env=env)
    assert cli.include_namespaces == ("batch",) and cli.service_name_label == "team"
    assert cli.namespace_selected("batch")
    assert WorkloadSelection.from_settings(env={"KSPAN_EXCLUDE_NAMESPACES": " "}).exclude_namespaces == ("kube-system",)
    assert trace_choice({"kspan.io/trace": "Yes"}, {}) == (True, True)
    assert trace_choice({"kspan.io/trace": "sure"}, {}) == (None, False)


def test_service_name_from_a_named_label(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None) -> None:
    api.pods.append(make_pod("web-1", ip="10.244.1.40", labels={"team.example.com/app": "storefront",
                                                                "app.kubernetes.io/instance": "web-eu"}))
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root), rewatch_pause_s=0.05,
                            selection=WorkloadSelection(service_name_label="team.example.com/app"))
    assert md.start() and md.wait_synced(15)
    try:
        assert md.service_name_for_pid(proc.add(401, systemd_cgroup("web-1", "app"))) == "storefront"
        # The OpenTelemetry annotation, set on the pod itself, still comes first.
        assert md.service_name_for_pid(proc.add(402, systemd_cgroup("payments-5c6d7e8f9a-q8w7e", "app"))) \
            == "payments-api"
        # A pod without the named label falls back to the usual precedence.
        assert md.service_name_for_pid(proc.add(403, systemd_cgroup("cart-0", "app"))) == "cart-eu"
    finally:
        md.stop()


@pytest.mark.parametrize("systemd", [True, False], ids=["systemd", "cgroupfs"])
def test_cgroup_verdicts_follow_pods(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None, tmp_path: Path,
                                     systemd: bool) -> None:
    """Pods come, change their label and go: the verdict table per cgroup id follows, with the
    kernel's default (no entry) for host cgroups and pods not listed yet."""
    root = tmp_path / "cgroup"
    root.mkdir()
    api.pods = [
        make_pod("web-1", ip="10.244.1.40"),
        make_pod("coredns-x", namespace="kube-system", ip="10.244.1.41"),
        make_pod("batch-1", ip="10.244.1.42", labels={"kspan.io/trace": "false"}),
    ]
    ids = cgroup_tree(root, {"web-1": ("app", "sidecar"), "coredns-x": ("coredns",), "batch-1": ("job",),
                             "unlisted-9": ("app",)}, systemd=systemd)
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root), rewatch_pause_s=0.05,
                            selection=WorkloadSelection(), cgroup_root=str(root), cgroup_rescan_s=0.1)
    sink = VerdictSink()
    assert md.start() and md.wait_synced(15)
    try:
        md.attach_capture(sink)
        want = {**dict.fromkeys(ids["web-1"], True), **dict.fromkeys(ids["coredns-x"], False),
                **dict.fromkeys(ids["batch-1"], False)}
        wait_for(lambda: sink.table == want)
        assert len(ids["web-1"]) == 3  # the pod's cgroup and both containers'
        assert md.stats()["pods_skipped"] == 2
        # The attachers' gate agrees with the kernel.
        assert sink.trace_gate is not None
        assert sink.trace_gate(proc.add(501, systemd_cgroup("web-1", "app")))
        assert not sink.trace_gate(proc.add(502, systemd_cgroup("coredns-x", "coredns")))
        assert sink.trace_gate(proc.add(503, "0::/system.slice/sshd.service\n"))  # host: default
        # Opt out by relabelling: MODIFIED flips the pod's cgroups.
        web = make_pod("web-1", ip="10.244.1.40", labels={"kspan.io/trace": "false"})
        api.push_event("pods", "MODIFIED", web)
        wait_for(lambda: all(sink.table.get(i) is False for i in ids["web-1"]))
        # A container started later is found by the periodic walk, with the pod's verdict.
        calls = sink.calls
        late = next(p for p in root.rglob("*") if p.is_dir() and pod_uid_from_component(p.name) == pod_uid("web-1"))
        (late / "late-container").mkdir()
        wait_for(lambda: sink.table.get((late / "late-container").stat().st_ino) is False)
        assert sink.calls > calls
        # A deleted pod's verdicts are forgotten.
        api.push_event("pods", "DELETED", web)
        wait_for(lambda: not (set(sink.table) & ids["web-1"]))
        assert md.stats()["cgroup_scans"] >= 3
    finally:
        md.stop()


def test_unreadable_trace_values_are_counted(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None) -> None:
    api.pods = [make_pod("odd-1", labels={"kspan.io/trace": "perhaps"})]
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root), rewatch_pause_s=0.05,
                            selection=WorkloadSelection(opt_in=True))
    assert md.start() and md.wait_synced(15)
    try:
        assert md.stats()["bad_trace_values"] == 1
        assert not md.traced_pid(proc.add(601, systemd_cgroup("odd-1", "app")))
        assert md.stats()["pods_skipped"] == 1
    finally:
        md.stop()


def test_no_cgroup_v2_tree_is_said_once(api: FakeKubernetesApi, proc: ProcRoot, clean_env: None, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    md = KubernetesMetadata(api_url=api.url, node_name="node-a", proc_root=str(proc.root),
                            cgroup_root=str(tmp_path))  # no cgroup.controllers: not a v2 tree
    assert md.cgroup_root is None
    sink = VerdictSink()
    assert md.start()
    try:
        with caplog.at_level(logging.WARNING, logger="kspan.kubernetes"):
            md.attach_capture(sink)
        assert any("KSPAN_CGROUP_ROOT" in r.getMessage() for r in caplog.records)
        assert md.apply_verdicts() == 0 and sink.calls == 0
    finally:
        md.stop()


def test_command_line_selection_reaches_the_agent() -> None:
    from tracer.cli import _options, build_parser

    opts = _options(build_parser().parse_args([
        "run", "--include-namespace", "shop", "--include-namespace", "edge-*", "--exclude-namespace", "",
        "--trace-opt-in", "--service-name-label", "app.kubernetes.io/name"]))
    sel = WorkloadSelection.from_settings(opts.include_namespaces, opts.exclude_namespaces, opts.trace_opt_in,
                                          opts.service_name_label, env={})
    assert sel == WorkloadSelection(("shop", "edge-*"), ("",), True, "app.kubernetes.io/name")
    assert not sel.default_trace
    defaults = _options(build_parser().parse_args(["run"]))
    assert WorkloadSelection.from_settings(defaults.include_namespaces, defaults.exclude_namespaces,
                                           defaults.trace_opt_in, defaults.service_name_label, env={}) \
        == WorkloadSelection()


def test_cgroup2_root_is_found_by_its_controllers_file(tmp_path: Path) -> None:
    from tracer.pod_cgroups import find_cgroup2_root, pod_cgroup_ids

    assert find_cgroup2_root(str(tmp_path)) is None  # not a cgroup v2 directory
    ids = cgroup_tree(tmp_path, {"web-1": ("app",)})
    assert find_cgroup2_root(str(tmp_path)) == str(tmp_path)
    found, unreadable = pod_cgroup_ids(str(tmp_path))
    assert found == {pod_uid("web-1"): ids["web-1"]} and unreadable == 0
    # Deeper than the walk goes: not found, and no error.
    assert pod_cgroup_ids(str(tmp_path), max_depth=2) == ({}, 0)
