"""Load, attach and read the kernel side: the precompiled CO-RE objects of every probe family.

Each probe family is one object under tracer/objects/ (compiled from bpf/*.bpf.c at build
time). Every object declares the shared maps of bpf/http_exchange.h; the first object loaded
creates them and each later one reuses their descriptors, so all families share one
connection table and one ring buffer. Settings are the objects' `const volatile` globals and map
sizes, set before load: no compiler runs here. Only tracer/loader.py touches libbpf.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tracer import sweeper
from tracer.capabilities import Capabilities, cgroup2_mount, choose_backend, context_propagation_problem
from tracer.loader import BpfObject, LoaderError, Map
from tracer.probe_objects import (
    BACKEND_OBJECTS,
    COMMON_OBJECTS,
    OBJECTS_DIR,
    OPTIONAL_FAMILIES,
    TCP_CONTEXT,
    UPROBE_EXCHANGE,
    object_path,
)
from tracer.processes import service_name_from_cmdline
from tracer.records import REC_PROC, RawProc, record_type
from tracer.ringbuf import RingBufferReader

log = logging.getLogger(__name__)

# The program array the uprobes tail-call the state machine through (bpf/http_exchange.h).
EXCHANGE_PROGS = "kspan_exchange_progs"

# enum kspan_counter in bpf/http_exchange.h, same order.
COUNTER_NAMES = [
    "records_emitted",
    "ringbuf_lost",  # records the ring buffer had no room for
    "requests_seen",
    "non_http_segments",
    "unparsed_bytes",
    "state_table_full",
    "ended_by_next_request",
    "response_head_too_long",
    "transfers_outside_syscall",
    "tls_transfers_skipped",
    "requests_filtered",
    "proc_records",
    "tcp_records",
    "self_transfers_skipped",
    "tuple_unknown",
    "orphan_responses",
    "ended_by_close",
    "exchange_tail_call_missed",  # uprobe transfers lost: the state machine's program was not in place
    "ambiguous_parent_requests",  # client requests on a thread serving several at once: no parent, by rule
    "unsampled_exchanges",  # dropped by head sampling in the kernel: a metrics-only record each
    "parent_lost",  # client requests whose named parent was gone (evicted): no link
    "cgroup_skipped",  # TCP transfers and events of pods workload selection excludes
    "context_options_written",  # segments that carried the trace-context TCP option
    "context_options_no_room",  # requests whose context found no room in the TCP option space
    "context_options_parsed",  # contexts read from a peer's TCP option
    "context_options_malformed",  # kind-25 options that are not kspan's
    "segments",  # transfers of other protocols (Redis, PostgreSQL, MySQL, HTTP/2) sent as segment records
    "h2_unsynced",  # HTTP/2 directions whose kernel frame walk lost the frame boundaries
]

PROC_EXEC = 1

# Programs attached to several hooks (one inlined copy of the exchange state machine for both
# directions); every other socket-side program is attached by its SEC() name.
MULTI_ATTACH: dict[str, tuple[tuple[str, ...], ...]] = {
    "kspan_sock_length": (("tp", "sock", "sock_send_length"), ("tp", "sock", "sock_recv_length")),
    "kspan_tcp_xfer_ret": (("kretprobe", "tcp_sendmsg"), ("kretprobe", "tcp_recvmsg")),
    "kspan_ws_enter": tuple(("tp", "syscalls", f"sys_enter_{n}")
                            for n in ("write", "sendto", "writev", "sendmsg", "sendfile64")),
}

# Tracepoints backend: programs of the portable path (arguments saved at syscall entry) and of the
# x86_64 register path (write start times only). One of the two sets is loaded.
PORTABLE_PREFIXES = ("kspan_sys_enter_", "kspan_sys_exit_")
REGS_PREFIXES = ("kspan_ws_",)
# tcp_events programs that only feed network metrics (RTT samples come from the state machine).
NETWORK_EVENT_PROGRAMS = ("kspan_tcp_retransmit", "kspan_tcp_receive_reset", "kspan_tcp_send_reset")

# Maps sized by --max-connections (per-connection state, LRU).
CONNECTION_MAPS = ("conns", "tuples", "fd_sk", "tls_conns", "client_conns", "ctx_out", "ctx_in")

# The sock_ops program of the tcp_context object (bpf/tcp_context.bpf.c), attached to a cgroup.
CONTEXT_PROGRAM = "kspan_tcp_context"
CONTEXT_PROPAGATION = ("tcp", "none")

# Connection states examined per sweep() call.
SWEEP_BATCH = 2048
# Records taken from the ring buffer per poll(): what Python holds at once stays bounded (the rest
# waits in the kernel's ring, and what does not fit there is counted as ringbuf_lost), so a burst
# the agent cannot follow raises loss counters, not the agent's resident memory.
POLL_BATCH = 1024


class CaptureError(Exception):
    """Capture could not start; the message says what to do."""


@dataclass
class CaptureConfig:
    backend: str = "auto"  # "auto" | "fentry" | "kprobes" | "tracepoints"
    pids: set[int] = field(default_factory=set)
    exe_names: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    self_pid: int = field(default_factory=os.getpid)
    ringbuf_pages: int = 4096
    max_connections: int = 16384
    response_timeout_s: float = 30.0
    families: list[str] = field(default_factory=list)  # of OPTIONAL_FAMILIES
    network_events: bool = True
    btf_path: str | None = None  # external BTF (BTFHub) for kernels without /sys/kernel/btf/vmlinux
    portable_args: bool = False  # tracepoints: the non-x86_64 syscall-argument path, even on x86_64
    # Kubernetes workload selection (tracer/workloads.py): the kernel skips processes by cgroup v2
    # id, per map cgroup_verdict; a cgroup with no verdict is traced iff cgroup_default_trace.
    cgroup_filter: bool = False
    cgroup_default_trace: bool = True
    objects_dir: Path = OBJECTS_DIR
    # Head sampling, decided in the kernel at each trace's root (correlator/sampling.py codes):
    # kept iff (trace id bytes 8..15 as a big-endian u64) >> 1 < sample_threshold.
    sampler: int = 0
    sample_threshold: int = 1 << 63
    # Cross-host trace context: "tcp" (a TCP header option written and read by a sock_ops
    # program) or "none". context_cgroup: the cgroup v2 directory it covers (None: the root,
    # i.e. every socket on the host).
    context_propagation: str = "tcp"
    context_cgroup: str | None = None


def object_names(backend: str, families: list[str], context: bool = False) -> list[str]:
    """The objects of one capture, in load order."""
    unknown = [f for f in families if f not in OPTIONAL_FAMILIES]
    if unknown:
        raise CaptureError(f"unknown probe families {unknown}: choose from {list(OPTIONAL_FAMILIES)}")
    chosen = [f for f in OPTIONAL_FAMILIES if f in families]
    return [BACKEND_OBJECTS[backend], *COMMON_OBJECTS, *([UPROBE_EXCHANGE] if chosen else []), *chosen,
            *([TCP_CONTEXT] if context else [])]


def _uses_regs(config: CaptureConfig) -> bool:
    return platform.machine() == "x86_64" and not config.portable_args


def _globals(config: CaptureConfig) -> dict[str, int]:
    return {
        "kspan_self_pid": int(config.self_pid),
        "kspan_filter_pids": int(bool(config.pids or config.exe_names)),
        "kspan_filter_exe": int(bool(config.exe_names)),
        "kspan_filter_ports": int(bool(config.ports)),
        "kspan_network_events": int(config.network_events),
        "kspan_args_from_regs": int(_uses_regs(config)),
        "kspan_sampler": int(config.sampler),
        "kspan_sample_threshold": int(config.sample_threshold),
        "kspan_filter_cgroups": int(config.cgroup_filter),
        "kspan_cgroup_default_trace": int(config.cgroup_default_trace),
    }


def _wanted(prog: str, config: CaptureConfig) -> bool:
    """Whether a program is loaded at all under this configuration."""
    if prog.startswith(PORTABLE_PREFIXES):
        return not _uses_regs(config)
    if prog.startswith(REGS_PREFIXES):
        return _uses_regs(config)
    if prog in NETWORK_EVENT_PROGRAMS:
        return config.network_events
    return True


class ObjectSet:
    """The loaded objects of one capture, sharing their maps."""

    def __init__(self, config: CaptureConfig, backend: str, stats: bool = False) -> None:
        if config.context_propagation not in CONTEXT_PROPAGATION:
            raise CaptureError(f"context propagation {config.context_propagation!r}: choose from "
                               f"{list(CONTEXT_PROPAGATION)}")
        pages = config.ringbuf_pages
        if pages <= 0 or pages & (pages - 1):
            raise CaptureError(f"ring buffer pages must be a power of two, got {pages}")
        if config.max_connections <= 0:
            raise CaptureError(f"--max-connections must be positive, got {config.max_connections}")
        self.objects: dict[str, BpfObject] = {}
        self._maps_by_name: dict[str, Map] = {}
        self.loaded_programs: list[str] = []
        self.verifier_stats: dict[str, int] = {}
        # Why the optional tcp_context object is not loaded ("" when it is, or was not wanted).
        self.context_problem = ""
        fds: dict[str, int] = {}
        values = _globals(config)
        try:
            for name in object_names(backend, config.families, context=config.context_propagation == "tcp"):
                path = object_path(name, config.objects_dir)
                if name == TCP_CONTEXT and not path.is_file():
                    self.context_problem = f"probe object {path} is missing (scripts/build-bpf.sh builds it)"
                    continue
                if not path.is_file():
                    raise CaptureError(f"probe object {path} is missing: in a checkout run `make setup` "
                                       "(scripts/build-bpf.sh); an installed kspan ships it: reinstall it")
                try:
                    obj = BpfObject.open(path, btf_path=config.btf_path)
                except LoaderError as exc:
                    if name != TCP_CONTEXT:
                        raise
                    self.context_problem = str(exc)
                    continue
                self.objects[name] = obj
                if config.sampler and not obj.has_global("kspan_sampler") and name == BACKEND_OBJECTS[backend]:
                    # Without it every trace would be kept while the user asked for sampling.
                    raise CaptureError(f"probe object {path} predates head sampling (no kspan_sampler): "
                                       "rebuild the objects (`make setup`) or drop --sampler/OTEL_TRACES_SAMPLER")
                for var, value in values.items():
                    if obj.has_global(var):
                        obj.set_global(var, value)
                for m in obj.maps():
                    if m in fds:
                        continue
                    if m in CONNECTION_MAPS:
                        obj.set_max_entries(m, config.max_connections)
                    elif m == "events":
                        obj.set_max_entries(m, pages * 4096)
                obj.reuse_maps(fds)
                for prog in obj.programs():
                    if not _wanted(prog, config):
                        obj.set_autoload(prog, False)
                try:
                    obj.load(stats=stats) if stats else obj.load()
                except LoaderError as exc:
                    if name == TCP_CONTEXT:
                        # Propagation is an addition to tracing, not a condition of it.
                        del self.objects[name]
                        obj.close()
                        self.context_problem = f"the kernel refused the sock_ops program: {exc}"
                        continue
                    raise CaptureError(f"the kernel refused the {name} probes: {exc}") from exc
                self.loaded_programs += [p for p in obj.programs() if _wanted(p, config)]
                if stats:
                    self.verifier_stats.update(obj.verifier_stats())
                for m, fd in obj.map_fds().items():
                    fds.setdefault(m, fd)
                if name == UPROBE_EXCHANGE:
                    self._install_exchange(obj)
        except BaseException:
            self.close()
            raise

    def _install_exchange(self, obj: BpfObject) -> None:
        """Put kspan_exchange_kp into the program array the uprobe programs tail-call, before they
        load (the array's first program fixes the type of every program that may use it: kprobe,
        which the uprobes share). A refusal fails the capture: without the entry every uprobe
        transfer would only count exchange_tail_call_missed."""
        try:
            progs = obj.map(EXCHANGE_PROGS)
            progs.update(struct.pack("<I", 0), struct.pack("<I", obj.program_fd("kspan_exchange_kp")))
        except (LoaderError, KeyError) as exc:
            raise CaptureError(f"the kernel refused the {UPROBE_EXCHANGE} program array entry: {exc}") from exc

    def find_program(self, prog: str) -> BpfObject | None:
        for obj in self.objects.values():
            if prog in obj.programs():
                return obj
        return None

    def map(self, name: str) -> Map:
        # Memoised: a map's owner never changes after load, and walking every object's maps
        # through libbpf on each call cost the agent ~0.3 ms per exec record (is_traced).
        cache = self._maps_by_name
        found = cache.get(name)
        if found is not None:
            return found
        for obj in self.objects.values():
            if name in obj.maps():
                found = cache[name] = obj.map(name)
                return found
        raise KeyError(name)

    def has_map(self, name: str) -> bool:
        if name in self._maps_by_name:
            return True
        return any(name in obj.maps() for obj in self.objects.values())

    def struct_layout(self, type_name: str) -> dict[str, tuple[int, int]]:
        for obj in self.objects.values():
            try:
                return obj.struct_layout(type_name)
            except (KeyError, LoaderError):
                continue
        raise KeyError(type_name)

    def struct_size(self, type_name: str) -> int:
        for obj in self.objects.values():
            try:
                return obj.struct_size(type_name)
            except (KeyError, LoaderError):
                continue
        raise KeyError(type_name)

    def close(self) -> None:
        for obj in reversed(list(self.objects.values())):
            obj.close()
        self.objects.clear()


def verify_programs(backend: str, config: CaptureConfig | None = None, portable: bool = False) -> list[str]:
    """Load every program of `backend` (and of every other family) through the verifier without
    attaching anything. Kprobe programs load where kprobes cannot attach. Returns the programs
    loaded; raises CaptureError naming the object the kernel refused."""
    config = replace(config or CaptureConfig(), families=list(OPTIONAL_FAMILIES), portable_args=portable)
    objs = ObjectSet(config, backend)
    try:
        return list(objs.loaded_programs)
    finally:
        objs.close()


def verifier_insns(backend: str, prog: str, config: CaptureConfig | None = None) -> int:
    """Instructions the verifier walked to accept `prog` (its limit is 1,000,000): the headroom
    left for changes to the state machine."""
    config = config or CaptureConfig()
    objs = ObjectSet(config, backend, stats=True)
    try:
        if prog not in objs.verifier_stats:
            raise CaptureError(f"no verifier statistics for {prog} ({sorted(objs.verifier_stats)})")
        return objs.verifier_stats[prog]
    finally:
        objs.close()


def _exe_matches(pid: int, names: set[str]) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = ""
    if exe in names or exe.removesuffix(" (deleted)") in names:
        return True
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    if comm in names or any(n[:15] == comm for n in names):
        return True
    # An interpreter's process is named for the script it runs (`python3 orders.py` is `orders`),
    # as its spans' service.name is, so --exe orders means that process too.
    try:
        argv = [a.decode("utf-8", "replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return False
    return service_name_from_cmdline(exe, argv) in names


def _endpoint_key(address: str, port: int) -> bytes:
    """struct kspan_endpoint: the address in IPv6 form (IPv4 as ::ffff:a.b.c.d), the port."""
    if ":" in address:
        raw = socket.inet_pton(socket.AF_INET6, address)
    else:
        raw = b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, address)
    return raw + struct.pack("<HH", port, 0)


def _local_addresses(address: str) -> list[str]:
    """The addresses a listener bound to `address` answers on: itself, or for a wildcard every
    address of this host (/proc/net/fib_trie's local IPv4 addresses, /proc/net/if_inet6)."""
    address = address.strip("[]")
    if address not in ("", "0.0.0.0", "::"):
        return [address]
    found = {"127.0.0.1", "::1"}
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line:
                found.add(prev.split()[-1])
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            h = line.split()[0]
            found.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(h)))
    except (OSError, ValueError, IndexError):
        pass
    return sorted(found)


