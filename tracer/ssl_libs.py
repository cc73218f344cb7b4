"""Find OpenSSL's libssl (shared, or linked statically into an executable) and attach bpf/openssl.bpf.c.

A uprobe belongs to a file (inode), not to a process: attaching once to /usr/lib/.../libssl.so.3
covers every process that maps it, now or later. So the attacher
- attaches to the host's libssl files found by the dynamic linker's cache at start,
- reads /proc/PID/maps of running processes for libssl copies elsewhere (containers, bundled
  copies), opening them through /proc/PID/root so a container's path resolves in its own root,
- re-reads the maps of processes that started later (exec events) for a few seconds, because a
  program maps libssl after its exec (the dynamic loader) or much later (Python imports _ssl
  lazily, on first use).
Each library file is attached once, keyed by (st_dev, st_ino). Programs are attached by symbol
name: libbpf finds the function in the file (.dynsym of a shared library, .symtab of an executable).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tracer import go_binary
from tracer.loader import LoaderError
from tracer.probeset import ProbeSet

log = logging.getLogger(__name__)

# OpenSSL's soname: libssl.so.3, libssl.so.1.1 (NSS's libssl3.so is a different library).
LIBSSL_RE = re.compile(r"(^|/)libssl\.so(\.[0-9]+)*$")

# (symbol, entry program, return program) of bpf/openssl.bpf.c; the _ex forms appeared in OpenSSL 1.1.1.
PROBES: tuple[tuple[str, str, str], ...] = (
    ("SSL_write", "kspan_ssl_write_enter", "kspan_ssl_write_return"),
    ("SSL_read", "kspan_ssl_read_enter", "kspan_ssl_read_return"),
    ("SSL_write_ex", "kspan_ssl_write_ex_enter", "kspan_ssl_write_ex_return"),
    ("SSL_read_ex", "kspan_ssl_read_ex_enter", "kspan_ssl_read_ex_return"),
)
SET_FD = ("SSL_set_fd", "kspan_ssl_set_fd")

# After an exec, look at the process's maps again at these delays (seconds).
RESCAN_DELAYS: tuple[float, ...] = (0.2, 1.0, 3.0, 10.0)

SYSTEM_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib",
                   "/usr/local/lib", "/usr/local/ssl/lib")


@dataclass(slots=True)
class SslLibrary:
    path: str  # as opened (may be /proc/PID/root/...)
    kind: str  # "shared" or "static"
    symbols: list[str] = field(default_factory=list)  # the probed symbols it defines
    probes: int = 0


def libssl_paths_in_maps(maps_text: str) -> list[str]:
    """Distinct libssl file paths in the text of a /proc/PID/maps file."""
    out: list[str] = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6:
            continue
        path = parts[5].strip()
        if path.endswith(" (deleted)"):
            continue
        if LIBSSL_RE.search(path) and path not in out:
            out.append(path)
    return out


def system_libssl_paths(ldconfig: Callable[[], str] | None = None) -> list[str]:
    """libssl files the host's dynamic linker would load, from `ldconfig -p` and the usual dirs."""
    found: list[str] = []
    text = ""
    try:
        text = ldconfig() if ldconfig else subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("ldconfig -p failed: %s", e)
    for line in text.splitlines():
        if "=>" in line and "x86-64" in line:
            path = line.split("=>", 1)[1].strip()
            if LIBSSL_RE.search(path):
                found.append(path)
    for d in SYSTEM_LIB_DIRS:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if LIBSSL_RE.search(n):
                found.append(os.path.join(d, n))
    # One entry per file (symlinks and the /lib -> /usr/lib merge name the same inode).
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    for p in found:
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(os.path.realpath(p))
    return out


# Elf64_Sym (little-endian): st_name, st_info, st_other, st_shndx, st_value, st_size.
_ELF64_SYM = struct.Struct("<IBBHQQ")
_SHN_UNDEF = 0


