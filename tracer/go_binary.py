"""What kspan needs to know about a Go executable before probing it.

- Is it Go, and which toolchain built it: the `.go.buildinfo` section (runtime.buildVersion).
- Where its functions are: `.symtab`, or `.gopclntab` when the symbol table was stripped (`-ldflags=-s`
  keeps the pclntab because the runtime itself needs it for stack traces).
- Where each function returns: every RET instruction, found with capstone. Go grows goroutine stacks
  by copying them, so a uretprobe's patched return address on the stack breaks the program; probing
  the RET instructions themselves is the safe equivalent.
- Struct field offsets (runtime.g.goid, crypto/tls.Conn.conn, ...) from DWARF via pyelftools. A binary
  built without DWARF (`-ldflags=-w`, or stripped) gets the offsets kspan measured for the same Go
  minor version (KNOWN_OFFSETS), or none: the caller then falls back to socket-level capture.

Pure file parsing: imports no bcc.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

log = logging.getLogger(__name__)

BUILDINFO_MAGIC = b"\xff Go buildinf:"

# Functions kspan probes in Go programs (names as the Go linker writes them).
FN_TLS_WRITE = "crypto/tls.(*Conn).Write"
FN_TLS_READ = "crypto/tls.(*Conn).Read"
FN_NEWPROC1 = "runtime.newproc1"
FN_SERVE_HTTP = "net/http.serverHandler.ServeHTTP"
FN_PC_ROUNDTRIP = "net/http.(*persistConn).roundTrip"

WANTED_FUNCTIONS: tuple[str, ...] = (FN_TLS_WRITE, FN_TLS_READ, FN_NEWPROC1, FN_SERVE_HTTP, FN_PC_ROUNDTRIP)

# (struct type as DWARF names it, field) -> key "type.field" in GoBinary.offsets.
WANTED_FIELDS: tuple[tuple[str, str], ...] = (
    ("runtime.g", "goid"),
    ("crypto/tls.Conn", "conn"),
    ("net.TCPConn", "conn"),
    ("net.conn", "fd"),
    ("net.netFD", "pfd"),
    ("internal/poll.FD", "Sysfd"),
    ("net/http.response", "conn"),
    ("net/http.conn", "rwc"),
    ("net/http.conn", "tlsState"),
    ("net/http.persistConn", "conn"),
    ("net/http.persistConn", "tlsState"),
    ("net/http.Request", "Method"),
    ("net/http.Request", "URL"),
    ("net/http.Request", "Header"),
    ("net/http.Request", "Host"),
    ("net/http.Response", "StatusCode"),
)

# Offsets measured from the DWARF of binaries built by each toolchain (tests/unit/test_go_binary.py
# re-measures them), used only when a binary has no DWARF of its own. These structs are private to the
# Go runtime and standard library, so a minor version not listed here gets no guess.
_COMMON = {
    "crypto/tls.Conn.conn": 0,
    "net.TCPConn.conn": 0,
    "net.conn.fd": 0,
    "net.netFD.pfd": 0,
    "internal/poll.FD.Sysfd": 16,
    "net/http.response.conn": 0,
    "net/http.conn.rwc": 16,
    "net/http.conn.tlsState": 48,
    "net/http.Request.Method": 0,
    "net/http.Request.URL": 16,
    "net/http.Request.Header": 56,
    "net/http.Request.Host": 128,
    "net/http.Response.StatusCode": 16,
}
KNOWN_OFFSETS: dict[tuple[int, int], dict[str, int]] = {
    (1, 21): {**_COMMON, "runtime.g.goid": 152, "net/http.persistConn.conn": 80,
              "net/http.persistConn.tlsState": 96},
    (1, 23): {**_COMMON, "runtime.g.goid": 160, "net/http.persistConn.conn": 80,
              "net/http.persistConn.tlsState": 96},
    (1, 25): {**_COMMON, "runtime.g.goid": 152, "net/http.persistConn.conn": 80,
              "net/http.persistConn.tlsState": 96},
    (1, 27): {**_COMMON, "runtime.g.goid": 152, "net/http.persistConn.conn": 80,
              "net/http.persistConn.tlsState": 96},
}


class GoBinaryError(Exception):
    """The file is not an ELF Go executable kspan can read."""


@dataclass(frozen=True, slots=True)
class GoVersion:
    text: str  # runtime.buildVersion, e.g. "go1.27.3" or "devel go1.28-abc"
    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> GoVersion:
        # "go1.23.4", "go1.23rc1", or "devel go1.24-abcdef <date>" from an unreleased toolchain.
        core = next((w for w in text.split() if w.startswith("go1")), text).removeprefix("go")
        parts = core.replace("-", ".").replace("rc", ".").replace("beta", ".").split(".")
        try:
            return cls(text, int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            return cls(text, 0, 0)

    def at_least(self, major: int, minor: int) -> bool:
        return (self.major, self.minor) >= (major, minor)


@dataclass(frozen=True, slots=True)
class GoFunction:
    name: str
    address: int  # virtual address of the entry
    size: int
    returns: tuple[int, ...]  # virtual addresses of every RET instruction


@dataclass(slots=True)
class GoBinary:
    path: str
    version: GoVersion
    pie: bool
    has_symtab: bool
    has_dwarf: bool
    functions: dict[str, GoFunction] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)
    offsets_source: str = "none"  # "dwarf", "known:go1.N", or "none"
    problems: list[str] = field(default_factory=list)

    def missing_offsets(self, wanted: Iterable[tuple[str, str]] = WANTED_FIELDS) -> list[str]:
        return [f"{t}.{f}" for t, f in wanted if f"{t}.{f}" not in self.offsets]

    @property
    def abi_register(self) -> bool:
        """Go >= 1.17 on amd64 passes arguments in registers; older Go used the stack."""
        return self.version.at_least(1, 17)


# --- build info ---------------------------------------------------------------------------------

def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise GoBinaryError("truncated varint in .go.buildinfo")


def _read_at_vaddr(elf: ELFFile, vaddr: int, size: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_LOAD":
            continue
        start = seg["p_vaddr"]
        if start <= vaddr and vaddr + size <= start + seg["p_filesz"]:
            stream = elf.stream
            stream.seek(seg["p_offset"] + vaddr - start)
            return stream.read(size)
    raise GoBinaryError(f"address {vaddr:#x} is not in any loaded segment")


def _buildinfo_version(elf: ELFFile) -> str | None:
    sec = elf.get_section_by_name(".go.buildinfo")
    if sec is None:
        return None
    data = sec.data()
    if not data.startswith(BUILDINFO_MAGIC) or len(data) < 32:
        return None
    ptr_size, flags = data[14], data[15]
    if flags & 0x2:
        # Go >= 1.18: the version string is inline, length-prefixed, right after the 32-byte header.
        length, pos = _read_varint(data, 32)
        return data[pos : pos + length].decode("utf-8", "replace")
    # Go < 1.18: a pointer to a Go string header {ptr, len}.
    order = ">" if flags & 0x1 else "<"
    fmt = order + ("Q" if ptr_size == 8 else "I")
    str_hdr_addr = struct.unpack_from(fmt, data, 16)[0]
    hdr = _read_at_vaddr(elf, str_hdr_addr, 2 * ptr_size)
    ptr, length = struct.unpack(order + ("QQ" if ptr_size == 8 else "II"), hdr)
    return _read_at_vaddr(elf, ptr, length).decode("utf-8", "replace")


def go_version(path: str) -> GoVersion | None:
    """The Go toolchain that built `path`, or None if it is not a Go ELF executable."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            f.seek(0)
            text = _buildinfo_version(ELFFile(f))
    except (OSError, ELFError, GoBinaryError, struct.error):
        return None
    return GoVersion.parse(text) if text else None


