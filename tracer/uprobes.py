"""Attach bpf/go_tls.bpf.c and bpf/go_http.bpf.c to Go programs, running now or started later.

For each Go executable (one per (st_dev, st_ino), read through /proc/PID/exe so a container's
binary resolves in its own root) tracer/go_binary.py finds the functions, their RET instructions and
the struct field offsets. Entry programs go on the function's first instruction and return programs
on each RET (never uretprobes: Go moves stacks), attached by file offset (go_binary gives ELF virtual
addresses; tracer.loader.file_offset() maps them through the PT_LOAD headers). The offsets go into
the kernel map go_procs for every process running that binary, since one set of programs serves
binaries of different Go versions; they are packed as struct kspan_go_offsets by its BTF layout.

A binary that cannot be probed (no DWARF and no measured offsets, Go < 1.17, a missing function) is
reported once by name with the reason; its plaintext HTTP is still captured at the socket level.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import struct
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field

from tracer import go_binary as gb
from tracer import inspect_cache
from tracer.loader import LoaderError, file_offset
from tracer.probeset import ProbeSet, StructPacker

log = logging.getLogger(__name__)

FLAG_TLS = 0x1   # KSPAN_GO_TLS in bpf/go_common.h
FLAG_HTTP = 0x2  # KSPAN_GO_HTTP

OFFSETS_TYPE = "kspan_go_offsets"  # the value of go_procs and go_probe_offsets (bpf/go_common.h)

TLS_FIELDS = ("runtime.g.goid", "crypto/tls.Conn.conn", "net.TCPConn.conn", "net.conn.fd", "net.netFD.pfd",
              "internal/poll.FD.Sysfd")
HTTP_FIELDS = (*TLS_FIELDS, "net/http.response.conn", "net/http.conn.rwc", "net/http.conn.tlsState",
               "net/http.persistConn.conn", "net/http.persistConn.tlsState")

# function -> (entry program, RET program or None, feature flag)
PROBES: dict[str, tuple[str, str | None, int]] = {
    # Write reports its bytes at entry (all or error), so it needs no RET probes.
    gb.FN_TLS_WRITE: ("kspan_go_tls_write_enter", None, FLAG_TLS),
    gb.FN_TLS_READ: ("kspan_go_tls_read_enter", "kspan_go_tls_read_ret", FLAG_TLS),
    gb.FN_SERVE_HTTP: ("kspan_go_serve_enter", "kspan_go_serve_ret", FLAG_HTTP),
    gb.FN_NEWPROC1: ("kspan_go_newproc_enter", "kspan_go_newproc_ret", FLAG_HTTP),
    gb.FN_PC_ROUNDTRIP: ("kspan_go_roundtrip_enter", None, FLAG_HTTP),
}


@dataclass(slots=True)
class GoTarget:
    path: str
    info: gb.GoBinary | None
    flags: int = 0
    probes: int = 0
    problems: list[str] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    offsets_value: bytes = b""  # struct kspan_go_offsets for its processes, once attached


def offsets_values(offsets: dict[str, int], flags: int) -> dict[str, int]:
    """The fields of struct kspan_go_offsets (bpf/go_common.h) from go_binary offsets."""
    o = offsets.get
    return {
        "g_goid": o("runtime.g.goid", 0),
        "tls_conn_conn": o("crypto/tls.Conn.conn", 0),
        "tcpconn_fd": o("net.TCPConn.conn", 0) + o("net.conn.fd", 0),
        "netfd_sysfd": o("net.netFD.pfd", 0) + o("internal/poll.FD.Sysfd", 0),
        "response_conn": o("net/http.response.conn", 0),
        "conn_rwc": o("net/http.conn.rwc", 0),
        "conn_tls_state": o("net/http.conn.tlsState", 0),
        "pc_conn": o("net/http.persistConn.conn", 0),
        "pc_tls_state": o("net/http.persistConn.tlsState", 0),
        "flags": flags,
    }


def _pid_key(pid: int) -> bytes:
    """go_procs key: a tgid (__u32)."""
    return struct.pack("=I", pid)


class GoAttacher:
    def __init__(self, probes: ProbeSet, proc_root: str = "/proc", strict: bool = False,
                 inspect_in_child: bool = False) -> None:
        self.probes = probes
        self.proc_root = proc_root
        self.strict = strict  # raise on a failed attach (CI) instead of logging it
        self.targets: dict[tuple[int, int], GoTarget] = {}
        self.not_go: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self._pid_target: dict[int, tuple[int, int]] = {}
        # The features whose programs are loaded: go_tls.bpf.o (FLAG_TLS), go_http.bpf.o (FLAG_HTTP).
        self.enabled_flags = 0
        for feature in (FLAG_TLS, FLAG_HTTP):
            if all(probes.has_program(enter) and (ret is None or probes.has_program(ret))
                   for enter, ret, flag in PROBES.values() if flag == feature):
                self.enabled_flags |= feature
        self.http_enabled = bool(self.enabled_flags & FLAG_HTTP)
        self._offsets_packer: StructPacker | None = None
        # Reading a binary's symbols and DWARF takes 1-2.5 s and leaves ~150 MB in CPython's
        # allocator. In the agent it runs in a short-lived child process: the capture loop keeps
        # draining the ring buffer meanwhile, and the memory goes back to the OS when the child exits.
        self._inspect_in_child = inspect_in_child
        self._executor: ProcessPoolExecutor | None = None
        self._inspecting: dict[tuple[int, int], tuple[Future[gb.GoBinary | None], str, set[int]]] = {}

    @property
    def attached_probes(self) -> int:
        return sum(t.probes for t in self.targets.values())

    @property
    def traced_pids(self) -> set[int]:
        return set(self._pid_target)

    def scan_existing(self, pids_filter: Iterable[int] | None = None) -> int:
        pids = list(pids_filter) if pids_filter is not None else self._all_pids()
        n = sum(self.on_exec(pid) for pid in pids)
        if self._inspecting:  # at start-up, `ready` means attached: wait for the children
            wait([f for f, _, _ in self._inspecting.values()])
            n += self.rescan_pending()
        return n

    def rescan_pending(self) -> int:
        """Attach to the binaries whose inspection in a child process has finished (call it often)."""
        n = 0
        for key, (fut, path, pids) in list(self._inspecting.items()):
            if not fut.done():
                continue
            del self._inspecting[key]
            try:
                info: gb.GoBinary | None | gb.GoBinaryError = fut.result()
            except gb.GoBinaryError as e:
                info = e
            except Exception as e:  # noqa: BLE001 - a crashed child: report, trace at socket level
                info = gb.GoBinaryError(f"{path}: inspection failed: {type(e).__name__}: {e}")
            live = sorted(p for p in pids if os.path.exists(f"{self.proc_root}/{p}"))
            n += self._install(key, path, live, info)
        return n

    def close(self) -> None:
        ex, self._executor = self._executor, None
        if ex is None:
            return
        # An inspection of a large binary (a Go toolchain's `link`) can take tens of seconds, and
        # the pool's exit hook would wait for it, holding up the agent's stop: the worker is
        # killed (its result is no longer wanted; the cache file is written by rename, so none is
        # left half-written). The pool has no public way to do this before Python 3.14.
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(1.0)
            if proc.is_alive():
                proc.kill()

    def on_exec(self, pid: int) -> int:
        """Inspect the executable of `pid`; attach if it is a Go binary seen for the first time.

        Returns the number of probes attached by this call.
        """
        exe = f"{self.proc_root}/{pid}/exe"
        try:
            st = os.stat(exe)
        except OSError:
            return 0  # exited already, or a kernel thread
        key = (st.st_dev, st.st_ino)
        if key in self.not_go:
            return 0
        old = self._pid_target.pop(pid, None)
        if old is not None and old in self.targets:
            self.targets[old].pids.discard(pid)
        target = self.targets.get(key)
        if target is not None:
            return self._install(key, target.path, [pid], None)
        pending = self._inspecting.get(key)
        if pending is not None:
            pending[2].add(pid)
            return 0
        if not inspect_cache.is_go_executable(exe):
            self.not_go.add(key)  # no .go.buildinfo: not worth a child process
            return 0
        path = self._stable_path(pid, exe, key)
        cached = inspect_cache.load(exe)
        if not isinstance(cached, inspect_cache.Missing):
            return self._install(key, path, [pid], cached)
        if self._inspect_in_child:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
            self._inspecting[key] = (self._executor.submit(inspect_cache.inspect_and_store, path), path, {pid})
            return 0
        try:
            info: gb.GoBinary | None | gb.GoBinaryError = inspect_cache.inspect_and_store(exe)
        except gb.GoBinaryError as e:
            info = e
        return self._install(key, path, [pid], info)

    def _install(self, key: tuple[int, int], path: str, pids: list[int],
                 info: gb.GoBinary | None | gb.GoBinaryError) -> int:
        """Attach to a binary once (info: its inspection; None with a known target) and give each
        of its processes the offsets. Returns the number of probes attached."""
        n = 0
        target = self.targets.get(key)
        if target is None:
            if isinstance(info, gb.GoBinaryError):
                self._error(f"Go binary {self._name(pids[0]) if pids else path}: {info}; socket-level capture only")
            if not isinstance(info, gb.GoBinary):
                self.not_go.add(key)
                return 0
            if not pids:
                return 0  # every process of it exited meanwhile: its next exec inspects it again
            target = GoTarget(path=path, info=info)
            self.targets[key] = target
            n = self._attach(target, pids[0])
        if target.flags:
            for pid in pids:
                self._set_offsets(pid, target)
                target.pids.add(pid)
                self._pid_target[pid] = key
        return n

    def on_exit(self, pid: int) -> None:
        key = self._pid_target.pop(pid, None)
        if key is None:
            return
        t = self.targets.get(key)
        if t is not None:
            t.pids.discard(pid)
        self.probes.map("go_procs").delete(_pid_key(pid))

    # -- internals ---------------------------------------------------------------------------

    def _name(self, pid: int) -> str:
        try:
            return f"{os.readlink(f'{self.proc_root}/{pid}/exe')} (pid {pid})"
        except OSError:
            return f"pid {pid}"

    def _stable_path(self, pid: int, exe: str, key: tuple[int, int]) -> str:
        """A path to attach through that outlives `pid`: the binary's own path when it names the same
        file from here (not in another mount namespace), else /proc/PID/exe."""
        try:
            real = os.readlink(exe).removesuffix(" (deleted)")
            st = os.stat(real)
            if (st.st_dev, st.st_ino) == key:
                return real
        except OSError:
            pass
        return exe

    def _all_pids(self) -> list[int]:
        try:
            return [int(d) for d in os.listdir(self.proc_root) if d.isdigit()]
        except OSError:
            return []

    def _attach(self, target: GoTarget, pid: int) -> int:
        info = target.info
        assert info is not None
        name = self._name(pid)
        target.problems.extend(info.problems)
        wanted_flags = self.enabled_flags
        flags = 0
        for flag, fields in ((FLAG_TLS, TLS_FIELDS), (FLAG_HTTP, HTTP_FIELDS)):
            if not flag & wanted_flags:
                continue
            missing = [f for f in fields if f not in info.offsets]
            fns = [fn for fn, (_, _, fl) in PROBES.items() if fl == flag]
            missing_fns = [fn for fn in fns if fn not in info.functions]
            if missing or missing_fns or not info.abi_register:
                if flag == FLAG_TLS and gb.FN_TLS_WRITE not in info.functions and not missing:
                    continue  # a Go program without crypto/tls: nothing to say
                why = "; ".join(info.problems) or (
                    f"missing {', '.join(missing + missing_fns)}"
                )
                what = "crypto/tls plaintext" if flag == FLAG_TLS else "goroutine parentage"
                self._error(f"Go binary {name} ({info.version.text}): no {what}: {why}")
                continue
            flags |= flag
        for fn_name, (enter, ret, flag) in PROBES.items():
            if not flag & flags:
                continue
            fn = info.functions[fn_name]
            try:
                self._attach_at(enter, target.path, fn.address)
                target.probes += 1
                if ret is not None:
                    for addr in fn.returns:
                        self._attach_at(ret, target.path, addr)
                        target.probes += 1
            except LoaderError as e:
                gone = not os.path.exists(f"{self.proc_root}/{pid}")
                self._error(f"Go binary {name}: cannot attach to {fn_name}: {e}"
                            + (" (the process exited meanwhile)" if gone else ""), fatal=not gone)
                flags &= ~flag
        target.flags = flags
        if flags:
            target.offsets_value = self._packer().pack(offsets_values(info.offsets, flags), complete=True)
        if flags and not info.pie:
            self._set_probe_offsets(target, flags)
        if flags:
            log.info("kspan: Go %s %s: %d probes (offsets from %s)", info.version.text, name, target.probes,
                     info.offsets_source)
        return target.probes

    def _attach_at(self, prog: str, path: str, vaddr: int) -> None:
        """A plain uprobe at the instruction at ELF virtual address `vaddr` of `path`."""
        self.probes.attach_uprobe(prog, path, offset=file_offset(path, vaddr))

    def _packer(self) -> StructPacker:
        if self._offsets_packer is None:
            self._offsets_packer = StructPacker(self.probes, OFFSETS_TYPE)
        return self._offsets_packer

    def _set_offsets(self, pid: int, target: GoTarget) -> None:
        self.probes.map("go_procs").update(_pid_key(pid), target.offsets_value)

    def _set_probe_offsets(self, target: GoTarget, flags: int) -> None:
        """A non-PIE binary runs at its link addresses: the probed address (PT_REGS_IP, the ELF
        virtual address itself) tells the binary."""
        assert target.info is not None
        table = self.probes.map("go_probe_offsets")
        for fn_name, (_, ret, flag) in PROBES.items():
            fn = target.info.functions.get(fn_name)
            if fn is None or not flag & flags:
                continue
            for addr in (fn.address, *(fn.returns if ret else ())):
                table.update(struct.pack("=Q", addr), target.offsets_value)

    def _error(self, msg: str, fatal: bool = False) -> None:
        self.errors.append(msg)
        if self.strict and fatal:
            raise RuntimeError(msg)
        log.warning("kspan: %s", msg)
