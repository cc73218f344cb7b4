"""Kubernetes identity for traced processes: PID -> cgroup -> container id -> pod -> attributes.

Off a cluster this is off, silently: `KubernetesMetadata()` checks one environment variable and
imports nothing (the `kubernetes` client costs ~0.8 s to import). In a cluster, background threads
list and watch, read-only:
- the pods of THIS node only (field selector `spec.nodeName=<NODE_NAME>`, the downward API): the
  processes kspan sees run in them, so a node-scoped watch holds everything needed for
  `attributes_for_pid` and `service_name_for_pid` at a memory cost bounded by pods per node;
- Services (cluster IPs) and EndpointSlices (the pod IPs behind each Service), cluster-wide, for
  `name_for_ip`: a peer on another node is named by the Service that fronts it. Watching
  EndpointSlices instead of every pod in the cluster keeps the agent light on big clusters (a
  slice holds IPs and a service name, not whole pod specs) and names peers by the Service that
  callers actually address.
Owners one level up (ReplicaSet -> Deployment, Job -> CronJob) are read once per owner and cached.
Lookups never block on the API: they read in-memory indexes the watch threads keep current.

Workload selection (tracer/workloads.py) gives each pod a verdict, trace or skip. Once a capture
is attached (attach_capture), one more thread keeps the kernel's verdict per cgroup id current:
it walks the node's cgroup2 tree (tracer/pod_cgroups.py) when pods change, and every
`cgroup_rescan_s` for containers started since, and writes only what changed.

RBAC this needs (deploy/kubernetes/01-rbac.yaml): get/list/watch pods; list/watch services;
list/watch endpointslices (discovery.k8s.io); get replicasets (apps); get jobs (batch).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tracer.cgroups import container_id_from_cgroup, pod_uid_from_cgroup, read_cgroup
from tracer.pod_cgroups import find_cgroup2_root, pod_cgroup_ids
from tracer.workloads import WorkloadSelection, trace_choice

log = logging.getLogger("kspan.kubernetes")

Obj = dict[str, Any]

RESOURCE_ANNOTATION_PREFIX = "resource.opentelemetry.io/"
SERVICE_NAME_ANNOTATION = RESOURCE_ANNOTATION_PREFIX + "service.name"
LABEL_VERSION = "app.kubernetes.io/version"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_NAME = "app.kubernetes.io/name"
# OpenTelemetry's order for deriving service.name from a workload once annotation and labels are
# absent (semantic conventions, "k8s" service name derivation).
_OWNER_PRECEDENCE = (
    "k8s.deployment.name",
    "k8s.replicaset.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
)
_OWNER_ATTRIBUTE = {
    "ReplicaSet": "k8s.replicaset.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
}
_OWNER_CACHE_SIZE = 4096


def _in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def _node_name_from_env() -> str | None:
    return os.environ.get("KSPAN_NODE_NAME") or os.environ.get("NODE_NAME") or None


def _normalise_ip(ip: str) -> str:
    """One spelling per address: compressed IPv6, and IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a
    dual-stack socket reports for an IPv4 peer) as plain IPv4."""
    try:
        addr = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(slots=True)
class PodInfo:
    """What kspan keeps of one pod on this node (not the whole object: bounded memory)."""

    uid: str
    namespace: str
    name: str
    attributes: dict[str, str]  # pod-level k8s.* attributes (no container ones)
    service_name: str
    containers: dict[str, str] = field(default_factory=dict)  # container id -> container name
    ips: tuple[str, ...] = ()
    traced: bool = True  # workload selection's verdict


def _container_statuses(status: Obj) -> Iterable[Obj]:
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        yield from status.get(key) or ()


def _strip_runtime(container_id: str) -> str:
    # `containerd://<id>`, `cri-o://<id>`, `docker://<id>`: the id is what the cgroup path holds.
    return container_id.split("://", 1)[-1]


def service_name_for_pod(labels: dict[str, str], annotations: dict[str, str], attributes: dict[str, str],
                         label: str | None = None) -> str:
    """OpenTelemetry's precedence: the annotation, the well-known labels, the owning workload, the
    pod name; a label the user named (--service-name-label) comes right after the annotation."""
    named = labels.get(label) if label else None
    for value in (annotations.get(SERVICE_NAME_ANNOTATION), named, labels.get(LABEL_INSTANCE),
                  labels.get(LABEL_NAME)):
        if value:
            return value
    for key in _OWNER_PRECEDENCE:
        if attributes.get(key):
            return attributes[key]
    return attributes["k8s.pod.name"]


class KubernetesMetadata:
    """Pod identity for PIDs and service names for peer IPs, from the Kubernetes API.

    Enabled only in a cluster (`KUBERNETES_SERVICE_HOST`, set in every pod) or with an explicit
    `api_url` / `kubeconfig` (or env `KSPAN_KUBERNETES_API` / `KSPAN_KUBECONFIG`). `api_url` builds a
    client configuration with that host and no authentication (tests, `kubectl proxy`).
    """

    def __init__(
        self,
        api_url: str | None = None,
        node_name: str | None = None,
        kubeconfig: str | None = None,
        proc_root: str = "/proc",
        watch_timeout_s: int = 300,
        resync_s: float = 1800.0,
        rewatch_pause_s: float = 1.0,
        max_backoff_s: float = 30.0,
        request_timeout_s: float = 10.0,
        in_cluster: bool | None = None,
        watch_peers: bool = True,
        selection: WorkloadSelection | None = None,
        cgroup_root: str | None = None,
        cgroup_rescan_s: float = 5.0,
        sync_wait_s: float = 5.0,
    ) -> None:
        self.api_url = api_url or os.environ.get("KSPAN_KUBERNETES_API") or None
        self.kubeconfig = kubeconfig or os.environ.get("KSPAN_KUBECONFIG") or None
        self.node_name = node_name or _node_name_from_env()
        self.proc_root = proc_root
        self.watch_timeout_s = watch_timeout_s
        self.resync_s = resync_s
        self.rewatch_pause_s = rewatch_pause_s
        self.max_backoff_s = max_backoff_s
        self.request_timeout_s = request_timeout_s
        # The cluster-wide Services/EndpointSlices watches behind name_for_ip: on a very large
        # or very busy cluster (EndpointSlices change with every pod's readiness) they can be
        # turned off, leaving only the node's own pods (env KSPAN_KUBERNETES_PEERS=false).
        self.watch_peers = watch_peers
        self.selection = selection if selection is not None else WorkloadSelection()
        self.cgroup_root = find_cgroup2_root(cgroup_root or os.environ.get("KSPAN_CGROUP_ROOT") or None)
        self.cgroup_rescan_s = cgroup_rescan_s
        self.sync_wait_s = sync_wait_s
        self.enabled = bool(self.api_url or self.kubeconfig or (_in_cluster() if in_cluster is None else in_cluster))
        if self.enabled and not self.node_name:
            # Without the node name the pod watch would cover the whole cluster: refuse rather
            # than load every pod of a large cluster into every agent.
            log.warning(
                "kspan: running in Kubernetes but the node name is unknown; pod attributes are off. "
                "Set env NODE_NAME from the downward API (valueFrom.fieldRef.fieldPath: spec.nodeName), "
                "as deploy/kubernetes/daemonset.yaml does."
            )
            self.enabled = False
        self.counters: dict[str, int] = {
            "api_errors": 0,
            "lists": 0,
            "watch_events": 0,
            "bad_watch_events": 0,
            "owner_lookup_errors": 0,
            "lookups": 0,
            "lookup_hits": 0,
            "lookup_misses": 0,
            "pods_skipped": 0,  # gauge: this node's pods workload selection excludes
            "bad_trace_values": 0,  # kspan.io/trace values neither yes nor no (treated as unset)
            "cgroup_scans": 0,
            "cgroup_scan_errors": 0,  # directories that vanished or could not be read mid-walk
            "cgroup_verdicts": 0,  # gauge: cgroup ids with a verdict in the kernel
        }
        self._lock = threading.Lock()
        self._pods: dict[str, PodInfo] = {}  # uid -> pod
        self._by_container: dict[str, str] = {}  # container id -> pod uid
        self._pod_ip: dict[str, str] = {}  # pod ip -> pod uid
        self._service_ip: dict[str, str] = {}  # cluster ip -> service name
        self._services: dict[str, tuple[str, ...]] = {}  # ns/name -> its cluster ips
        self._slices: dict[str, tuple[str, tuple[str, ...]]] = {}  # ns/name -> (service, ips)
        self._slice_ip: dict[str, str] = {}  # endpoint ip -> service name
        self._owner_cache: OrderedDict[tuple[str, str, str], str] = OrderedDict()
        self._stop = threading.Event()
        self._pods_synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._failing: set[str] = set()
        self._api_client: Any = None
        self._verdicts_dirty = threading.Event()
        self._capture: Any = None
        self._applied: dict[int, bool] = {}  # cgroup id -> verdict written to the kernel

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None,
                         selection: WorkloadSelection | None = None) -> KubernetesMetadata | None:
        """The agent's constructor: None off a cluster (a dictionary lookup, nothing imported),
        else an instance configured from `KSPAN_KUBERNETES_API`, `KSPAN_KUBECONFIG`,
        `KSPAN_NODE_NAME`/`NODE_NAME`, `KSPAN_PROC_ROOT` (the DaemonSet mounts the host's /proc at
        /host/proc), `KSPAN_KUBERNETES_PEERS` (false: no cluster-wide watches), `KSPAN_CGROUP_ROOT`
        (the node's cgroup2 tree, else found under /sys/fs/cgroup) and workload selection's
        variables (tracer/workloads.py), which `selection` (built from the command line) overrides."""
        env = os.environ if env is None else env
        api_url = env.get("KSPAN_KUBERNETES_API") or None
        kubeconfig = env.get("KSPAN_KUBECONFIG") or None
        if not (api_url or kubeconfig or env.get("KUBERNETES_SERVICE_HOST")):
            return None
        return cls(
            api_url=api_url,
            kubeconfig=kubeconfig,
            node_name=env.get("KSPAN_NODE_NAME") or env.get("NODE_NAME") or None,
            proc_root=env.get("KSPAN_PROC_ROOT") or "/proc",
            in_cluster=bool(env.get("KUBERNETES_SERVICE_HOST")),
            watch_peers=(env.get("KSPAN_KUBERNETES_PEERS") or "true").strip().lower()
            not in ("0", "false", "no", "off"),
            selection=selection if selection is not None else WorkloadSelection.from_settings(env=env),
            cgroup_root=env.get("KSPAN_CGROUP_ROOT") or None,
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> bool:
        """Start the watch threads. Returns False (and does nothing) when disabled."""
        if not self.enabled or self._threads:
            return self.enabled
        try:
            self._api_client = self._build_client()
        except Exception as exc:  # a broken kubeconfig or service-account mount
            self._count("api_errors")
            log.warning("kspan: Kubernetes client configuration failed (%s); pod attributes are off", exc)
            self.enabled = False
            return False
        from kubernetes import client

        core = client.CoreV1Api(self._api_client)
        discovery = client.DiscoveryV1Api(self._api_client)
        watches: list[tuple[str, Callable[..., Any], dict[str, Any], Callable[[str, Obj], None],
                            Callable[[list[Obj]], None]]] = [
            ("pods", core.list_pod_for_all_namespaces, {"field_selector": f"spec.nodeName={self.node_name}"},
             self._on_pod_event, self._on_pod_list),
            ("services", core.list_service_for_all_namespaces, {}, self._on_service_event, self._on_service_list),
            ("endpointslices", discovery.list_endpoint_slice_for_all_namespaces, {},
             self._on_slice_event, self._on_slice_list),
        ]
        if not self.watch_peers:
            watches = watches[:1]
        for name, list_fn, kwargs, on_event, on_list in watches:
            thread = threading.Thread(
                target=self._list_and_watch, args=(name, list_fn, kwargs, on_event, on_list),
                name=f"kspan-k8s-{name}", daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._verdicts_dirty.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        if self._api_client is not None:
            try:
                self._api_client.close()
            except Exception:  # closing a pool on shutdown: nothing to act on
                pass

    def wait_synced(self, timeout_s: float) -> bool:
        """True once the node's pods have been listed (lookups before that miss)."""
        return self._pods_synced.wait(timeout_s)

    def stats(self) -> dict[str, int]:
        with self._lock:
            stats = dict(self.counters)
            stats["pods"] = len(self._pods)
            stats["pods_skipped"] = sum(1 for p in self._pods.values() if not p.traced)
            stats["services"] = len(self._services)
            stats["endpointslices"] = len(self._slices)
        return stats

    def _build_client(self) -> Any:
        from kubernetes import client, config

        configuration = client.Configuration()
        if self.api_url:
            configuration.host = self.api_url.rstrip("/")
        elif self.kubeconfig:
            config.load_kube_config(config_file=self.kubeconfig, client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)
        # urllib3 would retry (and log a warning per retry) before the watch loop's own backoff,
        # which already retries forever with jitter: one retry policy, one log line.
        configuration.retries = 0
        return client.ApiClient(configuration)

    # ------------------------------------------------------------------ lookups

    def attributes_for_pid(self, pid: int) -> dict[str, str]:
        """Resource attributes of the process: k8s.* and container.id, or {} outside a pod or
        when disabled."""
        if not self.enabled:
            return {}
        text = read_cgroup(pid, self.proc_root)
        if text is None:
            return {}
        container_id = container_id_from_cgroup(text)
        uid = pod_uid_from_cgroup(text)
        if container_id is None and uid is None:
            return {}
        with self._lock:
            self.counters["lookups"] += 1
            pod_uid = self._by_container.get(container_id or "") or uid
            pod = self._pods.get(pod_uid or "")
            self.counters["lookup_hits" if pod is not None else "lookup_misses"] += 1
        attributes: dict[str, str] = {}
        if container_id:
            attributes["container.id"] = container_id
        if pod is None:
            # A pod this agent has not seen yet (created a moment ago) still gets what the cgroup
            # path itself proves.
            if uid:
                attributes["k8s.pod.uid"] = uid
                if self.node_name:
                    attributes["k8s.node.name"] = self.node_name
            return attributes
        attributes.update(pod.attributes)
        container_name = pod.containers.get(container_id or "")
        if container_name is None and len(set(pod.containers.values())) == 1:
            # The container's status has no id yet, but a one-container pod leaves no doubt.
            container_name = next(iter(pod.containers.values()))
        if container_name:
            attributes["k8s.container.name"] = container_name
            # Unique per container instance and stable across agent restarts.
            attributes.setdefault("service.instance.id", f"{pod.namespace}.{pod.name}.{container_name}")
        return attributes

    def service_name_for_pid(self, pid: int) -> str | None:
        if not self.enabled:
            return None
        text = read_cgroup(pid, self.proc_root)
        if text is None:
            return None
        container_id = container_id_from_cgroup(text)
        uid = pod_uid_from_cgroup(text)
        with self._lock:
            pod_uid = self._by_container.get(container_id or "") or uid
            pod = self._pods.get(pod_uid or "")
        return pod.service_name if pod is not None else None

    # ------------------------------------------------------------------ workload selection

    @property
    def kernel_filter(self) -> bool:
        """Whether the capture should filter by cgroup (bpf/http_exchange.h kspan_filter_cgroups)."""
        return self.enabled

    def traced_pid(self, pid: int) -> bool:
        """Workload selection's verdict for a process, from its pod (the user-space side of the
        kernel filter: the attachers ask before reading a binary)."""
        if not self.enabled:
            return True
        text = read_cgroup(pid, self.proc_root)
        if text is None:
            return self.selection.default_trace
        container_id = container_id_from_cgroup(text)
        uid = pod_uid_from_cgroup(text)
        with self._lock:
            pod = self._pods.get(self._by_container.get(container_id or "") or uid or "")
        if pod is None:
            return self.selection.default_trace
        return pod.traced

    def attach_capture(self, capture: Any) -> None:
        """Keep `capture`'s cgroup verdicts (Capture.set_cgroup_verdicts) in step with this node's
        pods from now on, and gate its attachers by pod. Call after capture.start(); stop() this
        before closing the capture."""
        if not self.enabled or self._capture is not None:
            return
        capture.trace_gate = self.traced_pid
        self._capture = capture
        if self.cgroup_root is None:
            log.warning(
                "kspan: no cgroup v2 hierarchy found (looked in %s): pods cannot be told apart in the "
                "kernel, so workload selection traces %s. Mount the node's /sys/fs/cgroup (the DaemonSet "
                "does) or set KSPAN_CGROUP_ROOT.", "KSPAN_CGROUP_ROOT" if os.environ.get("KSPAN_CGROUP_ROOT")
                else "/sys/fs/cgroup, /sys/fs/cgroup/unified",
                "nothing (opt-in mode)" if not self.selection.default_trace else "every pod")
            return
        log.info("kspan: workload selection: %s", self.selection.describe())
        # The pods already on the node get their verdicts before the agent says it is ready (and
        # before the attachers look at their binaries); a slow API delays that by sync_wait_s.
        if self.wait_synced(self.sync_wait_s):
            try:
                self.apply_verdicts()
            except Exception as exc:  # noqa: BLE001 - the thread below retries
                self._count("cgroup_scan_errors")
                log.warning("kspan: cgroup verdicts not set at start: %s", exc)
        else:
            log.warning("kspan: this node's pods were not listed within %.0f s: until they are, every "
                        "process gets the default verdict (%s)", self.sync_wait_s,
                        "traced" if self.selection.default_trace else "not traced")
        self._verdicts_dirty.set()
        thread = threading.Thread(target=self._sync_verdicts, name="kspan-k8s-cgroups", daemon=True)
        self._threads.append(thread)
        thread.start()

    def desired_verdicts(self) -> dict[int, bool]:
        """cgroup id -> verdict for the pods of this node now (one walk of the cgroup tree).
        Cgroups of pods not listed yet get none: the kernel's default verdict covers them."""
        assert self.cgroup_root is not None
        pods, unreadable = pod_cgroup_ids(self.cgroup_root)
        with self._lock:
            self.counters["cgroup_scans"] += 1
            self.counters["cgroup_scan_errors"] += unreadable
            verdicts: dict[int, bool] = {}
            for uid, ids in pods.items():
                pod = self._pods.get(uid)
                if pod is None:
                    continue
                for cgroup_id in ids:
                    verdicts[cgroup_id] = pod.traced
        return verdicts

    def _sync_verdicts(self) -> None:
        while not self._stop.is_set():
            self._verdicts_dirty.wait(self.cgroup_rescan_s)
            if self._stop.is_set():
                break
            self._verdicts_dirty.clear()
            try:
                self.apply_verdicts()
            except Exception as exc:  # noqa: BLE001 - a failed walk is retried at the next rescan
                self._count("cgroup_scan_errors")
                log.warning("kspan: cgroup verdicts not updated: %s", exc)

    def apply_verdicts(self) -> int:
        """Write what changed since the last call to the capture; the verdicts written."""
        capture = self._capture
        if capture is None or self.cgroup_root is None:
            return 0
        desired = self.desired_verdicts()
        changed = {cid: v for cid, v in desired.items() if self._applied.get(cid) != v}
        gone = [cid for cid in self._applied if cid not in desired]
        written = capture.set_cgroup_verdicts(changed, gone) if (changed or gone) else 0
        first = not self._applied and bool(changed)
        for cid in gone:
            del self._applied[cid]
        self._applied.update(changed)
        with self._lock:
            self.counters["cgroup_verdicts"] = len(self._applied)
            skipped = sum(1 for p in self._pods.values() if not p.traced)
            pods = len(self._pods)
        if changed or gone:
            (log.info if first else log.debug)(
                "kspan: workload selection in the kernel: %d of this node's %d pods traced, %d skipped "
                "(%d cgroups)", pods - skipped, pods, skipped, len(self._applied))
        return written

    def name_for_ip(self, ip: str) -> str | None:
        """The service a peer address belongs to: a pod on this node (its service.name), a
        Service's cluster IP, or a pod IP behind a Service anywhere in the cluster (EndpointSlices)."""
        if not self.enabled:
            return None
        key = _normalise_ip(ip)
        with self._lock:
            uid = self._pod_ip.get(key)
            if uid is not None and uid in self._pods:
                return self._pods[uid].service_name
            return self._service_ip.get(key) or self._slice_ip.get(key)

    # ------------------------------------------------------------------ watch loop

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def _report_failure(self, resource: str, exc: BaseException) -> None:
        self._count("api_errors")
        status = getattr(exc, "status", None)
        if status in (401, 403):
            hint = (f"the ServiceAccount may not list/watch {resource}: apply deploy/kubernetes/01-rbac.yaml")
        else:
            hint = "retrying with backoff"
        if resource not in self._failing:
            self._failing.add(resource)
            log.warning("kspan: Kubernetes API %s for %s failed: %s; %s",
                        self._host(), resource, _short_error(exc), hint)
        else:
            log.debug("kspan: Kubernetes %s still failing: %s", resource, _short_error(exc))

    def _report_recovery(self, resource: str) -> None:
        if resource in self._failing:
            self._failing.discard(resource)
            log.info("kspan: Kubernetes API answers again for %s", resource)

    def _host(self) -> str:
        try:
            return str(self._api_client.configuration.host)
        except AttributeError:
            return "?"

    def _list_and_watch(
        self,
        resource: str,
        list_fn: Callable[..., Any],
        kwargs: dict[str, Any],
        on_event: Callable[[str, Obj], None],
        on_list: Callable[[list[Obj]], None],
    ) -> None:
        """List, then watch from the list's resourceVersion; relist on 410 Gone, on every
        `resync_s` (a safety net against missed events) and after errors, with capped exponential
        backoff and jitter so a fleet of agents does not stampede a recovering API server."""
        from kubernetes.client.exceptions import ApiException

        backoff = 0.5
        while not self._stop.is_set():
            try:
                response = list_fn(**kwargs, _preload_content=False, _request_timeout=self.request_timeout_s)
                body = json.loads(response.data)
                self._count("lists")
                on_list(body.get("items") or [])
                version = (body.get("metadata") or {}).get("resourceVersion") or ""
                self._report_recovery(resource)
                backoff = 0.5
                listed_at = time.monotonic()
                while not self._stop.is_set() and time.monotonic() - listed_at < self.resync_s:
                    watch_started = time.monotonic()
                    version = self._watch_once(list_fn, kwargs, version, on_event)
                    if time.monotonic() - watch_started < self.rewatch_pause_s:
                        self._stop.wait(self.rewatch_pause_s)
            except _ResourceExpired:
                continue  # our resourceVersion is too old (etcd compacted it): relist, no backoff
            except ApiException as exc:
                if exc.status == 410:
                    continue
                self._report_failure(resource, exc)
            except Exception as exc:  # network errors, bad JSON: count, log once, back off
                self._report_failure(resource, exc)
            else:
                continue
            self._stop.wait(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff_s)

    def _watch_once(
        self, list_fn: Callable[..., Any], kwargs: dict[str, Any], version: str,
        on_event: Callable[[str, Obj], None],
    ) -> str:
        """One watch request, read to its end (the server closes it after timeoutSeconds). Returns
        the last resourceVersion seen. Events are parsed here rather than by kubernetes.watch.Watch,
        whose raw (deserialize=False) mode cannot read an ERROR event."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        response = list_fn(
            **kwargs, watch=True, resource_version=version, timeout_seconds=self.watch_timeout_s,
            allow_watch_bookmarks=True, _preload_content=False,
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
        )
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line:
                    continue
                try:
                    event = json.loads(line)
                    event_type, obj = event["type"], event.get("object") or {}
                except (ValueError, KeyError, TypeError):
                    self._count("bad_watch_events")
                    continue
                if event_type == "ERROR":
                    if obj.get("code") == 410:
                        raise _ResourceExpired()
                    raise ApiException(status=obj.get("code"), reason=str(obj.get("message") or "watch error"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event_type in ("ADDED", "MODIFIED", "DELETED"):
                    self._count("watch_events")
                    on_event(event_type, obj)
        finally:
            response.close()
            response.release_conn()
        return version

    # ------------------------------------------------------------------ pods

    def _on_pod_list(self, items: list[Obj]) -> None:
        pods = [p for p in (self._pod_info(item) for item in items) if p is not None]
        with self._lock:
            self._pods.clear()
            self._by_container.clear()
            self._pod_ip.clear()
            for pod in pods:
                self._index_pod(pod)
        self._pods_synced.set()
        self._verdicts_dirty.set()

    def _on_pod_event(self, event_type: str, obj: Obj) -> None:
        uid = (obj.get("metadata") or {}).get("uid")
        if not uid:
            return
        pod = None if event_type == "DELETED" else self._pod_info(obj)
        with self._lock:
            self._unindex_pod(uid)
            if pod is not None:
                self._index_pod(pod)
        self._verdicts_dirty.set()

    def _index_pod(self, pod: PodInfo) -> None:
        self._pods[pod.uid] = pod
        for container_id in pod.containers:
            self._by_container[container_id] = pod.uid
        for ip in pod.ips:
            self._pod_ip[ip] = pod.uid

    def _unindex_pod(self, uid: str) -> None:
        old = self._pods.pop(uid, None)
        if old is None:
            return
        for container_id in old.containers:
            if self._by_container.get(container_id) == uid:
                del self._by_container[container_id]
        for ip in old.ips:
            if self._pod_ip.get(ip) == uid:
                del self._pod_ip[ip]

    def _pod_info(self, obj: Obj) -> PodInfo | None:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        uid, name, namespace = meta.get("uid"), meta.get("name"), meta.get("namespace")
        if not (uid and name and namespace):
            return None
        attributes = {
            "k8s.namespace.name": namespace,
            "k8s.pod.name": name,
            "k8s.pod.uid": uid,
            "k8s.node.name": spec.get("nodeName") or self.node_name or "",
        }
        if not attributes["k8s.node.name"]:
            del attributes["k8s.node.name"]
        for owner in meta.get("ownerReferences") or ():
            if not owner.get("controller", True):
                continue
            kind, owner_name = owner.get("kind"), owner.get("name")
            if not owner_name or kind not in _OWNER_ATTRIBUTE:
                continue
            attributes[_OWNER_ATTRIBUTE[kind]] = owner_name
            if kind == "ReplicaSet":
                deployment = self._grand_owner("replicasets", namespace, owner_name, "Deployment")
                if not deployment:
                    # The ReplicaSet could not be read (or is gone): a Deployment's ReplicaSet is named
                    # `<deployment>-<pod-template-hash>`, which the pod's label also carries.
                    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
                    if template_hash and owner_name.endswith("-" + template_hash):
                        deployment = owner_name[: -len(template_hash) - 1]
                if deployment:
                    attributes["k8s.deployment.name"] = deployment
            elif kind == "Job":
                cronjob = self._grand_owner("jobs", namespace, owner_name, "CronJob")
                if cronjob:
                    attributes["k8s.cronjob.name"] = cronjob
        containers: dict[str, str] = {}
        for container in _container_statuses(status):
            container_id, container_name = container.get("containerID"), container.get("name")
            if container_id and container_name:
                containers[_strip_runtime(container_id)] = container_name
        if not containers:
            # Statuses not filled in yet: keep the names so a one-container pod still resolves.
            for container in spec.get("containers") or ():
                if container.get("name"):
                    containers[f"pending:{uid}:{container['name']}"] = container["name"]
        ips: tuple[str, ...] = ()
        if not spec.get("hostNetwork"):
            # A host-network pod shares the node's IP: that IP names no single service.
            raw_ips = [entry.get("ip") for entry in status.get("podIPs") or ()] or [status.get("podIP")]
            ips = tuple(_normalise_ip(ip) for ip in raw_ips if ip)
        labels = meta.get("labels") or {}
        annotations = meta.get("annotations") or {}
        service_name = service_name_for_pod(labels, annotations, attributes, self.selection.service_name_label)
        if not trace_choice(labels, annotations)[1]:
            self._count("bad_trace_values")
        traced = self.selection.pod_traced(namespace, labels, annotations)
        # OpenTelemetry's Kubernetes conventions: every `resource.opentelemetry.io/<key>`
        # annotation is the resource attribute <key>; service.namespace defaults to the
        # namespace and service.version to the well-known version label.
        resource = {"service.namespace": namespace}
        if labels.get(LABEL_VERSION):
            resource["service.version"] = labels[LABEL_VERSION]
        for key, value in annotations.items():
            if key.startswith(RESOURCE_ANNOTATION_PREFIX) and key != SERVICE_NAME_ANNOTATION and value:
                resource[key[len(RESOURCE_ANNOTATION_PREFIX):]] = str(value)
        attributes = {**resource, **attributes}  # never let an annotation overwrite k8s.* facts
        return PodInfo(
            uid=uid, namespace=namespace, name=name, attributes=attributes,
            service_name=service_name, containers=containers, ips=ips, traced=traced,
        )

    def _grand_owner(self, resource: str, namespace: str, name: str, kind: str) -> str | None:
        """The controlling owner of kind `kind` of a ReplicaSet or Job ("" when it has none),
        cached; None when the API could not tell (the lookup is retried on the pod's next event)."""
        key = (resource, namespace, name)
        with self._lock:
            cached = self._owner_cache.get(key)
            if cached is not None:
                self._owner_cache.move_to_end(key)
                return cached
        from kubernetes import client

        try:
            if resource == "replicasets":
                response = client.AppsV1Api(self._api_client).read_namespaced_replica_set(
                    name, namespace, _preload_content=False, _request_timeout=self.request_timeout_s)
            else:
                response = client.BatchV1Api(self._api_client).read_namespaced_job(
                    name, namespace, _preload_content=False, _request_timeout=self.request_timeout_s)
            body = json.loads(response.data)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status == 404:  # gone already (a finished Job's pod may outlive it): no owner
                result = ""
            else:
                self._count("owner_lookup_errors")
                self._report_failure(resource, exc)
                return None
        else:
            self._report_recovery(resource)
            result = ""
            for owner in (body.get("metadata") or {}).get("ownerReferences") or ():
                if owner.get("kind") == kind and owner.get("name"):
                    result = owner["name"]
                    break
        with self._lock:
            self._owner_cache[key] = result
            while len(self._owner_cache) > _OWNER_CACHE_SIZE:
                self._owner_cache.popitem(last=False)
        return result

    # ------------------------------------------------------------------ services, endpointslices

    def _on_service_list(self, items: list[Obj]) -> None:
        with self._lock:
            self._services.clear()
            self._service_ip.clear()
        for item in items:
            self._on_service_event("ADDED", item)

    def _on_service_event(self, event_type: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        ips = tuple(_normalise_ip(ip) for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")])
                    if ip and ip != "None")
        with self._lock:
            for ip in self._services.pop(key, ()):
                if self._service_ip.get(ip) == meta.get("name"):
                    del self._service_ip[ip]
            if event_type != "DELETED" and meta.get("name"):
                self._services[key] = ips
                for ip in ips:
                    self._service_ip[ip] = meta["name"]

    def _on_slice_list(self, items: list[Obj]) -> None:
        with self._lock:
            self._slices.clear()
            self._slice_ip.clear()
        for item in items:
            self._on_slice_event("ADDED", item)

    def _on_slice_event(self, event_type: str, obj: Obj) -> None:
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        ips = tuple(
            _normalise_ip(address)
            for endpoint in obj.get("endpoints") or ()
            for address in endpoint.get("addresses") or ()
        )
        with self._lock:
            old = self._slices.pop(key, None)
            if old is not None:
                for ip in old[1]:
                    if self._slice_ip.get(ip) == old[0]:
                        del self._slice_ip[ip]
            if event_type != "DELETED" and service:
                self._slices[key] = (service, ips)
                for ip in ips:
                    self._slice_ip[ip] = service


class _ResourceExpired(Exception):
    """A watch's resourceVersion is older than the API server keeps: list again."""


def _short_error(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError wraps the socket error
    cause = reason if isinstance(reason, BaseException) else exc
    return f"{type(cause).__name__}: {str(cause)[:200]}"
