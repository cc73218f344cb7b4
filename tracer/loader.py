"""Compile, attach and read the kernel side: one bcc BPF object for every probe family.

Capture assembles bpf/*.c into one program text (so every family shares the maps of
bpf/http_exchange.h), attaches it, fills the filter maps, and hands raw records (bytes) to the
caller in batches. bcc is imported lazily: `kspan replay` and `kspan doctor` work without it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer import sweeper
from tracer.btf import BtfError, sock_common_defines
from tracer.capabilities import Capabilities, choose_backend
from tracer.processes import service_name_from_cmdline
from tracer.records import REC_PROC, RawProc, record_type
from tracer.ringbuf import RingBufferReader

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

BACKEND_FILES = {"tracepoints": "sockets_tracepoints.c", "kprobes": "sockets_kprobes.c"}

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
]

PROC_EXEC = 1

# Probe functions of the kprobes backend: (function in sockets_kprobes.c, kernel symbol, is_return).
KPROBES = [
    ("kspan_tcp_sendmsg", "tcp_sendmsg", False),
    ("kspan_tcp_xfer_ret", "tcp_sendmsg", True),
    ("kspan_tcp_recvmsg", "tcp_recvmsg", False),
    ("kspan_tcp_xfer_ret", "tcp_recvmsg", True),
    ("kspan_tcp_close", "tcp_close", False),
]

# sock:sock_send_length and sock:sock_recv_length share one program (struct kspan_sock_msg_length in
# bpf/sockets_tracepoints.c); their record layout must be this one.
SOCK_LENGTH_EVENTS = ("sock/sock_send_length", "sock/sock_recv_length")
SOCK_LENGTH_LAYOUT = {"sk": 8, "family": 16, "protocol": 18, "ret": 20, "flags": 24}


class CaptureError(Exception):
    """Capture could not start; the message says what to do."""


@dataclass
class CaptureConfig:
    backend: str = "auto"  # "auto" | "tracepoints" | "kprobes"
    pids: set[int] = field(default_factory=set)
    exe_names: set[str] = field(default_factory=set)
    ports: set[int] = field(default_factory=set)
    self_pid: int = field(default_factory=os.getpid)
    ringbuf_pages: int = 2048
    max_connections: int = 65536
    response_timeout_s: float = 30.0
    extra_modules: list[str] = field(default_factory=list)
    network_events: bool = True


def program_text(backend: str, extra_modules: list[str] | None = None) -> str:
    """The one C text compiled by bcc: shared header, backend, process and TCP families, extras."""
    files = [BACKEND_FILES[backend], "process.c", "tcp_events.c", *(extra_modules or [])]
    # http_exchange.h is pasted, not #included: bcc rewrites map calls (`conns.lookup(...)`) only in
    # the main file, and its include guard makes a module's own #include of it a no-op.
    parts = ['#include "kspan.h"', "/* ---- http_exchange.h ---- */", (BPF_DIR / "http_exchange.h").read_text()]
    for name in files:
        path = BPF_DIR / name
        if not path.is_file():
            raise CaptureError(f"probe source {path} is missing (extra module {name!r}?)")
        parts.append(f"/* ---- {name} ---- */")
        parts.append(path.read_text())
    return "\n".join(parts) + "\n"


def cflags_for(
    config: CaptureConfig, with_btf_offsets: bool = True, tracefs: str = "", backend: str = "tracepoints"
) -> list[str]:
    pages = config.ringbuf_pages
    if pages <= 0 or pages & (pages - 1):
        raise CaptureError(f"ring buffer pages must be a power of two, got {pages}")
    flags = [
        f"-I{BPF_DIR}",
        f"-DKSPAN_SELF_PID={int(config.self_pid)}",
        f"-DKSPAN_RINGBUF_PAGES={pages}",
        f"-DKSPAN_MAX_CONNS={int(config.max_connections)}",
    ]
    if config.pids or config.exe_names:
        flags.append("-DKSPAN_FILTER_PIDS")
    if config.exe_names:
        flags.append("-DKSPAN_FILTER_EXE")
    if config.ports:
        flags.append("-DKSPAN_FILTER_PORTS")
    if config.network_events:
        flags.append("-DKSPAN_NETWORK_EVENTS")
        flags += _send_reset_defines(tracefs)
    if backend == "tracepoints":
        flags += _sock_length_defines(tracefs)
        if platform.machine() == "x86_64":
            flags.append("-DKSPAN_X86_64")
    if with_btf_offsets:
        try:
            flags += [f"-D{k}={v}" for k, v in sock_common_defines().items()]
        except BtfError as exc:
            # Without offsets, connections older than the agent have no addresses (counted).
            log.warning("kspan: no kernel BTF offsets (%s); pre-existing connections get no 4-tuple", exc)
    return flags


def tracepoint_field_offsets(tracefs: str, event: str) -> dict[str, int]:
    """Field name -> offset in a tracepoint's record, from <tracefs>/events/<event>/format."""
    out: dict[str, int] = {}
    try:
        text = (Path(tracefs or "/sys/kernel/tracing") / "events" / event / "format").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("field:"):
            continue
        parts = dict(p.strip().split(":", 1) for p in line.split(";") if ":" in p)
        decl = parts.get("field", "").strip()
        name = decl.split()[-1].split("[")[0] if decl else ""
        try:
            out[name] = int(parts.get("offset", ""))
        except ValueError:
            continue
    return out


