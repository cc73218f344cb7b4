"""PID -> container id and pod uid, read from /proc/PID/cgroup.

The cgroup path is the one place the kernel records which container a process runs in. Its shape
depends on the container runtime (containerd, CRI-O, Docker), the kubelet's cgroup driver
(cgroupfs: `/kubepods/burstable/pod<uid>/<id>`; systemd: `.slice`/`.scope` units with the pod
uid's dashes turned into underscores because `-` separates systemd unit name levels) and the
cgroup version (v1: one line per controller hierarchy; v2: the single `0::` line). Nested set-ups
(kind, Docker-in-Docker) put a whole node inside an outer container: the innermost id is the
process's own container, so the path is read from its end.
"""

from __future__ import annotations

import re

# One path component that names a container: the bare 64-hex id (cgroupfs driver, Docker's
# `/docker/<id>`) or a systemd scope named for the runtime. `crio-conmon-<id>` is CRI-O's
# monitor process, not the container: it must not match.
_CONTAINER_COMPONENT = re.compile(
    r"^(?:(?:cri-containerd|crio|docker|libpod|containerd)-)?(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)
# `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd). Static and
# mirror pods have a 32-hex config hash for a uid instead of a UUID.
_POD_COMPONENT = re.compile(
    r"(?:^|-)pod(?P<uid>[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32})(?:\.slice)?$"
)


def _cgroup_paths(text: str) -> list[str]:
    """The path of each line `hierarchy-id:controllers:path`, the v2 line (`0::`) first: on a
    hybrid host the v1 lines may belong to the host while v2 is what the runtime set up, and on a
    pure v1 host every hierarchy names the same container."""
    v2: list[str] = []
    v1: list[str] = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        (v2 if hierarchy == "0" and controllers == "" else v1).append(path)
    return v2 + v1


def container_id_from_cgroup(text: str) -> str | None:
    """The container id (64 hex) of the process whose /proc/PID/cgroup is `text`, or None for a
    process outside any container."""
    for path in _cgroup_paths(text):
        for component in reversed(path.split("/")):
            match = _CONTAINER_COMPONENT.match(component)
            if match:
                return match.group("id")
    return None


def pod_uid_from_cgroup(text: str) -> str | None:
    """The Kubernetes pod uid (with dashes, as the API spells it) of the process whose
    /proc/PID/cgroup is `text`, or None outside a pod."""
    for path in _cgroup_paths(text):
        for component in reversed(path.split("/")):
            match = _POD_COMPONENT.search(component)
            if match:
                return match.group("uid").replace("_", "-")
    return None


def pod_uid_from_component(name: str) -> str | None:
    """The pod uid one cgroup directory name holds (`pod<uid>`, `kubepods-<qos>-pod<uid>.slice`),
    or None: what a walk of the cgroup tree matches directory by directory."""
    match = _POD_COMPONENT.search(name)
    return match.group("uid").replace("_", "-") if match else None


def read_cgroup(pid: int, proc_root: str = "/proc") -> str | None:
    """The text of /proc/PID/cgroup, or None when the process is gone or unreadable (a pid can exit
    between the time it is seen and the time it is looked up)."""
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def container_id_for_pid(pid: int, proc_root: str = "/proc") -> str | None:
    text = read_cgroup(pid, proc_root)
    return container_id_from_cgroup(text) if text is not None else None


def pod_uid_for_pid(pid: int, proc_root: str = "/proc") -> str | None:
    text = read_cgroup(pid, proc_root)
    return pod_uid_from_cgroup(text) if text is not None else None
