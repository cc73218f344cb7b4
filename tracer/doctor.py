"""`kspan doctor`: what this kernel offers to kspan, one line per check, and the backend `run` uses.

The checks are a pure function of tracer.capabilities.Capabilities (unit-tested with made-up
kernels); only run_doctor() probes the machine.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from tracer.capabilities import Capabilities, choose_backend, context_propagation_problem, probe


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: str
    hint: str = ""  # what to install or enable; empty when nothing to do
    required: bool = False  # tracing is impossible without it


def checks(caps: Capabilities) -> list[Check]:
    out: list[Check] = []
    who = "root" if caps.root else ("CAP_BPF + CAP_PERFMON" if caps.cap_bpf else "unprivileged")
    out.append(Check("root / CAP_BPF", caps.cap_bpf, who,
                     "" if caps.cap_bpf else "run as root (or grant CAP_BPF, CAP_PERFMON, CAP_SYS_RESOURCE)",
                     required=True))
    out.append(Check("BTF", caps.btf, caps.btf_path or caps.btf_detail or "missing",
                     "" if caps.btf else "the probes are CO-RE objects relocated against the kernel's BTF: use a "
                     "kernel built with CONFIG_DEBUG_INFO_BTF=y, or give this kernel's BTF file with --btf FILE "
                     "(or KSPAN_BTF=FILE; BTFHub publishes them for distribution kernels without BTF)",
                     required=True))
    out.append(Check("libbpf", bool(caps.libbpf_version),
                     f"libbpf.so.1 {caps.libbpf_version}" if caps.libbpf_version else caps.libbpf_error or "missing",
                     "" if caps.libbpf_version else "apt-get install libbpf1 (Debian 12 ships 1.1)", required=True))
    out.append(Check("probe objects", not caps.objects_missing,
                     "all built" if not caps.objects_missing else "missing " + ", ".join(caps.objects_missing),
                     "" if not caps.objects_missing
                     else "in a checkout run `make setup` (scripts/build-bpf.sh compiles bpf/*.bpf.c); an installed "
                     "kspan ships them in its wheel: reinstall it",
                     required=bool(caps.objects_missing)))
    out.append(Check("tracefs", bool(caps.tracefs), f"mounted at {caps.tracefs}" if caps.tracefs else "not mounted",
                     "" if caps.tracefs else "mount -t tracefs nodev /sys/kernel/tracing"))
    if caps.tracefs:
        out.append(Check("socket tracepoints", caps.tracepoints,
                         "sock:sock_send_length, sock:sock_recv_length, sock:inet_sock_set_state"
                         if caps.tracepoints else "missing " + ", ".join(caps.missing_tracepoints),
                         "" if caps.tracepoints else "a kernel with these tracepoints (6.2+), or kprobes"))
    if caps.kprobes:
        kp_value = "kprobe_events present"
    elif caps.kprobes_config is False:
        kp_value = f"CONFIG_KPROBES is not set ({caps.kernel_config_source})"
    elif not caps.kprobe_events:
        kp_value = "no kprobe_events in tracefs" if caps.tracefs else "unknown (tracefs not mounted)"
    else:
        kp_value = "unknown"
    out.append(Check("kprobes", caps.kprobes, kp_value,
                     "" if caps.kprobes
                     else "optional: a kernel with CONFIG_KPROBES=y; kspan uses tracepoints instead"))
    out.append(Check("fentry", caps.fentry, "works" if caps.fentry else (caps.fentry_detail or "unavailable"),
                     "" if caps.fentry
                     else "optional: the cheapest socket backend; kspan falls back to kprobes, then tracepoints"))
    out.append(Check("uprobes", caps.uprobes, "uprobe_events present" if caps.uprobes else "unavailable",
                     "" if caps.uprobes else "CONFIG_UPROBE_EVENTS=y: needed for HTTPS (OpenSSL) and Go tracing"))
    out.append(Check("ring buffer", caps.ringbuf, "works" if caps.ringbuf else (caps.ringbuf_detail or "unavailable"),
                     "" if caps.ringbuf else "Linux 5.8 or newer", required=True))
    out.append(Check("cgroup v2", bool(caps.cgroup2), f"mounted at {caps.cgroup2}" if caps.cgroup2 else "not mounted",
                     "" if caps.cgroup2 else "optional: mount -t cgroup2 none /sys/fs/cgroup/unified; the TCP-option "
                     "context propagation attaches to its root"))
    out.append(Check("sock_ops TCP options", caps.sockops_hdr_opts,
                     "a sock_ops program may write and read TCP options" if caps.sockops_hdr_opts
                     else caps.sockops_detail or "unavailable",
                     "" if caps.sockops_hdr_opts
                     else "optional: Linux 5.10+ with CONFIG_CGROUP_BPF=y, and CAP_NET_ADMIN; without it traces "
                     "end at each host"))
    lockdown = caps.lockdown or "unknown (securityfs not mounted)"
    confidential = caps.lockdown.startswith("confidentiality")
    out.append(Check("lockdown", not confidential, lockdown,
                     "confidentiality lockdown forbids reading kernel memory: boot with lockdown=integrity"
                     if confidential else "", required=confidential))
    return out


def verdict(caps: Capabilities, backend_wanted: str = "auto") -> tuple[bool, str]:
    """(tracing possible, the line about the backend)."""
    backend, reason = choose_backend(caps, backend_wanted)
    missing = [c.name for c in checks(caps) if c.required and not c.ok]
    if not backend:
        return False, f"backend: none: {reason}"
    if missing:
        return False, f"backend: {backend} would be used ({reason}), but tracing is impossible without: " + ", ".join(
            missing
        )
    return True, f"backend: {backend} ({reason})"


def propagation_line(caps: Capabilities) -> str:
    problem = context_propagation_problem(caps)
    if problem:
        return f"context propagation: none ({problem}): spans on other hosts start their own traces"
    return f"context propagation: tcp (a TCP option of kind 25, sock_ops on the cgroup v2 root {caps.cgroup2})"


def render(caps: Capabilities, backend_wanted: str = "auto") -> tuple[str, int]:
    lines = [f"kspan doctor: Linux {caps.kernel}"]
    width = max(len(c.name) for c in checks(caps))
    for c in checks(caps):
        line = f"  {'ok' if c.ok else 'NO':<2}  {c.name:<{width}}  {c.value}"
        if c.hint:
            line += f"  -> {c.hint}"
        lines.append(line)
    lines.append(propagation_line(caps))
    possible, backend_line = verdict(caps, backend_wanted)
    lines.append(backend_line)
    return "\n".join(lines) + "\n", 0 if possible else 1


def run_doctor(out: TextIO | None = None, backend: str = "auto", btf: str | None = None) -> int:
    text, code = render(probe(btf=btf), backend)
    (out or sys.stdout).write(text)
    return code
