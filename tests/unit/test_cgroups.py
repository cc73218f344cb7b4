"""/proc/PID/cgroup -> container id and pod uid, for the runtimes and cgroup layouts seen in the wild."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracer.cgroups import (
    container_id_for_pid,
    container_id_from_cgroup,
    pod_uid_for_pid,
    pod_uid_from_cgroup,
)

CID = "3f4a9c0e2b7d4a1f9e8c7b6a5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c"
OUTER = "aaaa9c0e2b7d4a1f9e8c7b6a5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c"
UID = "5d7c1b2a-9e8f-4a3b-8c7d-6e5f4a3b2c1d"
UID_SYSTEMD = UID.replace("-", "_")
STATIC_UID = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"

V1_CONTROLLERS = ["12:memory", "11:cpu,cpuacct", "10:pids", "1:name=systemd"]


def v1(path: str) -> str:
    return "".join(f"{controllers}:{path}\n" for controllers in V1_CONTROLLERS)


def v2(path: str) -> str:
    return f"0::{path}\n"


CASES = [
    # (runtime / driver / version, /proc/PID/cgroup text, container id, pod uid)
    (
        "containerd systemd v2",
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/"
           f"cri-containerd-{CID}.scope"),
        CID, UID,
    ),
    (
        "containerd systemd v1 guaranteed",
        v1(f"/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"),
        CID, UID,
    ),
    ("containerd cgroupfs v1", v1(f"/kubepods/burstable/pod{UID}/{CID}"), CID, UID),
    ("containerd cgroupfs v2 besteffort", v2(f"/kubepods/besteffort/pod{UID}/{CID}"), CID, UID),
    (
        "cri-o systemd v2",
        v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice/"
           f"crio-{CID}.scope"),
        CID, UID,
    ),
    (
        "cri-o systemd v1",
        v1(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/"
           f"crio-{CID}.scope"),
        CID, UID,
    ),
    ("cri-o cgroupfs v1", v1(f"/kubepods/burstable/pod{UID}/crio-{CID}"), CID, UID),
    ("docker systemd v2", v2(f"/system.slice/docker-{CID}.scope"), CID, None),
    ("docker cgroupfs v1", v1(f"/docker/{CID}"), CID, None),
    ("docker cgroupfs v2", v2(f"/docker/{CID}"), CID, None),
    (
        "dockershim kubelet cgroupfs v1",
        v1(f"/kubepods/besteffort/pod{UID}/{CID}"),
        CID, UID,
    ),
    (
        "kind: node container around a pod, innermost wins",
        v2(f"/system.slice/docker-{OUTER}.scope/kubelet.slice/kubelet-kubepods.slice/"
           f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/"
           f"cri-containerd-{CID}.scope"),
        CID, UID,
    ),
    (
        "static pod uid is a config hash",
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CID, STATIC_UID,
    ),
    (
        "hybrid host: v2 line names the container, v1 lines the host",
        "12:memory:/\n11:cpu,cpuacct:/user.slice\n"
        + v2(f"/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{CID}.scope"),
        CID, UID,
    ),
    ("host process v2", v2("/user.slice/user-0.slice/session-3.scope"), None, None),
    ("host process v1", v1("/system.slice/ssh.service"), None, None),
    ("cgroup namespace hides the path", v2("/"), None, None),
    (
        "pod sandbox cgroup without a container yet",
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"),
        None, UID,
    ),
]


@pytest.mark.parametrize(("label", "text", "cid", "uid"), CASES, ids=[c[0] for c in CASES])
def test_cgroup_paths(label: str, text: str, cid: str | None, uid: str | None) -> None:
    assert container_id_from_cgroup(text) == cid
    assert pod_uid_from_cgroup(text) == uid


def test_crio_conmon_is_not_the_container() -> None:
    text = v2(f"/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/crio-conmon-{CID}.scope")
    assert container_id_from_cgroup(text) is None
    assert pod_uid_from_cgroup(text) == UID


@pytest.mark.parametrize(
    "text",
    ["", "garbage", "0::", "no colons here\n\n", f"x:y:/{CID[:-1]}", f"0::/docker/{CID.upper()}"],
)
def test_malformed_input_yields_none(text: str) -> None:
    assert container_id_from_cgroup(text) is None


def test_for_pid_reads_a_proc_root(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/"
           f"cri-containerd-{CID}.scope")
    )
    assert container_id_for_pid(4242, proc_root=str(tmp_path)) == CID
    assert pod_uid_for_pid(4242, proc_root=str(tmp_path)) == UID
    assert container_id_for_pid(4243, proc_root=str(tmp_path)) is None  # gone: no error