def _descendants_of(pids: set[int]) -> set[int]:
    """Processes whose parent chain reaches one of `pids` (children forked before the agent)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out: set[int] = set()
    for pid in parent:
        seen, p = 0, pid
        while p and seen < 64:
            if p in pids:
                out.add(pid)
                break
            p = parent.get(p, 0)
            seen += 1
    return out


_ONE = b"\x01"
_ZERO = b"\x00"
RAW_PROC_SIZE = ctypes.sizeof(RawProc)


class Capture:
    """One running capture: the loaded objects, their attachments and the ring buffer reader.

    Also the probe set the uprobe attachers (tracer/ssl_libs.py, tracer/uprobes.py) attach through
    (tracer/probeset.py): uprobes belong to the objects, and go with them at close()."""

    def __init__(self, config: CaptureConfig, caps: Capabilities) -> None:
        self.config = config
        self.caps = caps
        self.backend = ""
        self.backend_reason = ""
        self.probes_attached = 0
        self._objs: ObjectSet | None = None
        self._reader: RingBufferReader | None = None
        self._closed = False
        self._sweep_evicted = 0
        self._sweep_cursor: bytes | None = None
        self._exe_added = 0
        self._verdicts_refused = 0
        self._conn_layout: sweeper.ConnLayout | None = None
        # "tcp" once the sock_ops program is attached; context_note says where, or why not.
        self.context_propagation = "none"
        self.context_note = ""
        # kspan_exchange_ref.inflight, kspan_inflight.count and .ambiguous, from the objects' BTF
        self._hint_offsets = (0, 0, 0)
        # Workload selection's user-space side (tracer/kubernetes.py): whether a pid's pod is
        # traced, so the attachers never inspect a binary the kernel would ignore anyway.
        self.trace_gate: Callable[[int], bool] | None = None
        # cgroup verdicts are written from the Kubernetes watch thread: the lock orders them
        # against close(), so none lands on a descriptor number the process reused.
        self._verdict_lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self._objs is not None

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        backend, reason = choose_backend(self.caps, self.config.backend)
        if not backend:
            raise CaptureError(reason)
        self.backend, self.backend_reason = backend, reason
        problem = context_propagation_problem(self.caps) if self.config.context_propagation == "tcp" else ""
        self._objs = ObjectSet(replace(self.config, context_propagation="none") if problem else self.config, backend)
        try:
            self._attach_sockets()
            self._attach_context(problem or self._objs.context_problem)
            self._fill_filters()
            self._reader = RingBufferReader(self._objs.map("events").fd, self.config.ringbuf_pages * 4096)
            layout = self._objs.struct_layout("kspan_conn")
            self._conn_layout = sweeper.ConnLayout(layout["last_ns"][0], layout["phase"][0],
                                                   self._objs.struct_size("kspan_conn"))
            ref, inflight = self._objs.struct_layout("kspan_exchange_ref"), self._objs.struct_layout("kspan_inflight")
            self._hint_offsets = (ref["inflight"][0], inflight["count"][0], inflight["ambiguous"][0])
        except (LoaderError, OSError, KeyError) as exc:
            self.close()
            raise CaptureError(f"attaching the {backend} probes failed: {exc}. Run `kspan doctor`.") from exc

    def _attach_sockets(self) -> None:
        assert self._objs is not None
        for name, obj in self._objs.objects.items():
            if name in OPTIONAL_FAMILIES:
                continue  # uprobes: attached per library or binary by the attachers
            if name == UPROBE_EXCHANGE:
                continue  # only tail-called by the uprobes, never attached
            if name == TCP_CONTEXT:
                continue  # attached to a cgroup by _attach_context
            for prog in obj.programs():
                if not _wanted(prog, self.config):
                    continue
                targets = MULTI_ATTACH.get(prog)
                if targets is None:
                    obj.attach(prog)
                    self.probes_attached += 1
                    continue
                for target in targets:
                    if target[0] == "tp":
                        obj.attach_tracepoint(prog, target[1], target[2])
                    else:
                        obj.attach_kprobe(prog, target[1], retprobe=target[0] == "kretprobe")
                    self.probes_attached += 1

    def _attach_context(self, problem: str) -> None:
        """Attach the sock_ops program to the cgroup v2 root (or --context-cgroup) through a
        bpf_link. Any reason it cannot be is logged once, and tracing goes on without it."""
        assert self._objs is not None
        if self.config.context_propagation != "tcp":
            self.context_note = "off (--context-propagation none)"
            return
        obj = self._objs.objects.get(TCP_CONTEXT)
        cgroup = self.config.context_cgroup or self.caps.cgroup2 or cgroup2_mount()
        if not problem and obj is not None:
            try:
                obj.attach_cgroup(CONTEXT_PROGRAM, cgroup)
            except LoaderError as exc:
                problem = str(exc)
            else:
                self.probes_attached += 1
                self.context_propagation = "tcp"
                self.context_note = f"TCP option kind 25, sock_ops on cgroup {cgroup}"
                log.info("kspan: cross-host trace context: %s", self.context_note)
                return
        if obj is not None:
            del self._objs.objects[TCP_CONTEXT]
            obj.close()
        problem = problem or "the sock_ops program did not load"
        first, _, rest = problem.partition("\n")  # a refused load carries the verifier's log
        self.context_note = f"off: {first}"
        log.warning("kspan: cross-host trace context propagation is off, traces end at this host: %s", first)
        if rest:
            log.debug("%s", rest)

    def add_self_endpoint(self, address: str, port: int) -> None:
        """A port the agent itself listens on (the Prometheus scrape endpoint): connections to it
        are the agent's own, never traced, from their first request. The kernel learns the
        agent's sending endpoints from its writes, but a listener's first reply comes after the
        scraper's first request, which would otherwise be traced."""
        assert self._objs is not None
        table = self._objs.map("self_endpoints")
        for addr in _local_addresses(address):
            table.update(_endpoint_key(addr, port), _ONE)

    def _fill_filters(self) -> None:
        assert self._objs is not None
        if self.config.ports:
            ports = self._objs.map("allowed_ports")
            for port in self.config.ports:
                ports.update(struct.pack("<H", port), _ONE)
        if self.config.exe_names:
            comms = self._objs.map("allowed_comms")
            for name in self.config.exe_names:
                comms.update(name.encode()[:15].ljust(16, b"\0"), _ONE)
        if self.config.pids or self.config.exe_names:
            allowed = set(self.config.pids)
            if self.config.exe_names:
                for entry in os.listdir("/proc"):
                    if entry.isdigit() and _exe_matches(int(entry), self.config.exe_names):
                        allowed.add(int(entry))
            allowed |= _descendants_of(allowed)
            allowed.discard(self.config.self_pid)
            table = self._objs.map("allowed_pids")
            for pid in allowed:
                table.update(struct.pack("<I", pid), _ONE)
            self._pid_gen_bump()

    def set_cgroup_verdicts(self, trace: dict[int, bool], forget: Iterable[int] = ()) -> int:
        """Set the kernel's verdict for cgroup v2 ids (True: trace) and drop those of `forget`
        (cgroups gone: a later cgroup never reuses an id, but the map's room is bounded).
        Returns the verdicts written; 0 before start or after close."""
        written = 0
        with self._verdict_lock:
            if self._objs is None or not self.config.cgroup_filter:
                return 0
            table = self._objs.map("cgroup_verdict")
            for cgroup_id in forget:
                try:
                    table.delete(struct.pack("<Q", cgroup_id))
                except LoaderError:
                    pass  # never written (or already gone): nothing to undo
            for cgroup_id, traced in trace.items():
                try:
                    table.update(struct.pack("<Q", cgroup_id), _ONE if traced else _ZERO)
                except LoaderError as exc:  # the map is full: the default verdict applies, counted
                    self._verdicts_refused += 1
                    log.debug("kspan: cgroup verdict %d not written: %s", cgroup_id, exc)
                    continue
                written += 1
        return written

    def allow_pid(self, pid: int) -> None:
        """Trace `pid` from now on (filtering by --pid/--exe only)."""
        if self._objs is None or pid == self.config.self_pid:
            return
        self._objs.map("allowed_pids").update(struct.pack("<I", pid), _ONE)
        self._pid_gen_bump()

    def _pid_gen_bump(self) -> None:
        """After a change to allowed_pids: the probes cache its verdicts per CPU while pid_gen
        stays put (bpf/http_exchange.h, kspan_pid_allowed). Element 1 is user space's alone."""
        assert self._objs is not None
        gen = self._objs.map("pid_gen")
        key = struct.pack("<I", 1)
        cur = gen.lookup(key)
        n = int.from_bytes(cur, "little") if cur else 0
        gen.update(key, (n + 1).to_bytes(8, "little"))

    def is_traced(self, pid: int) -> bool:
        """Whether the filters (--pid/--exe, with children) let `pid` through: the kernel's own
        allowed_pids map, so user space never inspects a process the probes would ignore."""
        if pid == self.config.self_pid:
            return False
        if self.trace_gate is not None and not self.trace_gate(pid):
            return False
        if not (self.config.pids or self.config.exe_names) or self._objs is None:
            return True
        return self._objs.map("allowed_pids").lookup(struct.pack("<I", pid)) is not None

    # -- the probe set of the uprobe attachers (tracer/probeset.py) --------------------------
    def has_program(self, name: str) -> bool:
        return self._objs is not None and self._objs.find_program(name) is not None

    def has_map(self, name: str) -> bool:
        return self._objs is not None and self._objs.has_map(name)

    def attach_uprobe(self, prog: str, path: str, offset: int = 0, symbol: str | None = None,
                      retprobe: bool = False) -> None:
        obj = self._objs.find_program(prog) if self._objs is not None else None
        if obj is None:
            raise LoaderError(f"no program {prog} loaded")
        obj.attach_uprobe(prog, path, offset=offset, symbol=symbol, retprobe=retprobe)
        self.probes_attached += 1

    def map(self, name: str) -> Map:
        if self._objs is None:
            raise KeyError(name)
        return self._objs.map(name)

    def struct_layout(self, type_name: str) -> dict[str, tuple[int, int]]:
        if self._objs is None:
            raise KeyError(type_name)
        return self._objs.struct_layout(type_name)

    def struct_size(self, type_name: str) -> int:
        if self._objs is None:
            raise KeyError(type_name)
        return self._objs.struct_size(type_name)

    # -- reading -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> list[bytes]:
        """Every record available now (waiting up to timeout_ms for the first), as bytes."""
        if self._objs is None or self._reader is None:
            return []
        batch: list[bytes] = []
        if not self._reader.wait(timeout_ms):
            return batch
        self._reader.drain(batch, POLL_BATCH)
        self._note_execs(batch)
        return batch

    def poll_decoded(self, timeout_ms: int, out: list[Any]) -> int:
        """poll(), decoded straight from the ring's memory into `out` (tracer/_records.c's drain:
        runs of exchanges and of metric records, segment records, proc and tcp records as
        bytes); returns how many records did not decode."""
        if self._objs is None or self._reader is None:
            return 0
        if not self._reader.wait(timeout_ms):
            return 0
        start = len(out)
        _, undecodable = self._reader.drain_decoded(out, POLL_BATCH)
        self._note_execs(out[start:])
        return undecodable

    def _note_execs(self, polled: list[Any]) -> None:
        """--exe: a process that execs a named binary is traced from its first record on."""
        if not self.config.exe_names:
            return
        for rec in polled:
            if type(rec) is bytes and record_type(rec) == REC_PROC and len(rec) >= RAW_PROC_SIZE:
                proc = RawProc.from_buffer_copy(rec[:RAW_PROC_SIZE])
                if proc.event == PROC_EXEC and _exe_matches(proc.pid, self.config.exe_names):
                    self.allow_pid(proc.pid)
                    self._exe_added += 1

    def sweep(self, now_mono_ns: int | None = None) -> list[bytes]:
        """Take out exchanges with no progress within the response timeout, as TIMEOUT records.

        Each call examines at most SWEEP_BATCH connection states, continuing where the previous
        call stopped: idle keep-alive connections keep their state in the kernel, and reading
        all of a large map at every call would cost the agent more than the exchanges."""
        if self._objs is None or self._conn_layout is None:
            return []
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        timeout_ns = int(self.config.response_timeout_s * 1e9)
        conns = self._objs.map("conns")
        layout = self._conn_layout
        stale: list[tuple[bytes, bytes, bytes]] = []
        key = self._sweep_cursor
        for _ in range(SWEEP_BATCH):
            key = conns.next_key(key)
            if key is None:
                break  # end of the map: the next call starts over
            value = conns.lookup(key)
            if value is None:
                continue
            found = sweeper.stale_record(int.from_bytes(key, "little"), value, now, timeout_ns, layout)
            if found is not None:
                stale.append((key, value, found.record))
        self._sweep_cursor = key
        out: list[bytes] = []
        last = slice(layout.last_ns, layout.last_ns + 8)
        for key, value, record in stale:
            current = conns.lookup(key)
            if current is None or current[last] != value[last]:
                continue  # closed meanwhile (the kernel emitted it), or progress since we read it
            conns.delete(key)
            self._release_hints(value)
            out.append(record)
        self._sweep_evicted += len(out)
        return out

    def _release_hints(self, value: bytes) -> None:
        """The parent hints a swept server exchange held, released as kspan_release_hints() in
        bpf/http_exchange.h does when the kernel emits one (field offsets from the objects' BTF)."""
        assert self._objs is not None
        ex = sweeper.exchange_fields(value)
        if ex.role != 2:  # KSPAN_ROLE_SERVER
            return
        off, c_off, a_off = self._hint_offsets
        tctx = self._objs.map("thread_ctx")
        key = struct.pack("<Q", (ex.pid << 32) | ex.tid)
        cur = tctx.lookup(key)
        if cur is not None:
            inflight = int.from_bytes(cur[off : off + 4], "little")
            if inflight <= 1:
                tctx.delete(key)
            else:
                tctx.update(key, cur[:off] + (inflight - 1).to_bytes(4, "little") + cur[off + 4 :])
        inflight_map = self._objs.map("proc_inflight")
        pkey = struct.pack("<I", ex.pid)
        cur = inflight_map.lookup(pkey)
        if cur is None:
            return
        count = int.from_bytes(cur[c_off : c_off + 8], "little", signed=True)
        if count <= 0:
            return
        new = bytearray(cur)
        new[c_off : c_off + 8] = (count - 1).to_bytes(8, "little", signed=True)
        if count == 1:
            new[a_off : a_off + 4] = bytes(4)  # idle again
        inflight_map.update(pkey, bytes(new))

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """Per program: (runs, total run time in ns), as the kernel counts them while
        /proc/sys/kernel/bpf_stats_enabled is 1 (zeros otherwise). For measuring kernel-side cost."""
        out: dict[str, tuple[int, int]] = {}
        if self._objs is None:
            return out
        for obj in self._objs.objects.values():
            for prog in obj.programs():
                try:
                    out[prog] = obj.program_info(prog)
                except (LoaderError, KeyError):
                    continue
        return out

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTER_NAMES, 0)
        if self._objs is not None:
            table = self._objs.map("counters")
            for i, name in enumerate(COUNTER_NAMES):
                out[name] = sum(int.from_bytes(v[:8], "little") for v in table.lookup_percpu(struct.pack("<I", i)))
        out["timeouts_swept"] = self._sweep_evicted
        out["exe_matches"] = self._exe_added
        out["cgroup_verdicts_refused"] = self._verdicts_refused
        out["probes_attached"] = self.probes_attached
        return out

    def table_keys(self, name: str) -> Iterator[bytes]:
        """Keys of one of the kernel's maps (diagnostics: live state at stop)."""
        if self._objs is None:
            return iter(())
        return self._objs.map(name).keys()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._verdict_lock:
            self._close_objects()

    def _close_objects(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._objs is not None:
            try:
                self._objs.close()
            finally:
                self._objs = None
                self.probes_attached = 0

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