def defined_ssl_symbols(path: str) -> list[str]:
    """The probed OpenSSL functions `path` defines (not merely imports).

    Every new executable on the host is asked this (a statically linked OpenSSL), in the agent's
    main loop, so the common answer (no OpenSSL name in the binary at all) is one bytes search of
    each symbol table's string table, and a table that has one is scanned with struct, not indexed
    by pyelftools (about 1 ms a symbol here: 20 s of the loop for one 17,000-symbol binary)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    wanted = {p[0] for p in PROBES} | {SET_FD[0]}
    out: set[str] = set()
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return []
            f.seek(0)
            elf = ELFFile(f)
            for name in (".dynsym", ".symtab"):
                sec = elf.get_section_by_name(name)
                if sec is None or not sec["sh_size"]:
                    continue
                strtab = elf.get_section(sec["sh_link"]).data()
                # A name is a NUL-terminated run of the string table; st_name may point into the
                # middle of a longer one, so every occurrence of the name and its NUL counts.
                at: dict[int, str] = {}
                for sym_name in wanted - out:
                    needle = sym_name.encode() + b"\0"
                    i = strtab.find(needle)
                    while i >= 0:
                        at[i] = sym_name
                        i = strtab.find(needle, i + 1)
                if not at:
                    continue
                if elf.elfclass == 64 and elf.little_endian and sec["sh_entsize"] == _ELF64_SYM.size:
                    for st_name, _, _, shndx, value, _ in _ELF64_SYM.iter_unpack(sec.data()):
                        if shndx != _SHN_UNDEF and value and st_name in at:
                            out.add(at[st_name])
                    continue
                for sym_name in set(at.values()):  # other ELF flavours: pyelftools' index
                    syms = sec.get_symbol_by_name(sym_name)
                    if syms and any(s["st_shndx"] != "SHN_UNDEF" and s["st_value"] for s in syms):
                        out.add(sym_name)
    except (OSError, ELFError, ValueError, struct.error) as e:
        log.debug("%s: cannot read symbols: %s", path, e)
        return []
    return sorted(out)


class SslAttacher:
    """Attaches bpf/openssl.bpf.c's programs to every OpenSSL copy in use on the host, once per file."""

    def __init__(self, probes: ProbeSet, proc_root: str = "/proc", strict: bool = False) -> None:
        self.probes = probes
        self.proc_root = proc_root
        self.strict = strict  # raise on a failed attach (CI) instead of logging it
        self.libraries: dict[tuple[int, int], SslLibrary] = {}
        self.not_ssl: set[tuple[int, int]] = set()  # executables checked: no OpenSSL inside
        self.errors: list[str] = []
        self._pending: dict[int, list[float]] = {}  # pid -> times of the next maps re-reads

    @property
    def attached_probes(self) -> int:
        return sum(lib.probes for lib in self.libraries.values())

    # -- discovery ---------------------------------------------------------------------------

    def scan_system(self) -> int:
        n = 0
        for path in system_libssl_paths():
            n += self._attach_file(path, "shared")
        return n

    def scan_existing(self, pids_filter: Iterable[int] | None = None) -> int:
        """Attach to the host's libssl and to every libssl mapped by running processes.

        Returns the number of probes attached by this call.
        """
        n = self.scan_system()
        pids = list(pids_filter) if pids_filter is not None else self._all_pids()
        for pid in pids:
            n += self.scan_pid(pid)
        return n

    def on_exec(self, pid: int, now: float | None = None) -> int:
        """A process started: look now, and again over the next seconds (libraries load later)."""
        t = time.monotonic() if now is None else now
        self._pending[pid] = [t + d for d in RESCAN_DELAYS]
        return self.scan_pid(pid, check_exe=True)

    def rescan_pending(self, now: float | None = None) -> int:
        """Re-read the maps of recently started processes whose next look is due (call it often)."""
        t = time.monotonic() if now is None else now
        n = 0
        for pid, times in list(self._pending.items()):
            if times and times[0] <= t:
                while times and times[0] <= t:
                    times.pop(0)
                if not os.path.exists(f"{self.proc_root}/{pid}"):
                    del self._pending[pid]
                    continue
                n += self.scan_pid(pid)
            if not times:
                self._pending.pop(pid, None)
        return n

    def scan_pid(self, pid: int, check_exe: bool = True) -> int:
        try:
            with open(f"{self.proc_root}/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            return 0  # gone already, or a kernel thread
        n = 0
        for path in libssl_paths_in_maps(maps):
            n += self._attach_file(f"{self.proc_root}/{pid}/root{path}", "shared")
        if check_exe:
            exe = f"{self.proc_root}/{pid}/exe"
            try:
                st = os.stat(exe)
            except OSError:
                return n
            key = (st.st_dev, st.st_ino)
            if key not in self.libraries and key not in self.not_ssl:
                # Go programs carry their own crypto/tls (tracer/uprobes.py); reading a Go binary's
                # large symbol table here would only delay the Go attacher.
                if go_binary.go_version(exe) is None and self._statically_linked(exe):
                    n += self._attach_file(exe, "static")
                else:
                    self.not_ssl.add(key)
        return n

    def _all_pids(self) -> list[int]:
        try:
            return [int(d) for d in os.listdir(self.proc_root) if d.isdigit()]
        except OSError:
            return []

    @staticmethod
    def _statically_linked(path: str) -> bool:
        syms = defined_ssl_symbols(path)
        return "SSL_write" in syms and "SSL_read" in syms

    # -- attaching ---------------------------------------------------------------------------

    def _attach_file(self, path: str, kind: str) -> int:
        try:
            st = os.stat(path)
        except OSError as e:
            self._error(f"{path}: {e.strerror}")
            return 0
        key = (st.st_dev, st.st_ino)
        if key in self.libraries:
            return 0
        lib = SslLibrary(path=path, kind=kind)
        self.libraries[key] = lib
        symbols = set(defined_ssl_symbols(path))
        if not {"SSL_write", "SSL_read"} <= symbols:
            self._error(f"{path}: no SSL_read/SSL_write symbols (not OpenSSL, or stripped): not traced")
            return 0
        for sym, enter, ret in PROBES:
            if sym not in symbols:
                continue  # OpenSSL < 1.1.1 has no _ex forms
            try:
                self.probes.attach_uprobe(enter, path, symbol=sym)
                lib.probes += 1
                self.probes.attach_uprobe(ret, path, symbol=sym, retprobe=True)
                lib.probes += 1
                lib.symbols.append(sym)
            except LoaderError as e:
                self._error(f"{path}: cannot attach to {sym}: {e}", fatal=os.path.exists(path))
        if SET_FD[0] in symbols:
            try:
                self.probes.attach_uprobe(SET_FD[1], path, symbol=SET_FD[0])
                lib.probes += 1
            except LoaderError as e:
                self._error(f"{path}: cannot attach to {SET_FD[0]}: {e}", fatal=os.path.exists(path))
        log.info("kspan: OpenSSL (%s) %s: %d probes", kind, path, lib.probes)
        return lib.probes

    def _error(self, msg: str, fatal: bool = False) -> None:
        self.errors.append(msg)
        if self.strict and fatal:
            raise RuntimeError(msg)
        log.warning("kspan: %s", msg)

    def detach(self) -> None:
        """Uprobe links go away with the BPF objects (Capture.stop()); forget what was attached."""
        self.libraries.clear()
        self.not_ssl.clear()
        self._pending.clear()
