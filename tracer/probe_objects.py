"""The compiled probe objects (tracer/objects/*.bpf.o, built from bpf/*.bpf.c): their names, their
roles and where they are. Imports no libbpf, so `kspan doctor` can say which ones are missing on
a machine where libbpf itself is."""

from __future__ import annotations

from pathlib import Path

OBJECTS_DIR = Path(__file__).resolve().parent / "objects"

BACKEND_OBJECTS = {"fentry": "sockets_fentry", "kprobes": "sockets_kprobes", "tracepoints": "sockets_tracepoints"}
COMMON_OBJECTS = ("process", "tcp_events")
# Families the uprobe attachers drive (tracer/ssl_libs.py, tracer/uprobes.py).
OPTIONAL_FAMILIES = ("openssl", "go_tls", "go_http")
# The exchange state machine for the uprobe families (bpf/uprobe_exchange.bpf.c): its one program
# is tail-called through kspan_exchange_progs[0] instead of being inlined in every uprobe program
# (the verifier walks each inlined copy at load: seconds of start-up). Never attached. Loaded
# before the families, with any of them.
UPROBE_EXCHANGE = "uprobe_exchange"
# Cross-host trace context in a TCP option (--context-propagation tcp): a sock_ops program,
# attached to a cgroup rather than by its SEC(). Loaded last, and optional: a kernel that refuses
# it leaves kspan tracing without propagation.
TCP_CONTEXT = "tcp_context"
ALL_OBJECTS = (*BACKEND_OBJECTS.values(), *COMMON_OBJECTS, UPROBE_EXCHANGE, *OPTIONAL_FAMILIES, TCP_CONTEXT)


def object_path(name: str, objects_dir: Path = OBJECTS_DIR) -> Path:
    return objects_dir / f"{name}.bpf.o"


def missing(objects_dir: Path = OBJECTS_DIR) -> list[str]:
    """The objects not built (or not shipped) in objects_dir."""
    return [n for n in ALL_OBJECTS if not object_path(n, objects_dir).is_file()]
