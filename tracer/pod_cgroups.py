"""Pod uid -> cgroup v2 ids, by a walk of the node's cgroup2 hierarchy.

The kernel filter keys on bpf_get_current_cgroup_id(): the id of the task's cgroup in the v2
hierarchy, which is the inode number of that cgroup's directory. Every container of a pod lives
below the pod's own cgroup (`.../kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`,
or `/kubepods/burstable/pod<uid>/<id>` with the cgroupfs driver), so one walk finds each pod's
directory by name and takes the ids of it and of everything below it: sub-cgroups a container
makes for itself (systemd in a container, Docker-in-Docker) are covered too.

The walk reads directory entries only (their inode numbers come with the entry): on a node with
a hundred pods it is a few hundred directories, a millisecond or two.
"""

from __future__ import annotations

import os

from tracer.cgroups import pod_uid_from_component

# How deep pods can sit: kubepods.slice/kubepods-<qos>.slice/<pod>.slice is depth 3, a kind or
# Docker-in-Docker node nests the whole tree a few levels lower.
MAX_DEPTH = 16
CANDIDATE_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")


def is_cgroup2_dir(path: str) -> bool:
    """Every directory of a cgroup v2 hierarchy has cgroup.controllers; v1 ones never do."""
    return os.path.isfile(os.path.join(path, "cgroup.controllers"))


def find_cgroup2_root(configured: str | None = None) -> str | None:
    """Where to walk: `configured` (KSPAN_CGROUP_ROOT) if it is a cgroup v2 directory, else the
    unified mount (/sys/fs/cgroup on a v2 host, /sys/fs/cgroup/unified on a hybrid one)."""
    for path in (configured,) if configured else CANDIDATE_ROOTS:
        if path and is_cgroup2_dir(path):
            return path
    return None


def pod_cgroup_ids(root: str, max_depth: int = MAX_DEPTH) -> tuple[dict[str, set[int]], int]:
    """{pod uid: cgroup ids of the pod's directory and all below it}, and the directories that
    could not be read (a cgroup removed mid-walk: the next walk sees the tree as it is then)."""
    pods: dict[str, set[int]] = {}
    unreadable = 0
    # (path, depth, the pod uid this directory belongs to or None)
    stack: list[tuple[str, int, str | None]] = [(root, 0, None)]
    while stack:
        path, depth, owner = stack.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            unreadable += 1
            continue
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                inode = entry.inode()
            except OSError:
                unreadable += 1
                continue
            uid = owner or pod_uid_from_component(entry.name)
            if uid is not None:
                pods.setdefault(uid, set()).add(inode)
            if depth + 1 < max_depth:
                stack.append((entry.path, depth + 1, uid))
    return pods, unreadable
