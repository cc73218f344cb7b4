"""A minimal reader of the kernel's BTF: type ids, for doctor's real fentry load attempt.

Kernel struct fields are read by the probes through CO-RE (relocated by libbpf at load); this
only finds a kernel function's BTF id without loading libbpf, so `kspan doctor` stays cheap.
"""

from __future__ import annotations

import struct
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")

_KIND_INT, _KIND_PTR, _KIND_ARRAY, _KIND_STRUCT, _KIND_UNION, _KIND_ENUM = 1, 2, 3, 4, 5, 6
_KIND_FWD, _KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT = 7, 8, 9, 10, 11
_KIND_FUNC, _KIND_FUNC_PROTO, _KIND_VAR, _KIND_DATASEC, _KIND_FLOAT = 12, 13, 14, 15, 16
_KIND_DECL_TAG, _KIND_TYPE_TAG, _KIND_ENUM64 = 17, 18, 19

# Bytes following the 12-byte common header, per kind (vlen-dependent kinds are computed below).
_FIXED_EXTRA = {_KIND_INT: 4, _KIND_ARRAY: 12, _KIND_VAR: 4, _KIND_DECL_TAG: 4}
_PER_VLEN = {_KIND_STRUCT: 12, _KIND_UNION: 12, _KIND_ENUM: 8, _KIND_FUNC_PROTO: 8, _KIND_DATASEC: 12,
             _KIND_ENUM64: 12}
_MODIFIERS = {_KIND_TYPEDEF, _KIND_VOLATILE, _KIND_CONST, _KIND_RESTRICT, _KIND_TYPE_TAG}


class BtfError(Exception):
    pass


class Btf:
    """The type section of one BTF file, indexed by type id (ids start at 1)."""

    def __init__(self, path: Path = VMLINUX) -> None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BtfError(f"cannot read {path}: {exc}") from exc
        if len(data) < 24:
            raise BtfError(f"{path} is too short for BTF")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != 0xEB9F:
            raise BtfError(f"{path} is not little-endian BTF (magic {magic:#x})")
        type_off, type_len, str_off, _str_len = struct.unpack_from("<IIII", data, 8)
        self.path = path
        self.data = data
        self.strings_start = hdr_len + str_off
        self.positions = [0]
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack = struct.unpack_from
        while pos < end:
            _name_off, info, _size = unpack("<III", data, pos)
            kind = (info >> 24) & 0x1F
            self.positions.append(pos)
            pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * (info & 0xFFFF)

    def _header(self, type_id: int) -> tuple[int, int, int]:
        return struct.unpack_from("<III", self.data, self.positions[type_id])  # type: ignore[return-value]

    def name_at(self, off: int) -> str:
        start = self.strings_start + off
        return self.data[start : self.data.index(b"\0", start)].decode()

    def type_id(self, kind: int, name: str) -> int:
        """Id of the first type of `kind` named `name`; raises BtfError if none."""
        wanted = self.data.find(b"\0" + name.encode() + b"\0", self.strings_start) + 1 - self.strings_start
        if wanted > 0:
            for type_id in range(1, len(self.positions)):
                name_off, info, _ = self._header(type_id)
                if name_off == wanted and (info >> 24) & 0x1F == kind:
                    return type_id
        raise BtfError(f"no {name} (BTF kind {kind}) in {self.path}")

_CACHE: dict[Path, Btf] = {}


def vmlinux(path: Path = VMLINUX) -> Btf:
    """The running kernel's BTF, parsed once per process."""
    if path not in _CACHE:
        _CACHE[path] = Btf(path)
    return _CACHE[path]


def func_id(name: str, path: Path = VMLINUX) -> int:
    """BTF id of kernel function `name` (what an fentry program attaches to)."""
    return vmlinux(path).type_id(_KIND_FUNC, name)