def _send_reset_defines(tracefs: str) -> list[str]:
    off = tracepoint_field_offsets(tracefs, "tcp/tcp_send_reset")
    if not all(k in off for k in ("skaddr", "saddr", "daddr")):
        return []
    return [
        f"-DKSPAN_TP_SEND_RESET_SKADDR={off['skaddr']}",
        f"-DKSPAN_TP_SEND_RESET_SADDR={off['saddr']}",
        f"-DKSPAN_TP_SEND_RESET_DADDR={off['daddr']}",
    ]


def _sock_length_defines(tracefs: str) -> list[str]:
    for event in SOCK_LENGTH_EVENTS:
        off = tracepoint_field_offsets(tracefs, event)
        if any(off.get(k) != v for k, v in SOCK_LENGTH_LAYOUT.items()):
            raise CaptureError(
                f"tracepoint {event} has layout {off}, expected {SOCK_LENGTH_LAYOUT}: this kernel needs "
                "--backend kprobes (or a kspan update)"
            )
    return []


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


def _prog_info(fd: int) -> tuple[int, int] | None:
    """(run_cnt, run_time_ns) of a loaded program, by BPF_OBJ_GET_INFO_BY_FD."""
    info = (ctypes.c_uint8 * 256)()
    attr = (ctypes.c_uint8 * 16)()
    ctypes.memmove(attr, (ctypes.c_uint32 * 4)(fd, 256, 0, 0), 8)  # bpf_fd, info_len
    ctypes.memmove(ctypes.addressof(attr) + 8, ctypes.pointer(ctypes.c_uint64(ctypes.addressof(info))), 8)
    libc = ctypes.CDLL(None, use_errno=True)
    sys_bpf = 321 if platform.machine() == "x86_64" else 280
    if libc.syscall(sys_bpf, 15, attr, 16) != 0:  # BPF_OBJ_GET_INFO_BY_FD
        return None
    raw = bytes(info)
    # struct bpf_prog_info: run_time_ns at 192, run_cnt at 200 (uapi, append-only)
    return int.from_bytes(raw[200:208], "little"), int.from_bytes(raw[192:200], "little")


