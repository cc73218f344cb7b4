"""The ring records' ctypes layouts (tracer/records.py) against the compiled objects' BTF: a field
at the wrong offset decodes another field's bytes without any error."""

from __future__ import annotations

import ctypes

import pytest

from tests.support.ebpf import fail_or_skip
from tracer import records
from tracer.loader import BpfObject
from tracer.probe_objects import missing, object_path

# C struct -> (its ctypes class, a bytes tail the class leaves out: the copied data, the object
# whose BTF has it: a record built on the stack, like kspan_proc, is not emitted there)
RECORDS: dict[str, tuple[type[ctypes.Structure], int, str]] = {
    "kspan_segment": (records.RawSegment, 512, "sockets_tracepoints"),
    "kspan_exchange": (records.RawExchange, -1, "sockets_tracepoints"),  # a header: the rest is unpacked
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_ctypes_record_matches_the_btf(name: str) -> None:
    cls, tail, obj = RECORDS[name]
    if obj in missing():
        fail_or_skip("the BPF objects are not built (make bpf)")
    with BpfObject.open(object_path(obj)) as o:
        layout = o.struct_layout(name)
        size = o.struct_size(name)
    checked = 0
    for field, ctype in cls._fields_:
        if field.startswith("_"):
            continue
        off, width = layout[field]
        desc = getattr(cls, field)
        assert (desc.offset, desc.size) == (off, width), f"{name}.{field}: ctypes {desc.offset}, BTF {off}"
        assert ctypes.sizeof(ctype) == width
        checked += 1
    assert checked >= 5
    if tail >= 0:
        assert ctypes.sizeof(cls) + tail == size, (name, ctypes.sizeof(cls), size)


def test_a_segment_recorded_before_the_sequence_fields_still_decodes() -> None:
    """Recordings hold raw ring records: the older segment header (without tcp_seq/ctx_seq) is told
    apart by its size and decodes with no sequence known."""
    raw = records.RawSegment(type=records.REC_SEGMENT, pid=5, tid=5, dir=1, proto=1, role=1, data_len=4,
                             flags=records.FLAG_TUPLE_KNOWN, seg_flags=records.SEG_SEQ, tcp_seq=77, len=4,
                             family=2, local_port=1, remote_port=6379)
    new = bytes(raw) + b"PING"
    rec = records.decode_segment(new)
    assert rec.seg.data == b"PING" and rec.seq_known and rec.seg.pos == 77
    old = bytes(raw)[: records.SEGMENT_HEADER_V1] + b"PING"
    rec = records.decode_segment(old)
    assert rec.seg.data == b"PING" and rec.seg.length == 4 and rec.seg.pid == 5
    with pytest.raises(ValueError):
        records.decode_segment(new[:20])