# --- symbols ------------------------------------------------------------------------------------

def _symtab_functions(elf: ELFFile, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    symtab = elf.get_section_by_name(".symtab")
    if symtab is None:
        return {}
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        syms = symtab.get_symbol_by_name(name)
        if syms:
            s = syms[0]
            out[name] = (s["st_value"], s["st_size"])
    return out


def pclntab_functions(elf: ELFFile, names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Function entry and size from `.gopclntab` (Go >= 1.18 layout, magic 0xfffffff0/0xfffffff1).

    `names=None` returns every function. The table lists functions in address order, so a
    function's size is the distance to the next entry.
    """
    sec = elf.get_section_by_name(".gopclntab")
    if sec is None:
        return {}
    data = sec.data()
    if len(data) < 8:
        return {}
    magic = struct.unpack_from("<I", data, 0)[0]
    if magic not in (0xFFFFFFF0, 0xFFFFFFF1):
        log.debug("unsupported pclntab magic %#x", magic)
        return {}
    ptr = data[7]
    word = "<Q" if ptr == 8 else "<I"

    def w(i: int) -> int:
        return struct.unpack_from(word, data, 8 + i * ptr)[0]

    nfunc, text_start = w(0), w(2)
    funcname_off, pcln_off = w(3), w(7)
    if text_start == 0:
        # Newer linkers leave runtime.text to a relocation; it is the start of .text.
        text = elf.get_section_by_name(".text")
        text_start = text["sh_addr"] if text is not None else 0
    wanted = set(names) if names is not None else None
    out: dict[str, tuple[int, int]] = {}
    ftab = pcln_off
    for i in range(nfunc):
        entry_off, func_off = struct.unpack_from("<II", data, ftab + 8 * i)
        next_entry = struct.unpack_from("<I", data, ftab + 8 * (i + 1))[0]
        name_off = struct.unpack_from("<i", data, pcln_off + func_off + 4)[0]
        start = funcname_off + name_off
        end = data.index(b"\0", start)
        name = data[start:end].decode("utf-8", "replace")
        # An ABI0 wrapper of an ABIInternal function repeats its name later in the table; the first
        # entry is the function Go code calls.
        if (wanted is None or name in wanted) and name not in out:
            out[name] = (text_start + entry_off, next_entry - entry_off)
            if wanted is not None and len(out) == len(wanted):
                break
    return out


def _ret_addresses(elf: ELFFile, address: int, size: int) -> tuple[int, ...]:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    from capstone.x86 import X86_INS_RET

    code = _read_at_vaddr(elf, address, size)
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.skipdata = True  # Go pads between functions with INT3; never stop at an odd byte
    return tuple(i.address for i in md.disasm(code, address) if i.id == X86_INS_RET)


# --- DWARF --------------------------------------------------------------------------------------

def dwarf_offsets(elf: ELFFile, wanted: Iterable[tuple[str, str]] = WANTED_FIELDS) -> dict[str, int]:
    """Field offsets for `wanted` from DWARF; fields not found are absent from the result."""
    if not elf.has_dwarf_info():
        return {}
    by_type: dict[str, set[str]] = {}
    for t, f in wanted:
        by_type.setdefault(t, set()).add(f)
    out: dict[str, int] = {}
    pending = set(by_type)
    dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
    for cu in dwarf.iter_CUs():
        # The Go linker puts type DIEs at the top level of a CU: no need to walk deeper.
        for die in cu.get_top_DIE().iter_children():
            if die.tag != "DW_TAG_structure_type":
                continue
            name_attr = die.attributes.get("DW_AT_name")
            if name_attr is None:
                continue
            tname = name_attr.value.decode("utf-8", "replace")
            if tname not in pending:
                continue
            pending.discard(tname)
            for member in die.iter_children():
                if member.tag != "DW_TAG_member":
                    continue
                mname = member.attributes.get("DW_AT_name")
                loc = member.attributes.get("DW_AT_data_member_location")
                if mname is None or loc is None or not isinstance(loc.value, int):
                    continue
                fname = mname.value.decode("utf-8", "replace")
                if fname in by_type[tname]:
                    out[f"{tname}.{fname}"] = loc.value
            if not pending:
                return out
    return out


# --- the whole inspection -----------------------------------------------------------------------

def inspect(
    path: str,
    functions: Iterable[str] = WANTED_FUNCTIONS,
    fields: Iterable[tuple[str, str]] = WANTED_FIELDS,
) -> GoBinary | None:
    """Everything kspan needs to probe the Go executable at `path`; None if it is not Go.

    Raises GoBinaryError when the file is Go but unreadable in a way the caller should report.
    """
    fields = tuple(fields)
    functions = tuple(functions)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; ELFFile reads lazily from it
    except OSError as e:
        raise GoBinaryError(f"{path}: {e.strerror}") from e
    with f:
        if f.read(4) != b"\x7fELF":
            return None
        f.seek(0)
        try:
            elf = ELFFile(f)
            text = _buildinfo_version(elf)
        except (ELFError, struct.error) as e:
            raise GoBinaryError(f"{path}: unreadable ELF: {e}") from e
        if not text:
            return None
        if elf["e_machine"] != "EM_X86_64":
            raise GoBinaryError(f"{path}: {elf['e_machine']} is not supported (amd64 only)")
        version = GoVersion.parse(text)
        gb = GoBinary(
            path=path,
            version=version,
            pie=elf["e_type"] == "ET_DYN",
            has_symtab=elf.get_section_by_name(".symtab") is not None,
            has_dwarf=elf.has_dwarf_info(),
        )
        if not gb.abi_register:
            gb.problems.append(f"{text} passes arguments on the stack (Go < 1.17): not supported")
            return gb
        try:
            found = _symtab_functions(elf, functions)
            missing = [n for n in functions if n not in found]
            if missing:
                found.update(pclntab_functions(elf, missing))
        except (ELFError, struct.error, ValueError) as e:
            raise GoBinaryError(f"{path}: cannot read its function table: {e}") from e
        for name in functions:
            if name not in found:
                gb.problems.append(f"function {name} not found (not linked into this program)")
                continue
            addr, size = found[name]
            try:
                rets = _ret_addresses(elf, addr, size)
            except GoBinaryError as e:
                gb.problems.append(f"function {name}: {e}")
                continue
            if not rets:
                gb.problems.append(f"function {name}: no RET instruction found")
                continue
            gb.functions[name] = GoFunction(name, addr, size, rets)
        try:
            offsets = dwarf_offsets(elf, fields)
        except (ELFError, struct.error, ValueError, KeyError) as e:
            gb.problems.append(f"DWARF unreadable ({e})")
            offsets = {}
        if offsets:
            gb.offsets, gb.offsets_source = offsets, "dwarf"
        else:
            known = KNOWN_OFFSETS.get((version.major, version.minor))
            if known is not None:
                gb.offsets = {k: v for k, v in known.items() if k in {f"{t}.{n}" for t, n in fields}}
                gb.offsets_source = f"known:go{version.major}.{version.minor}"
                gb.problems.append(
                    f"no DWARF (built with -ldflags=-w or stripped): using kspan's measured offsets "
                    f"for go{version.major}.{version.minor}"
                )
            else:
                gb.problems.append(
                    f"no DWARF (built with -ldflags=-w or stripped) and no measured offsets for "
                    f"{text}: Go probes disabled, socket-level capture only"
                )
        return gb