def _release_compiler_memory() -> None:
    """bcc's LLVM frees its compile-time heap but glibc keeps it mapped: hand it back to the OS
    (about 20 MB of resident memory here)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# Connection states examined per sweep() call (about 13 us each here).
SWEEP_BATCH = 2048

# Functions attached by name (not by bcc's tracepoint__ auto-attach), with their program type.
NAMED_TRACEPOINT_FUNCS = ("kspan_sock_length", "kspan_tcp_send_reset")


def verify_programs(
    backend: str, config: CaptureConfig | None = None, tracefs: str = "", portable: bool = False
) -> list[str]:
    """Compile `backend`'s object and load every program through the verifier without attaching
    anything (kprobe programs load where kprobes cannot attach). `portable` compiles the
    tracepoints backend as for a non-x86_64 machine (syscall arguments saved at entry). Returns
    the programs loaded; raises CaptureError naming the program the verifier rejected."""
    from bcc import BPF, lib

    class _NoAutoAttach(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            return None

    config = config or CaptureConfig(network_events=True)
    kprobe_funcs = {fn for fn, _sym, _ret in KPROBES}
    cflags = cflags_for(config, tracefs=tracefs, backend=backend)
    if portable:
        cflags = [f for f in cflags if f != "-DKSPAN_X86_64"]
    try:
        b = _NoAutoAttach(text=program_text(backend, config.extra_modules).encode(), cflags=cflags)
    except Exception as exc:
        raise CaptureError(f"compiling the {backend} probes failed: {exc}") from exc
    loaded: list[str] = []
    try:
        for i in range(lib.bpf_num_functions(b.module)):
            name = lib.bpf_function_name(b.module, i).decode()
            if name.startswith("tracepoint__") or name in NAMED_TRACEPOINT_FUNCS:
                kind = BPF.TRACEPOINT
            elif name in kprobe_funcs:
                kind = BPF.KPROBE
            else:
                continue
            try:
                b.load_func(name.encode(), kind)
            except Exception as exc:
                raise CaptureError(f"the verifier rejected {name} ({backend} backend): {exc}") from exc
            loaded.append(name)
    finally:
        b.cleanup()
    return loaded


def verifier_insns(backend: str, fn_name: str, config: CaptureConfig | None = None, tracefs: str = "") -> int:
    """Instructions the verifier walked to accept `fn_name` (its limit is 1,000,000): the headroom
    left for changes to the state machine. Loads the program once more with verifier statistics."""
    import re
    import struct

    from bcc import BPF

    class _NoAutoAttach(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            return None

    config = config or CaptureConfig()
    b = _NoAutoAttach(text=program_text(backend, config.extra_modules).encode(),
                      cflags=cflags_for(config, tracefs=tracefs, backend=backend))
    try:
        insns = ctypes.create_string_buffer(b.dump_func(fn_name.encode()))
        log = ctypes.create_string_buffer(1 << 16)
        license_ = ctypes.create_string_buffer(b"GPL")
        attr = (ctypes.c_uint8 * 144)()
        prog_type = 2 if fn_name in {fn for fn, _s, _r in KPROBES} else 5  # BPF_PROG_TYPE_KPROBE / TRACEPOINT
        struct.pack_into("<IIQQIIQ", memoryview(attr).cast("B"), 0, prog_type, (len(insns) - 1) // 8,
                         ctypes.addressof(insns), ctypes.addressof(license_), 4, len(log), ctypes.addressof(log))
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(321 if platform.machine() == "x86_64" else 280, 5, attr, 144)  # BPF_PROG_LOAD
        if fd >= 0:
            os.close(fd)
        m = re.search(r"processed (\d+) insns", log.value.decode(errors="replace"))
        if not m:
            raise CaptureError(f"no verifier statistics for {fn_name}: {os.strerror(ctypes.get_errno())}")
        return int(m.group(1))
    finally:
        b.cleanup()


class Capture:
    def __init__(self, config: CaptureConfig, caps: Capabilities) -> None:
        self.config = config
        self.caps = caps
        self.bpf: Any = None
        self.backend = ""
        self.backend_reason = ""
        self.probes_attached = 0
        self._reader: RingBufferReader | None = None
        self._closed = False
        self._sweep_evicted = 0
        self._sweep_cursor: Any = None
        self._exe_added = 0

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        backend, reason = choose_backend(self.caps, self.config.backend)
        if not backend:
            raise CaptureError(reason)
        self.backend, self.backend_reason = backend, reason
        try:
            from bcc import BPF  # noqa: F401 - lazy: only capture needs bcc
        except ImportError as exc:
            raise CaptureError(
                "bcc is not importable: install Debian's python3-bpfcc and use a venv made with "
                "--system-site-packages (make setup does both)"
            ) from exc
        text = program_text(backend, self.config.extra_modules)
        cflags = cflags_for(self.config, tracefs=self.caps.tracefs, backend=backend)
        try:
            self.bpf = BPF(text=text.encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception on compile/load/attach failure
            raise CaptureError(
                f"loading the {backend} probes failed: {exc}. Run `kspan doctor` to see what this kernel "
                "offers; compile errors usually mean missing kernel headers (linux-headers-*)."
            ) from exc
        _release_compiler_memory()
        try:
            if backend == "tracepoints":
                for event in SOCK_LENGTH_EVENTS:
                    self.bpf.attach_tracepoint(tp=event.replace("/", ":").encode(), fn_name=b"kspan_sock_length")
            if backend == "kprobes":
                for fn, sym, is_ret in KPROBES:
                    if is_ret:
                        self.bpf.attach_kretprobe(event=sym.encode(), fn_name=fn.encode())
                    else:
                        self.bpf.attach_kprobe(event=sym.encode(), fn_name=fn.encode())
            if any(f.startswith("-DKSPAN_TP_SEND_RESET_SKADDR") for f in cflags):
                self.bpf.attach_tracepoint(tp=b"tcp:tcp_send_reset", fn_name=b"kspan_tcp_send_reset")
            self._fill_filters()
            self._reader = RingBufferReader(self.bpf[b"events"].map_fd, self.config.ringbuf_pages * mmap.PAGESIZE)
        except Exception as exc:
            self.close()
            raise CaptureError(f"attaching the {backend} probes failed: {exc}. Run `kspan doctor`.") from exc
        self.probes_attached = self._count_probes()

    def _count_probes(self) -> int:
        b = self.bpf
        return int(b.num_open_tracepoints() + b.num_open_kprobes() + b.num_open_uprobes())

    def _fill_filters(self) -> None:
        b = self.bpf
        one = ctypes.c_uint8(1)
        if self.config.ports:
            ports = b[b"allowed_ports"]
            for port in self.config.ports:
                ports[ports.Key(port)] = one
        if self.config.exe_names:
            comms = b[b"allowed_comms"]
            for name in self.config.exe_names:
                key = comms.Key()
                raw = name.encode()[:15]
                ctypes.memmove(ctypes.addressof(key), raw, len(raw))
                comms[key] = one
        if self.config.pids or self.config.exe_names:
            allowed = set(self.config.pids)
            if self.config.exe_names:
                for entry in os.listdir("/proc"):
                    if entry.isdigit() and _exe_matches(int(entry), self.config.exe_names):
                        allowed.add(int(entry))
            allowed |= _descendants_of(allowed)
            allowed.discard(self.config.self_pid)
            table = b[b"allowed_pids"]
            for pid in allowed:
                table[table.Key(pid)] = one

    def allow_pid(self, pid: int) -> None:
        """Trace `pid` from now on (filtering by --pid/--exe only)."""
        if self.bpf is None or pid == self.config.self_pid:
            return
        table = self.bpf[b"allowed_pids"]
        table[table.Key(pid)] = ctypes.c_uint8(1)

    def is_traced(self, pid: int) -> bool:
        """Whether the filters (--pid/--exe, with children) let `pid` through: the kernel's own
        allowed_pids map, so user space never inspects a process the probes would ignore."""
        if pid == self.config.self_pid:
            return False
        if not (self.config.pids or self.config.exe_names) or self.bpf is None:
            return True
        table = self.bpf[b"allowed_pids"]
        try:
            table[table.Key(pid)]
        except KeyError:
            return False
        return True

    # -- reading -----------------------------------------------------------------------------
    def poll(self, timeout_ms: int) -> list[bytes]:
        """Every record available now (waiting up to timeout_ms for the first)."""
        if self.bpf is None or self._reader is None:
            return []
        self._reader.wait(timeout_ms)
        batch: list[bytes] = []
        self._reader.drain(batch)
        if self.config.exe_names:
            for rec in batch:
                if record_type(rec) == REC_PROC and len(rec) >= ctypes.sizeof(RawProc):
                    proc = RawProc.from_buffer_copy(rec)
                    if proc.event == PROC_EXEC and _exe_matches(proc.pid, self.config.exe_names):
                        self.allow_pid(proc.pid)
                        self._exe_added += 1
        return batch

    def sweep(self, now_mono_ns: int | None = None) -> list[bytes]:
        """Take out exchanges with no progress within the response timeout, as TIMEOUT records.

        Each call examines at most SWEEP_BATCH connection states, continuing where the previous
        call stopped: idle keep-alive connections keep their state in the kernel, and reading
        all of a large map at every call would cost the agent more than the exchanges."""
        if self.bpf is None:
            return []
        now = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        timeout_ns = int(self.config.response_timeout_s * 1e9)
        conns = self.bpf[b"conns"]
        layout = sweeper.ConnLayout.of(conns.Leaf)
        stale: list[tuple[Any, Any, bytes]] = []
        key = self._sweep_cursor
        for _ in range(SWEEP_BATCH):
            try:
                key = conns.next(key)
            except StopIteration:
                key = None  # end of the map: the next call starts over
                break
            try:
                value = conns[key]
            except KeyError:
                continue
            found = sweeper.stale_record(key.value, sweeper.raw_bytes(value), now, timeout_ns, layout)
            if found is not None:
                stale.append((key, value, found.record))
        self._sweep_cursor = key
        out: list[bytes] = []
        for key, value, record in stale:
            try:
                if conns[key].last_ns != value.last_ns:
                    continue  # progress since we read it
                del conns[key]
            except KeyError:
                continue  # closed meanwhile: the kernel emitted it
            self._release_hints(value)
            out.append(record)
        self._sweep_evicted += len(out)
        return out

    def _release_hints(self, value: Any) -> None:
        ex = value.ex
        if ex.role != 2:  # KSPAN_ROLE_SERVER
            return
        b = self.bpf
        tctx = b[b"thread_ctx"]
        key = tctx.Key((ex.pid << 32) | ex.tid)
        try:
            ref = tctx[key]
            if ref.conn_id == ex.conn_id and ref.req_start_ns == ex.req_start_ns:
                del tctx[key]
        except KeyError:
            pass
        inflight = b[b"proc_inflight"]
        pkey = inflight.Key(ex.pid)
        try:
            f = inflight[pkey]
            if f.count > 0:
                f.count -= 1
                inflight[pkey] = f
        except KeyError:
            pass

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """Per program: (runs, total run time in ns), as the kernel counts them while
        /proc/sys/kernel/bpf_stats_enabled is 1 (zeros otherwise). For measuring kernel-side cost."""
        out: dict[str, tuple[int, int]] = {}
        if self.bpf is None:
            return out
        for name, fn in self.bpf.funcs.items():
            info = _prog_info(fn.fd)
            if info is not None:
                key = name.decode() if isinstance(name, bytes) else str(name)
                out[key] = info
        return out

    def counters(self) -> dict[str, int]:
        out = dict.fromkeys(COUNTER_NAMES, 0)
        if self.bpf is not None:
            table = self.bpf[b"counters"]
            for i, name in enumerate(COUNTER_NAMES):
                out[name] = int(sum(table[table.Key(i)]))
        out["timeouts_swept"] = self._sweep_evicted
        out["exe_matches"] = self._exe_added
        out["probes_attached"] = self.probes_attached
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            finally:
                self.bpf = None
                self.probes_attached = 0

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
