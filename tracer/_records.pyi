"""tracer/_records.c: the decoding of kspan's kernel records (bpf/kspan.h); see tracer/records.py."""

from collections.abc import Callable
from enum import IntEnum

from correlator.records import Exchange, MetricExchange
from correlator.segments import SegmentRecord

_Buffer = bytes | bytearray | memoryview

LAYOUT: dict[str, tuple[int, dict[str, tuple[int, int]]]]  # struct -> (size, field -> (offset, size))
CONSTANTS: dict[str, int]  # bpf/kspan.h's record types, flags and sizes

def setup(*, exchange: type, parent_hint: type, exchange_id: type, metric: type, segment: type,
          segment_record: type, roles: type[IntEnum], ends: type[IntEnum], sources: type[IntEnum],
          parent_kinds: type[IntEnum], format_addr: Callable[[int, bytes], str]) -> None: ...
def record_type(data: _Buffer) -> int: ...
def decode_exchange(data: _Buffer, legacy: bool | None = None) -> Exchange: ...
def decode_metric(data: _Buffer) -> MetricExchange: ...
def decode_segment(data: _Buffer) -> SegmentRecord: ...
