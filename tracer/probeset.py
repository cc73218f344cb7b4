"""What the uprobe attachers (tracer/ssl_libs.py, tracer/uprobes.py) need from the loaded BPF objects.

tracer/capture.py provides an object implementing ProbeSet over every loaded object (tracer.loader
BpfObject): programs are found by function name in whichever object defines them, maps by name (a
shared map is one kernel map whatever object is asked), types from the objects' BTF. The attachers
never touch libbpf, so their unit tests run against a recording stand-in.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Protocol


class ProbeMap(Protocol):
    """A BPF map with raw-bytes keys and values (tracer.loader.Map implements it)."""

    def lookup(self, key: bytes) -> bytes | None: ...

    def update(self, key: bytes, value: bytes, flags: int = 0) -> None: ...

    def delete(self, key: bytes) -> bool: ...


class ProbeSet(Protocol):
    def has_program(self, name: str) -> bool: ...

    def has_map(self, name: str) -> bool: ...

    def attach_uprobe(self, prog: str, path: str, offset: int = 0, symbol: str | None = None,
                      retprobe: bool = False) -> None:
        """Attach program `prog` to `path` at `symbol` (resolved by libbpf in the file, .dynsym
        included) or at FILE offset `offset` (tracer.loader.file_offset() turns an ELF virtual
        address into one); the link lives as long as the capture. Raises tracer.loader.LoaderError."""
        ...

    def map(self, name: str) -> ProbeMap: ...

    def struct_layout(self, type_name: str) -> dict[str, tuple[int, int]]:
        """field -> (byte offset, byte size) of a struct in the objects' BTF."""
        ...

    def struct_size(self, type_name: str) -> int: ...


class StructPacker:
    """Packs named integer fields into a zeroed C struct laid out as the BPF objects' BTF says.

    Layout and size are read once; field names are the C names, so a renamed, resized or moved
    field on the C side changes what is written here instead of silently misplacing bytes.
    """

    def __init__(self, probes: ProbeSet, type_name: str) -> None:
        self.type_name = type_name
        self.layout = probes.struct_layout(type_name)
        self.size = probes.struct_size(type_name)

    def pack(self, values: Mapping[str, int], complete: bool = False) -> bytes:
        """The struct's bytes (host byte order: the kernel reads them as C) with `values` set and
        every other byte zero. complete=True: every field not named `_...` (padding) must be given.
        """
        if complete:
            missing = sorted(f for f in self.layout if not f.startswith("_") and f not in values)
            if missing:
                raise ValueError(f"struct {self.type_name}: no value for {', '.join(missing)}")
        buf = bytearray(self.size)
        for name, value in values.items():
            try:
                off, size = self.layout[name]
            except KeyError:
                raise ValueError(f"struct {self.type_name} has no field {name!r}") from None
            bits = 8 * size
            if not -(1 << (bits - 1)) <= value < (1 << bits):
                raise ValueError(f"struct {self.type_name}.{name}: {value} does not fit in {size} bytes")
            buf[off:off + size] = (value & ((1 << bits) - 1)).to_bytes(size, sys.byteorder)
        return bytes(buf)

