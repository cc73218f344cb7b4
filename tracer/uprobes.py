"""Attach bpf/go_tls.c and bpf/go_http.c to Go programs, running now or started later.

For each Go executable (one per (st_dev, st_ino), read through /proc/PID/exe so a container's
binary resolves in its own root) tracer/go_binary.py finds the functions, their RET instructions and
the struct field offsets. Entry programs go on the function's first instruction and return programs
on each RET (never uretprobes: Go moves stacks). The offsets go into the kernel map go_procs for
every process running that binary, since one BPF object serves binaries of different Go versions.

A binary that cannot be probed (no DWARF and no measured offsets, Go < 1.17, a missing function) is
reported once by name with the reason; its plaintext HTTP is still captured at the socket level.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from tracer import go_binary as gb

log = logging.getLogger(__name__)

FLAG_TLS = 0x1   # KSPAN_GO_TLS in bpf/go_tls.c
FLAG_HTTP = 0x2  # KSPAN_GO_HTTP

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


def offsets_values(offsets: dict[str, int], flags: int) -> dict[str, int]:
    """The fields of struct kspan_go_offsets (bpf/go_tls.c) from go_binary offsets."""
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


def _has_table(bpf: Any, name: str) -> bool:
    try:
        bpf[name]
    except KeyError:
        return False
    return True


class GoAttacher:
    def __init__(self, bpf: Any, proc_root: str = "/proc", strict: bool = False,
                 inspect_in_child: bool = False) -> None:
        self.bpf = bpf
        self.proc_root = proc_root
        self.strict = strict  # raise on a failed attach (CI) instead of logging it
        self.targets: dict[tuple[int, int], GoTarget] = {}
        self.not_go: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self._pid_target: dict[int, tuple[int, int]] = {}
        self.http_enabled = _has_table(bpf, "go_serving")  # bpf/go_http.c compiled in
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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

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
        path = self._stable_path(pid, exe, key)
        if self._inspect_in_child:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)
            self._inspecting[key] = (self._executor.submit(gb.inspect, path), path, {pid})
            return 0
        try:
            info: gb.GoBinary | None | gb.GoBinaryError = gb.inspect(exe)
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
        table = self.bpf["go_procs"]
        try:
            del table[table.Key(pid)]
        except KeyError:
            pass

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
        wanted_flags = FLAG_TLS | (FLAG_HTTP if self.http_enabled else 0)
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
                self.bpf.attach_uprobe(name=target.path, addr=fn.address, fn_name=enter)
                target.probes += 1
                if ret is not None:
                    for addr in fn.returns:
                        self.bpf.attach_uprobe(name=target.path, addr=addr, fn_name=ret)
                        target.probes += 1
            except Exception as e:  # bcc raises a bare Exception on attach failure
                gone = not os.path.exists(f"{self.proc_root}/{pid}")
                self._error(f"Go binary {name}: cannot attach to {fn_name}: {e}"
                            + (" (the process exited meanwhile)" if gone else ""), fatal=not gone)
                flags &= ~flag
        target.flags = flags
        if flags and not info.pie:
            self._set_probe_offsets(target, flags)
        if flags:
            log.info("kspan: Go %s %s: %d probes (offsets from %s)", info.version.text, name, target.probes,
                     info.offsets_source)
        return target.probes

    def _leaf(self, table: Any, target: GoTarget) -> Any:
        assert target.info is not None
        leaf = table.Leaf()
        for k, v in offsets_values(target.info.offsets, target.flags).items():
            setattr(leaf, k, ctypes.c_uint16(v).value)
        return leaf

    def _set_offsets(self, pid: int, target: GoTarget) -> None:
        table = self.bpf["go_procs"]
        table[table.Key(pid)] = self._leaf(table, target)

    def _set_probe_offsets(self, target: GoTarget, flags: int) -> None:
        """A non-PIE binary runs at its link addresses: the probed address tells the binary."""
        assert target.info is not None
        table = self.bpf["go_probe_offsets"]
        leaf = self._leaf(table, target)
        for fn_name, (_, ret, flag) in PROBES.items():
            fn = target.info.functions.get(fn_name)
            if fn is None or not flag & flags:
                continue
            for addr in (fn.address, *(fn.returns if ret else ())):
                table[table.Key(addr)] = leaf

    def _error(self, msg: str, fatal: bool = False) -> None:
        self.errors.append(msg)
        if self.strict and fatal:
            raise RuntimeError(msg)
        log.warning("kspan: %s", msg)
