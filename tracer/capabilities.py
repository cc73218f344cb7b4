"""What this kernel offers to kspan: probed cheaply at start-up and by `kspan doctor`.

Each check reads a file or makes one tiny, real attempt: configuration files can lie (a kprobe
program loads where kprobes cannot attach; fentry is configured but refused), so where it matters
the answer comes from the kernel itself.
"""

from __future__ import annotations

import errno
import gzip
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from tracer import probe_objects

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

# Tracepoints the tracepoints backend attaches to.
REQUIRED_TRACEPOINTS = (
    "syscalls/sys_enter_write",
    "syscalls/sys_enter_read",
    "sock/sock_send_length",
    "sock/sock_recv_length",
    "sock/inet_sock_set_state",
)


@dataclass
class Capabilities:
    kernel: str = ""
    root: bool = False
    cap_bpf: bool = False  # CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN
    btf: bool = False
    tracefs: str = ""  # mount point, "" when not mounted
    tracepoints: bool = False  # the socket tracepoints the tracepoints backend needs
    missing_tracepoints: list[str] = field(default_factory=list)
    kprobes_config: bool | None = None  # CONFIG_KPROBES, None when the config is unreadable
    kprobe_events: bool = False  # <tracefs>/kprobe_events exists
    kprobes: bool = False
    fentry: bool = False
    fentry_detail: str = ""
    uprobes: bool = False
    ringbuf: bool = False
    ringbuf_detail: str = ""
    lockdown: str = ""  # none / integrity / confidentiality, "" when unknown
    btf_path: str = ""  # the BTF CO-RE relocates against: the kernel's, or --btf / KSPAN_BTF
    btf_detail: str = ""
    libbpf_version: str = ""  # libbpf.so.1, the loader's only native dependency
    libbpf_error: str = ""
    objects_missing: list[str] = field(default_factory=list)  # tracer/objects/*.bpf.o not built
    kernel_config_source: str = ""
    cgroup2: str = ""  # where the cgroup v2 hierarchy is mounted, "" when it is not
    cgroup_bpf: bool | None = None  # CONFIG_CGROUP_BPF, None when the config is unreadable
    sockops_hdr_opts: bool = False  # a sock_ops program using bpf_reserve_hdr_opt loads
    sockops_detail: str = ""
    notes: list[str] = field(default_factory=list)


def _kernel_version_tuple(release: str) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    return tuple(int(x) for x in m.groups() if x is not None) if m else (0,)


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _tracefs() -> str:
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    mounted = {line.split()[1] for line in mounts if len(line.split()) > 2 and line.split()[2] == "tracefs"}
    for cand in TRACEFS_CANDIDATES:
        if str(cand) in mounted or (cand / "events").is_dir():
            return str(cand)
    return ""


def kernel_config(release: str) -> tuple[dict[str, str], str]:
    """The running kernel's build configuration and where it came from."""
    sources = [Path("/proc/config.gz"), Path(f"/boot/config-{release}")]
    for src in sources:
        try:
            raw = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
        except (OSError, EOFError, gzip.BadGzipFile):
            continue
        conf: dict[str, str] = {}
        for line in raw.decode(errors="replace").splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
                conf[k] = v
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                conf[line[2:].split()[0]] = "n"
        return conf, str(src)
    return {}, ""


def _lockdown(conf: dict[str, str]) -> str:
    """Lockdown mode; from securityfs when mounted, else what the kernel config forces."""
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
        m = re.search(r"\[(\w+)\]", text)
        return m.group(1) if m else text.strip()
    except OSError:
        pass
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        cmdline = ""
    m = re.search(r"\blockdown=(\w+)", cmdline)
    if m:
        return f"{m.group(1)} (kernel command line)"
    for mode in ("confidentiality", "integrity", "none"):
        if conf.get(f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{mode.upper()}") == "y":
            return f"{mode} (forced by the kernel config)"
    return ""


def _libbpf() -> tuple[str, str]:
    """libbpf's version, or why it cannot be used (the loader is ctypes over libbpf.so.1)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libbpf.so.1")
        major, minor = lib.libbpf_major_version(), lib.libbpf_minor_version()
    except (OSError, AttributeError) as exc:
        return "", f"{type(exc).__name__}: {exc}"
    return f"{major}.{minor}", ""


def cgroup2_mount(mounts_text: str | None = None) -> str:
    """The cgroup v2 mount point (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
    hybrid ones), "" when none is mounted. The first one listed: a container may see others."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    for line in mounts_text.splitlines():
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1].replace("\\040", " ")
    return ""


