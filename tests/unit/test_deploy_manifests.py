"""deploy/kubernetes/*.yaml: valid Kubernetes objects (the `kubernetes` client's models and its
create_from_yaml utility against a local API endpoint), and the settings kspan depends on.
deploy/Dockerfile: the objects are compiled in a build stage, the runtime stage has no compiler."""

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
# kustomization.yaml is kustomize's input, not an object (tests/unit/test_kustomize.py renders it).
MANIFESTS = sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")
DOCKERFILE = DEPLOY.parent / "Dockerfile"
DAEMONSET = DEPLOY / "03-daemonset.yaml"
# Host paths only bcc's run-time compile needed (kernel headers): gone with the CO-RE objects.
HEADER_PATHS = ("/lib/modules", "/usr/src")

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
        "/sys/kernel/debug": ("/sys/kernel/debug", False),
        "/host/proc": ("/proc", True),
        "/sys/fs/cgroup": ("/sys/fs/cgroup", True),
    }
    for mount_path, (host_path, read_only) in expected.items():
        mount = mounts[mount_path]
        assert volumes[mount["name"]]["hostPath"]["path"] == host_path
        assert bool(mount.get("readOnly")) is read_only, mount_path
    # Every mount names a declared volume, and every volume is mounted.
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)


def test_daemonset_needs_no_kernel_headers() -> None:
    """The CO-RE objects are relocated against the kernel's BTF: no volume or mount of the
    node's kernel headers (/lib/modules, /usr/src) is left."""
    spec = daemonset()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    host_paths = [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v]
    mount_paths = [m["mountPath"] for m in container["volumeMounts"]]
    for path in host_paths + mount_paths:
        assert not any(path == p or path.startswith(p + "/") for p in HEADER_PATHS), path
    # The only writable scratch space (readOnlyRootFilesystem) is the /tmp emptyDir of kspan's
    # own output files, on node disk (medium Memory would count against the memory limit).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    scratch = [v for v in spec["volumes"] if "emptyDir" in v]
    assert [v["name"] for v in scratch] == ["tmp"]
    assert scratch[0]["emptyDir"].get("medium", "") != "Memory"
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"] == "tmp"
    assert container["workingDir"] == "/tmp"
    # Nor any mention of bcc or of compiling at start-up, in the comments either.
    for path in [*MANIFESTS, DOCKERFILE]:
        text = path.read_text().lower()
        assert "bcc" not in text and "bpfcc" not in text, path.name


def commented_blocks(text: str, first: str) -> list[Any]:
    """The commented-out YAML examples of a manifest that start with the line `# {first}`,
    uncommented and parsed (each block: that line and the more-indented comment lines under it)."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != f"# {first}":
            continue
        prefix = line[: line.index("#")] + "# "
        block = [line[len(prefix):]]
        for nxt in lines[i + 1:]:
            if not nxt.startswith(prefix + " "):
                break
            block.append(nxt[len(prefix):])
        blocks.append(yaml.safe_load("\n".join(block)))
    return blocks


def test_daemonset_kspan_btf_is_an_optional_commented_example() -> None:
    """KSPAN_BTF would override the kernel's own BTF on every node: it is offered commented out,
    with its hostPath volume and mount, for nodes whose kernel has no /sys/kernel/btf/vmlinux."""
    ds = daemonset()
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert "KSPAN_BTF" not in {e["name"] for e in container["env"]}
    text = DAEMONSET.read_text()
    (env,) = commented_blocks(text, "- name: KSPAN_BTF")
    mount, volume = commented_blocks(text, "- name: btf")  # in file order: mounts, then volumes
    (mount,), (volume,) = mount, volume
    assert mount["readOnly"] is True
    assert volume["hostPath"]["path"] == mount["mountPath"]
    assert Path(env[0]["value"]).parent == Path(mount["mountPath"])
    # Uncommented, the example is a valid DaemonSet that loses no field and mounts what it declares.
    spec = ds["spec"]["template"]["spec"]
    container["env"] = container["env"] + env
    container["volumeMounts"] = container["volumeMounts"] + [mount]
    spec["volumes"] = spec["volumes"] + [volume]
    api = client.ApiClient()
    model = api.deserialize(json.dumps(ds), "V1DaemonSet", "application/json")
    assert missing_keys(ds, api.sanitize_for_serialization(model)) == []
    assert {m["name"] for m in container["volumeMounts"]} == {v["name"] for v in spec["volumes"]}


def test_daemonset_security_and_resources() -> None:
    (container,) = daemonset()["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False
    added = set(security["capabilities"]["add"])
    assert {"BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"} <= added
    assert security["capabilities"]["drop"] == ["ALL"]
    # The API server rejects allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert not ("SYS_ADMIN" in added and security.get("allowPrivilegeEscalation") is False)
    # NET_ADMIN: the sock_ops program of cross-node context propagation (a cgroup BPF program).
    assert {"BPF", "PERFMON", "SYS_RESOURCE", "SYS_PTRACE", "DAC_READ_SEARCH", "NET_ADMIN"} == added
    # CAP_BPF + CAP_PERFMON (Linux >= 5.8) replace SYS_ADMIN; only mounting tracefs would need it.
    assert "SYS_ADMIN" not in added
    limits = container["resources"]["limits"]
    assert utils.parse_quantity(limits["memory"]) <= utils.parse_quantity("512Mi")
    assert utils.parse_quantity(limits["cpu"]) <= utils.parse_quantity("1")
    assert container["resources"]["requests"]["memory"]
    # No compile peak any more: sized on the targets (steady RSS <= 100 MB, peak <= 150 MB).
    requests = container["resources"]["requests"]
    assert utils.parse_quantity(limits["memory"]) <= utils.parse_quantity("200Mi")
    assert utils.parse_quantity(limits["memory"]) >= utils.parse_quantity("150M")  # the peak fits
    assert utils.parse_quantity(requests["memory"]) <= utils.parse_quantity(limits["memory"])
    assert utils.parse_quantity(requests["memory"]) >= utils.parse_quantity("100M")  # the steady state
    assert utils.parse_quantity(limits["cpu"]) <= utils.parse_quantity("500m")
    assert utils.parse_quantity(requests["cpu"]) <= utils.parse_quantity(limits["cpu"])


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


# --- deploy/Dockerfile -----------------------------------------------------------------------

Instruction = tuple[str, str]  # (keyword, arguments), continuation lines joined, comments dropped


def dockerfile_stages() -> list[tuple[str, list[Instruction]]]:
    """(FROM arguments, instructions) per stage of deploy/Dockerfile."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue  # comments (and parser directives), also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[tuple[str, list[Instruction]]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stages.append((args.strip(), []))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1][1].append((keyword, " ".join(args.split())))
    return stages


