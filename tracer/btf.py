"""A minimal reader of the kernel's BTF: struct member offsets of the running kernel.

The kernel headers on a host may belong to another kernel (Debian's 6.1 on a 6.18 kernel), so
kernel struct offsets are taken from /sys/kernel/btf/vmlinux, never from headers.
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


def struct_offsets(struct_name: str, members: list[str], path: Path = VMLINUX) -> dict[str, int]:
    """Byte offsets of `members` of `struct struct_name`, looking inside anonymous unions/structs.

    Raises BtfError when the file is missing or malformed or a member is not found.
    """
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
    types_start = hdr_len + type_off
    strings_start = hdr_len + str_off
    wanted = data.find(b"\0" + struct_name.encode() + b"\0", strings_start) + 1 - strings_start
    if wanted <= 0:
        raise BtfError(f"struct {struct_name} not in {path}")

    # One pass to index every type's position (type ids start at 1).
    positions = [0]
    pos, end = types_start, types_start + type_len
    target = 0
    unpack = struct.unpack_from
    while pos < end:
        name_off, info, _size = unpack("<III", data, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        positions.append(pos)
        if kind == _KIND_STRUCT and name_off == wanted and not target:
            target = len(positions) - 1
        pos += 12 + _FIXED_EXTRA.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen

    def name_at(off: int) -> str:
        start = strings_start + off
        return data[start : data.index(b"\0", start)].decode()

    def resolve(type_id: int) -> int:
        for _ in range(32):
            _n, info, ref = unpack("<III", data, positions[type_id])
            if ((info >> 24) & 0x1F) not in _MODIFIERS:
                return type_id
            type_id = ref
        return type_id

    found: dict[str, int] = {}

    def walk(type_id: int, base: int, depth: int) -> None:
        p = positions[type_id]
        _n, info, _size = unpack("<III", data, p)
        kflag = info >> 31
        for i in range(info & 0xFFFF):
            m_name, m_type, m_off = unpack("<III", data, p + 12 + 12 * i)
            bits = (m_off & 0xFFFFFF) if kflag else m_off
            offset = base + bits // 8
            if m_name:
                found.setdefault(name_at(m_name), offset)
            elif depth < 8:
                inner = resolve(m_type)
                kind = (unpack("<III", data, positions[inner])[1] >> 24) & 0x1F
                if kind in (_KIND_STRUCT, _KIND_UNION):
                    walk(inner, offset, depth + 1)

    if not target:
        raise BtfError(f"struct {struct_name} not in {path}")
    walk(target, 0, 0)
    missing = [m for m in members if m not in found]
    if missing:
        raise BtfError(f"struct {struct_name} has no member(s) {', '.join(missing)}")
    return {m: found[m] for m in members}


SOCK_COMMON_MEMBERS = [
    "skc_daddr", "skc_rcv_saddr", "skc_dport", "skc_num", "skc_family", "skc_v6_daddr", "skc_v6_rcv_saddr",
]


def sock_common_defines() -> dict[str, int]:
    """-D settings for bpf/http_exchange.h's reading of sockets older than the agent."""
    off = struct_offsets("sock_common", SOCK_COMMON_MEMBERS)
    return {
        "KSPAN_SKC_DADDR": off["skc_daddr"],
        "KSPAN_SKC_RCV_SADDR": off["skc_rcv_saddr"],
        "KSPAN_SKC_DPORT": off["skc_dport"],
        "KSPAN_SKC_NUM": off["skc_num"],
        "KSPAN_SKC_FAMILY": off["skc_family"],
        "KSPAN_SKC_V6_DADDR": off["skc_v6_daddr"],
        "KSPAN_SKC_V6_RCV_SADDR": off["skc_v6_rcv_saddr"],
    }