BPF_PROG_TYPE_SOCK_OPS = 13
BPF_FUNC_RESERVE_HDR_OPT = 144
# r2 = 0; r3 = 0; call bpf_reserve_hdr_opt; r0 = 1; exit: the verifier refuses an unknown helper,
# so this loads only where sock_ops programs may write TCP header options (Linux 5.10+).
_SOCKOPS_HDR_OPT_INSNS = (0x00000000000002B7, 0x00000000000003B7, (BPF_FUNC_RESERVE_HDR_OPT << 32) | 0x85,
                          0x00000001000000B7, 0x0000000000000095)


def _bpf_prog_load_attempt(prog_type: int, expected_attach_type: int = 0,
                           program: tuple[int, ...] = (0x00000000000000B7, 0x0000000000000095)) -> int:
    """Load a tiny program of `prog_type` (by default r0 = 0; exit); 0 or the errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    insns = (ctypes.c_uint64 * len(program))(*program)
    license_ = ctypes.create_string_buffer(b"GPL")

    class Attr(ctypes.Structure):
        _fields_ = [
            ("prog_type", ctypes.c_uint32),
            ("insn_cnt", ctypes.c_uint32),
            ("insns", ctypes.c_uint64),
            ("license", ctypes.c_uint64),
            ("log_level", ctypes.c_uint32),
            ("log_size", ctypes.c_uint32),
            ("log_buf", ctypes.c_uint64),
            ("kern_version", ctypes.c_uint32),
            ("prog_flags", ctypes.c_uint32),
            ("prog_name", ctypes.c_char * 16),
            ("prog_ifindex", ctypes.c_uint32),
            ("expected_attach_type", ctypes.c_uint32),
            ("_rest", ctypes.c_uint8 * 64),
        ]

    attr = Attr()
    attr.prog_type = prog_type
    attr.insn_cnt = len(program)
    attr.insns = ctypes.addressof(insns)
    attr.license = ctypes.addressof(license_)
    attr.expected_attach_type = expected_attach_type
    sys_bpf = 321 if platform.machine() == "x86_64" else 280  # __NR_bpf (x86_64, arm64)
    fd = libc.syscall(sys_bpf, 5, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_PROG_LOAD
    if fd < 0:
        return ctypes.get_errno() or errno.EINVAL
    os.close(fd)
    return 0


def _ringbuf_attempt() -> int:
    """Create a BPF_MAP_TYPE_RINGBUF (27) of one page; 0 or the errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    class Attr(ctypes.Structure):
        _fields_ = [
            ("map_type", ctypes.c_uint32),
            ("key_size", ctypes.c_uint32),
            ("value_size", ctypes.c_uint32),
            ("max_entries", ctypes.c_uint32),
            ("_rest", ctypes.c_uint8 * 64),
        ]

    attr = Attr(27, 0, 0, 4096)
    sys_bpf = 321 if platform.machine() == "x86_64" else 280
    fd = libc.syscall(sys_bpf, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_MAP_CREATE
    if fd < 0:
        return ctypes.get_errno() or errno.EINVAL
    os.close(fd)
    return 0


BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24


def _fentry_attempt() -> tuple[bool, str]:
    """Load a two-instruction fentry program on tcp_sendmsg and attach it (then detach).

    A kernel can have the symbol, the BTF and the configuration for fentry and still
    refuse (EPERM here), so try for real."""
    import ctypes

    from tracer.btf import BtfError, func_id

    try:
        btf_id = func_id("tcp_sendmsg")
    except BtfError as exc:
        return False, str(exc)
    libc = ctypes.CDLL(None, use_errno=True)
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint8 * 144)()
    view = memoryview(attr).cast("B")

    def put(off: int, fmt: str, value: int) -> None:
        import struct as _s

        _s.pack_into(fmt, view, off, value)

    put(0, "<I", BPF_PROG_TYPE_TRACING)
    put(4, "<I", 2)
    put(8, "<Q", ctypes.addressof(insns))
    put(16, "<Q", ctypes.addressof(license_))
    put(68, "<I", BPF_TRACE_FENTRY)  # expected_attach_type
    put(108, "<I", btf_id)           # attach_btf_id
    sys_bpf = 321 if platform.machine() == "x86_64" else 280
    fd = libc.syscall(sys_bpf, 5, attr, 144)  # BPF_PROG_LOAD
    if fd < 0:
        err = ctypes.get_errno()
        return False, f"loading a test fentry program failed: {os.strerror(err)}"
    try:
        open_attr = (ctypes.c_uint8 * 16)()
        struct_view = memoryview(open_attr).cast("B")
        import struct as _s

        _s.pack_into("<QI", struct_view, 0, 0, fd)  # raw_tracepoint.name = NULL, prog_fd
        link = libc.syscall(sys_bpf, 17, open_attr, 16)  # BPF_RAW_TRACEPOINT_OPEN
        if link < 0:
            err = ctypes.get_errno()
            return False, f"attaching a test fentry program failed: {os.strerror(err)}"
        os.close(link)
    finally:
        os.close(fd)
    return True, ""