def stage(name: str) -> list[Instruction]:
    (found,) = [ins for frm, ins in dockerfile_stages() if frm.split()[-1] == name]
    return found


def apt_installed(instructions: list[Instruction]) -> set[str]:
    packages: set[str] = set()
    for keyword, args in instructions:
        if keyword != "RUN":
            continue
        for command in args.split("&&"):
            words = command.split()
            if "apt-get" in words and "install" in words:
                packages |= {w for w in words[words.index("install") + 1:] if not w.startswith("-")}
    return packages


def runs(instructions: list[Instruction]) -> str:
    return "\n".join(args for keyword, args in instructions if keyword == "RUN")


def test_dockerfile_is_multi_stage_build_then_slim_runtime() -> None:
    froms = [frm for frm, _ in dockerfile_stages()]
    assert "debian:12 AS build" in froms
    # The last stage is the image: the slim runtime.
    assert froms[-1] in ("debian:12-slim", "debian:12-slim AS runtime")


def test_dockerfile_build_stage_compiles_the_objects_and_builds_wheels() -> None:
    build = stage("build")
    assert {"clang", "llvm", "bpftool", "libbpf-dev", "python3", "python3-venv", "python3-pip"} <= apt_installed(build)
    script = runs(build)
    assert "scripts/build-bpf.sh" in script
    assert re.search(r"pip wheel (--no-cache-dir )?--no-deps -w /wheels \.(\s|$)", script)
    # The dependencies as wheels too: the runtime stage installs offline (--no-index).
    assert re.search(r"pip wheel .*-w /wheels /wheels/kspan-\*\.whl", script)
    # Stale objects from the build context are not shipped: they are removed, then compiled.
    assert script.index("tracer/objects/*.bpf.o") < script.index("scripts/build-bpf.sh")
    # The sources the script compiles are copied before it runs.
    copied = [args.split()[0] for keyword, args in build if keyword == "COPY" and not args.startswith("--")]
    assert {"scripts", "bpf", "tracer", "pyproject.toml"} <= {c.rstrip("/") for c in copied}
    # KSPAN_BUILD_BTF (the BTF vmlinux.h is generated from) can be set for the build.
    assert ("ARG", "KSPAN_BUILD_BTF=") in build
    assert 'KSPAN_BUILD_BTF="${KSPAN_BUILD_BTF}" bash scripts/build-bpf.sh' in script


def test_wheel_carries_the_objects_as_package_data() -> None:
    """The runtime stage has no source tree: the objects reach it only inside the wheel."""
    import tomllib

    pyproject = tomllib.loads((DEPLOY.parents[1] / "pyproject.toml").read_text())
    assert "objects/*.bpf.o" in pyproject["tool"]["setuptools"]["package-data"]["tracer"]
    assert "tracer/objects/" in runs(stage("build"))  # the build checks the wheel holds them


def test_dockerfile_runtime_stage_has_no_compiler_or_headers() -> None:
    runtime = dockerfile_stages()[-1][1]
    assert apt_installed(runtime) == {"python3", "python3-venv", "libbpf1", "ca-certificates"}
    text = "\n".join(args for _, args in runtime).lower()
    for banned in ("clang", "llvm", "bpfcc", "linux-headers", "gcc", "build-essential", "libbpf-dev", "bpftool",
                   "scripts/build-bpf.sh"):
        assert banned not in text, banned
    # Nothing from the build context: only the build stage's wheels, bind-mounted or copied.
    for keyword, args in runtime:
        if keyword in ("COPY", "ADD"):
            assert args.startswith("--from=build"), args
    script = runs(runtime)
    assert "--mount=type=bind,from=build,source=/wheels" in script
    install = re.search(r"pip install ([^&]*)", script)
    assert install, "the runtime stage installs kspan with pip"
    # Non-editable, from the wheels only.
    assert "-e" not in install.group(1).split() and "--editable" not in install.group(1)
    assert "--no-index" in install.group(1) and "--find-links=/wheels" in install.group(1)
    assert "python3 -m venv /opt/kspan/venv" in script
    assert any(keyword == "ENV" and "PATH=/opt/kspan/venv/bin:$PATH" in args for keyword, args in runtime)
    (entrypoint,) = [json.loads(args) for keyword, args in runtime if keyword == "ENTRYPOINT"]
    assert entrypoint == ["kspan", "run"]
