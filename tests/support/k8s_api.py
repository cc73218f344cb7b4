"""A real, local Kubernetes API endpoint for tests: http.server on 127.0.0.1 in a thread.

It serves the read paths kspan's tracer/kubernetes.py uses, from realistic fixtures:
  GET /api/v1/pods?fieldSelector=spec.nodeName=<node>   (list; `watch=true` streams queued events)
  GET /api/v1/services                                  (list / watch)
  GET /apis/discovery.k8s.io/v1/endpointslices          (list / watch)
  GET /apis/apps/v1/namespaces/{ns}/replicasets/{name}
  GET /apis/batch/v1/namespaces/{ns}/jobs/{name}
  POST <any collection>   (recorded in `created` and echoed back: manifests via create_from_yaml)
A watch sends the events queued with push_event() as JSON lines, holds the stream open briefly
and ends, as a real API server does when a watch's timeoutSeconds runs out.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NODE = "node-a"
OTHER_NODE = "node-b"

Obj = dict[str, Any]


def container_id(name: str) -> str:
    """A stable 64-hex container id for a fixture container."""
    return hashlib.sha256(name.encode()).hexdigest()


def pod_uid(name: str) -> str:
    h = hashlib.md5(name.encode()).hexdigest()  # noqa: S324 - a fixture id, not security
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"


def make_pod(
    name: str,
    namespace: str = "shop",
    node: str = NODE,
    ip: str = "10.244.1.10",
    containers: tuple[str, ...] = ("app",),
    init_containers: tuple[str, ...] = (),
    runtime: str = "containerd",
    owner: tuple[str, str] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    host_network: bool = False,
) -> Obj:
    """A pod as the API server returns it (the fields kspan reads, plus the usual noise)."""
    uid = pod_uid(name)
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "resourceVersion": "1001",
        "creationTimestamp": "2026-11-20T08:00:00Z",
        "labels": dict(labels or {}),
        "annotations": dict(annotations or {}),
    }
    if owner is not None:
        kind, owner_name = owner
        api_version = {"ReplicaSet": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1",
                       "Job": "batch/v1"}.get(kind, "v1")
        meta["ownerReferences"] = [{
            "apiVersion": api_version, "kind": kind, "name": owner_name,
            "uid": pod_uid(owner_name), "controller": True, "blockOwnerDeletion": True,
        }]

    def status(cname: str) -> Obj:
        return {
            "name": cname,
            "image": f"registry.example.com/{cname}:1.4.2",
            "imageID": f"registry.example.com/{cname}@sha256:{container_id('img' + cname)}",
            "containerID": f"{runtime}://{container_id(name + '/' + cname)}",
            "ready": True,
            "restartCount": 0,
            "started": True,
            "state": {"running": {"startedAt": "2026-11-20T08:00:05Z"}},
        }

    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "hostNetwork": host_network,
            "serviceAccountName": "default",
            "containers": [{"name": c, "image": f"registry.example.com/{c}:1.4.2"} for c in containers],
            "initContainers": [{"name": c, "image": f"registry.example.com/{c}:1.0"}
                               for c in init_containers],
        },
        "status": {
            "phase": "Running",
            "hostIP": "192.168.10.11",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "qosClass": "Burstable",
            "containerStatuses": [status(c) for c in containers],
            "initContainerStatuses": [
                {**status(c), "ready": False, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
                for c in init_containers
            ],
        },
    }


def default_pods() -> list[Obj]:
    return [
        # Deployment pod, no well-known labels: service.name falls to the owner Deployment.
        make_pod("checkout-7d9f8b6c5d-x2k4p", ip="10.244.1.11", containers=("checkout", "envoy"),
                 init_containers=("migrate",), owner=("ReplicaSet", "checkout-7d9f8b6c5d"),
                 labels={"pod-template-hash": "7d9f8b6c5d"}),
        # Annotation beats both labels.
        make_pod("payments-5c6d7e8f9a-q8w7e", ip="10.244.1.12", owner=("ReplicaSet", "payments-5c6d7e8f9a"),
                 labels={"app.kubernetes.io/instance": "payments-prod", "app.kubernetes.io/name": "payments",
                         "pod-template-hash": "5c6d7e8f9a"},
                 annotations={"resource.opentelemetry.io/service.name": "payments-api"}),
        # Instance label beats name label and owner.
        make_pod("cart-0", ip="10.244.1.13", owner=("StatefulSet", "cart"), runtime="cri-o",
                 labels={"app.kubernetes.io/instance": "cart-eu", "app.kubernetes.io/name": "cart"}),
        # Name label beats owner.
        make_pod("frontend-agent-h5j6k", namespace="edge", ip="10.244.1.14", owner=("DaemonSet", "frontend-agent"),
                 labels={"app.kubernetes.io/name": "frontend"}),
        # Job owned by a CronJob.
        make_pod("report-28911520-abcde", namespace="batch", ip="10.244.1.15",
                 owner=("Job", "report-28911520")),
        # Bare Job, Docker runtime.
        make_pod("migrate-db-zx9yq", namespace="batch", ip="10.244.1.16", owner=("Job", "migrate-db"),
                 runtime="docker"),
        # No owner, no labels: the pod name.
        make_pod("debug-shell", namespace="default", ip="10.244.1.17", runtime="cri-o"),
        # Host network pod: its IP is the node's and must not name a service.
        make_pod("node-exporter-abcde", namespace="monitoring", ip="192.168.10.11",
                 owner=("DaemonSet", "node-exporter"), host_network=True),
        # On another node: the field selector must keep it out.
        make_pod("inventory-6b7c8d9e0f-r4t5y", node=OTHER_NODE, ip="10.244.2.17",
                 owner=("ReplicaSet", "inventory-6b7c8d9e0f")),
    ]


def default_replicasets() -> list[Obj]:
    def rs(name: str, deployment: str, namespace: str = "shop") -> Obj:
        return {
            "kind": "ReplicaSet", "apiVersion": "apps/v1",
            "metadata": {
                "name": name, "namespace": namespace, "uid": pod_uid(name), "resourceVersion": "900",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment,
                                     "uid": pod_uid(deployment), "controller": True}],
            },
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": deployment}}},
        }

    return [rs("checkout-7d9f8b6c5d", "checkout"), rs("payments-5c6d7e8f9a", "payments"),
            rs("inventory-6b7c8d9e0f", "inventory")]


def default_jobs() -> list[Obj]:
    return [
        {"kind": "Job", "apiVersion": "batch/v1",
         "metadata": {"name": "report-28911520", "namespace": "batch", "uid": pod_uid("report-28911520"),
                      "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob", "name": "report",
                                           "uid": pod_uid("report"), "controller": True}]}},
        {"kind": "Job", "apiVersion": "batch/v1",
         "metadata": {"name": "migrate-db", "namespace": "batch", "uid": pod_uid("migrate-db")}},
    ]


def default_services() -> list[Obj]:
    def svc(name: str, namespace: str, cluster_ip: str) -> Obj:
        return {
            "kind": "Service", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": namespace, "uid": pod_uid("svc" + name),
                         "resourceVersion": "700"},
            "spec": {"type": "ClusterIP", "clusterIP": cluster_ip,
                     "clusterIPs": [cluster_ip] if cluster_ip != "None" else ["None"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        }

    return [svc("payments", "shop", "10.96.12.34"), svc("inventory", "shop", "10.96.40.2"),
            svc("cart-headless", "shop", "None")]


def default_endpointslices() -> list[Obj]:
    return [{
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": "inventory-8xk2p", "namespace": "shop", "resourceVersion": "710",
                     "labels": {"kubernetes.io/service-name": "inventory"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.2.17"], "conditions": {"ready": True}, "nodeName": OTHER_NODE}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }]


class FakeKubernetesApi:
    """The fixture API server. `requests` records every path+query served, for assertions."""

    def __init__(self, watch_hold_s: float = 0.2) -> None:
        self.pods = default_pods()
        self.replicasets = default_replicasets()
        self.jobs = default_jobs()
        self.services = default_services()
        self.endpointslices = default_endpointslices()
        self.watch_hold_s = watch_hold_s
        self.requests: list[str] = []
        # (path, object) of every create (POST), as `kubectl apply` / create_from_yaml send them.
        self.created: list[tuple[str, Obj]] = []
        # Resources answered with 403 Forbidden, as when the ServiceAccount lacks the RBAC rule.
        self.forbidden: set[str] = set()
        self._events: dict[str, list[Obj]] = {"pods": [], "services": [], "endpointslices": []}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.resource_version = 1001

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def push_event(self, resource: str, event_type: str, obj: Obj) -> None:
        """Queue a watch event (ADDED, MODIFIED, DELETED) for the next watch of `resource`."""
        with self._lock:
            self.resource_version += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.resource_version)
            self._events[resource].append({"type": event_type, "object": obj})

    def push_raw_watch_line(self, resource: str, line: bytes) -> None:
        """Queue a line that is not a valid watch event (a proxy's garbage, a truncated write)."""
        with self._lock:
            self._events[resource].append({"raw": line.decode()})

    def start(self) -> str:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                api._handle(self)

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                api._create(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-k8s-api",
                                        daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- request handling

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(req.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.requests.append(req.path)
        segments = [s for s in parts.path.split("/") if s]
        watch = query.get("watch") in ("true", "1")
        resource = segments[-1] if segments and segments[-1] in ("pods", "services", "endpointslices") else (
            segments[5] if len(segments) == 7 else "")
        if resource in self.forbidden:
            return self._send_status(req, 403, "Forbidden", f'{resource} is forbidden: User '
                                     f'"system:serviceaccount:kspan:kspan" cannot list resource "{resource}"')
        if parts.path == "/api/v1/pods":
            items = self._filter_pods(self.pods, query.get("fieldSelector", ""))
            return self._list_or_watch(req, "pods", "PodList", "v1", items, watch, query)
        if parts.path == "/api/v1/services":
            return self._list_or_watch(req, "services", "ServiceList", "v1", self.services, watch, query)
        if parts.path == "/apis/discovery.k8s.io/v1/endpointslices":
            return self._list_or_watch(req, "endpointslices", "EndpointSliceList", "discovery.k8s.io/v1",
                                       self.endpointslices, watch, query)
        if len(segments) == 7 and segments[2:4] == ["v1", "namespaces"]:
            group, namespace, resource, name = segments[1], segments[4], segments[5], segments[6]
            if (group, resource) == ("apps", "replicasets"):
                return self._get_one(req, self.replicasets, namespace, name, resource)
            if (group, resource) == ("batch", "jobs"):
                return self._get_one(req, self.jobs, namespace, name, resource)
        self._send_status(req, 404, "NotFound", f"the server could not find the requested resource {parts.path}")

    def _create(self, req: BaseHTTPRequestHandler) -> None:
        """Accept any create and echo the object back, as the API server does for `dryRun=All`."""
        length = int(req.headers.get("Content-Length") or 0)
        try:
            obj = json.loads(req.rfile.read(length) or b"{}")
        except ValueError:
            return self._send_status(req, 400, "BadRequest", "body is not JSON")
        with self._lock:
            self.requests.append(req.path)
            self.created.append((urlsplit(req.path).path, obj))
        self._send_json(req, 201, obj)

    @staticmethod
    def _filter_pods(pods: list[Obj], selector: str) -> list[Obj]:
        if not selector:
            return pods
        key, _, value = selector.partition("=")
        if key != "spec.nodeName":
            return []
        return [p for p in pods if p["spec"].get("nodeName") == value]

    def _list_or_watch(self, req: BaseHTTPRequestHandler, resource: str, kind: str, api_version: str,
                       items: list[Obj], watch: bool, query: dict[str, str]) -> None:
        if not watch:
            body = {"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self.resource_version)}, "items": items}
            return self._send_json(req, 200, body)
        with self._lock:
            events, self._events[resource] = self._events[resource], []
        if resource == "pods" and query.get("fieldSelector"):
            node_pods = self._filter_pods([e["object"] for e in events if "object" in e and "spec" in e["object"]],
                                          query["fieldSelector"])
            events = [e for e in events if "raw" in e or e["object"] in node_pods or e["type"] == "ERROR"]
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Connection", "close")
        req.end_headers()
        for event in events:
            data = event["raw"].encode() if "raw" in event else json.dumps(event).encode()
            req.wfile.write(data + b"\n")
            req.wfile.flush()
        timeout = float(query.get("timeoutSeconds", "1"))
        time.sleep(min(self.watch_hold_s, timeout))
        req.close_connection = True

    def _get_one(self, req: BaseHTTPRequestHandler, objects: list[Obj], namespace: str, name: str,
                 resource: str) -> None:
        for obj in objects:
            if obj["metadata"]["namespace"] == namespace and obj["metadata"]["name"] == name:
                return self._send_json(req, 200, obj)
        self._send_status(req, 404, "NotFound", f'{resource} "{name}" not found')

    @staticmethod
    def _send_json(req: BaseHTTPRequestHandler, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        req.send_response(code)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _send_status(self, req: BaseHTTPRequestHandler, code: int, reason: str, message: str) -> None:
        self._send_json(req, code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "message": message, "reason": reason, "code": code})


@contextmanager
def fake_kubernetes_api(watch_hold_s: float = 0.2) -> Iterator[FakeKubernetesApi]:
    api = FakeKubernetesApi(watch_hold_s=watch_hold_s)
    api.start()
    try:
        yield api
    finally:
        api.stop()