def btf_source(explicit: str | None = None, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(path, problem): the BTF to relocate against. --btf wins over KSPAN_BTF, which wins over the
    kernel's own /sys/kernel/btf/vmlinux."""
    env = os.environ if env is None else env
    chosen = explicit or env.get("KSPAN_BTF", "")
    if chosen:
        if not Path(chosen).is_file():
            return "", f"{chosen} (from {'--btf' if explicit else 'KSPAN_BTF'}) does not exist"
        return chosen, ""
    if Path("/sys/kernel/btf/vmlinux").is_file():
        return "/sys/kernel/btf/vmlinux", ""
    return "", "no /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)"


def probe(try_loads: bool = True, btf: str | None = None) -> Capabilities:
    """Probe the kernel. `try_loads` makes the real (tiny) load attempts; they need root."""
    caps = Capabilities()
    release = platform.release()
    caps.kernel = release
    caps.root = os.geteuid() == 0
    eff = _effective_caps()
    caps.cap_bpf = bool(eff & (1 << CAP_SYS_ADMIN)) or (bool(eff & (1 << CAP_BPF)) and bool(eff & (1 << CAP_PERFMON)))
    caps.btf_path, caps.btf_detail = btf_source(btf)
    caps.btf = bool(caps.btf_path)
    caps.tracefs = _tracefs()
    if caps.tracefs:
        events = Path(caps.tracefs) / "events"
        caps.missing_tracepoints = [tp for tp in REQUIRED_TRACEPOINTS if not (events / tp).is_dir()]
        caps.tracepoints = not caps.missing_tracepoints
        caps.kprobe_events = (Path(caps.tracefs) / "kprobe_events").exists()
        caps.uprobes = (Path(caps.tracefs) / "uprobe_events").exists()
    conf, caps.kernel_config_source = kernel_config(release)
    if conf:
        caps.kprobes_config = conf.get("CONFIG_KPROBES") == "y"
        if not caps.tracefs:
            caps.uprobes = conf.get("CONFIG_UPROBE_EVENTS") == "y"
    caps.kprobes = bool(caps.kprobe_events) and caps.kprobes_config is not False
    caps.lockdown = _lockdown(conf)
    caps.libbpf_version, caps.libbpf_error = _libbpf()
    caps.objects_missing = probe_objects.missing()
    if _kernel_version_tuple(release) < (5, 8):
        caps.ringbuf, caps.ringbuf_detail = False, "kernel older than 5.8"
    elif try_loads and caps.cap_bpf:
        err = _ringbuf_attempt()
        caps.ringbuf = err == 0
        caps.ringbuf_detail = "" if err == 0 else f"map create failed: {os.strerror(err)}"
    else:
        caps.ringbuf_detail = "not tried (needs root)"
    caps.cgroup2 = cgroup2_mount()
    if conf:
        caps.cgroup_bpf = conf.get("CONFIG_CGROUP_BPF") == "y"
    if try_loads and caps.cap_bpf:
        err = _bpf_prog_load_attempt(BPF_PROG_TYPE_SOCK_OPS, program=_SOCKOPS_HDR_OPT_INSNS)
        caps.sockops_hdr_opts = err == 0
        why = {errno.EPERM: " (sock_ops programs need CAP_NET_ADMIN)",
               errno.EINVAL: " (bpf_reserve_hdr_opt is unknown to this kernel: Linux 5.10+ has it)"}.get(err, "")
        caps.sockops_detail = "" if err == 0 else (
            f"loading a sock_ops program that writes TCP options failed: {os.strerror(err)}{why}")
    else:
        caps.sockops_detail = "not tried (needs root)"
    if try_loads and caps.cap_bpf and Path("/sys/kernel/btf/vmlinux").is_file():
        caps.fentry, caps.fentry_detail = _fentry_attempt()
    elif not caps.btf:
        caps.fentry_detail = "needs kernel BTF"
    else:
        caps.fentry_detail = "not tried (needs root)"
    return caps


BACKENDS = ("fentry", "kprobes", "tracepoints")


def choose_backend(caps: Capabilities, wanted: str = "auto") -> tuple[str, str]:
    """The socket backend to use and why; ("", reason) when none can work.

    fentry is preferred (cheapest: a trampoline, arguments typed by BTF), then kprobes (they see
    every TCP transfer whatever the syscall), then the stable tracepoints. All three read kernel
    structs through CO-RE only, so none depends on headers."""
    if wanted not in ("auto", *BACKENDS):
        return "", f"unknown backend {wanted!r}: use auto, fentry, kprobes or tracepoints"
    available = {"fentry": caps.fentry, "kprobes": caps.kprobes, "tracepoints": caps.tracepoints}
    if wanted != "auto":
        if available[wanted]:
            return wanted, f"requested with --backend {wanted}"
        why = {
            "fentry": f"fentry is not usable here ({caps.fentry_detail or 'unavailable'})",
            "kprobes": "kprobes are not available (CONFIG_KPROBES unset or kprobe_events missing)",
            "tracepoints": _tracepoint_problem(caps),
        }[wanted]
        return "", f"--backend {wanted}: {why}; use --backend auto"
    if caps.fentry:
        return "fentry", "fentry programs load and attach on this kernel"
    if caps.kprobes:
        return "kprobes", f"kprobes available; fentry is not ({caps.fentry_detail or 'unavailable'})"
    if caps.tracepoints:
        return "tracepoints", (
            f"no kprobes on this kernel (CONFIG_KPROBES unset or kprobe_events missing) and fentry is not usable "
            f"({caps.fentry_detail or 'unavailable'})"
        )
    return "", _tracepoint_problem(caps)


def _tracepoint_problem(caps: Capabilities) -> str:
    if not caps.tracefs:
        return "tracefs is not mounted: mount -t tracefs nodev /sys/kernel/tracing"
    if caps.missing_tracepoints:
        return "tracepoints missing on this kernel: " + ", ".join(caps.missing_tracepoints)
    return "no socket backend available"


def context_propagation_problem(caps: Capabilities) -> str:
    """Why trace context cannot travel in a TCP option here ("" when it can): the sock_ops program
    needs a cgroup v2 hierarchy to attach to and a kernel that lets it write header options."""
    if not caps.cgroup2:
        return "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)"
    if caps.cgroup_bpf is False:
        return f"the kernel is built without CONFIG_CGROUP_BPF ({caps.kernel_config_source})"
    if not caps.sockops_hdr_opts:
        return caps.sockops_detail or "sock_ops programs cannot write TCP options"
    return ""
