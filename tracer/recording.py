"""`kspan record` / `kspan replay` file format: the raw kernel records, framed, plus what replay
needs to be deterministic (clock offset, id salt, the resources of the processes seen).

  b"KSPANREC1\\n" + one JSON line of metadata, then frames: kind (1 byte) + length (u32 LE) + payload.
  kind b"R": one raw kernel record exactly as read from the ring buffer.
  kind b"P": a ProcessInfo as JSON (written at first sight of a pid).

Version 2 (exchange_size 960): exchange records carry the kernel's trace and span ids and its
head-sampling decision, and unsampled exchanges appear as short metric records (type 4). Version 1
files (exchange_size 928, no identity bytes) still replay: the correlator links and ids them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

from correlator.spans import ProcessInfo

MAGIC = b"KSPANREC1\n"
_FRAME = struct.Struct("<cI")
MAX_FRAME = 1 << 20


class RecordingError(Exception):
    pass


@dataclass
class RecordingMeta:
    clock_offset_ns: int
    id_salt: str  # hex
    host: str
    exchange_size: int
    version: int = 2
    sampler: str = ""  # the head sampler the kernel applied while recording (e.g. "traceidratio 0.25")


class RecordingWriter:
    def __init__(self, f: BinaryIO, meta: RecordingMeta) -> None:
        self._f = f
        self._seen: set[int] = set()
        f.write(MAGIC)
        f.write(json.dumps(asdict(meta)).encode() + b"\n")
        self.records = 0

    def record(self, raw: bytes) -> None:
        self._f.write(_FRAME.pack(b"R", len(raw)))
        self._f.write(raw)
        self.records += 1

    def process(self, info: ProcessInfo) -> None:
        if info.pid in self._seen:
            return
        self._seen.add(info.pid)
        payload = json.dumps(asdict(info)).encode()
        self._f.write(_FRAME.pack(b"P", len(payload)))
        self._f.write(payload)

    def flush(self) -> None:
        self._f.flush()


def read_recording(f: BinaryIO) -> tuple[RecordingMeta, Iterator[tuple[str, bytes | ProcessInfo]]]:
    if f.read(len(MAGIC)) != MAGIC:
        raise RecordingError("not a kspan recording (bad magic); record one with `kspan record FILE`")
    try:
        meta = RecordingMeta(**json.loads(f.readline()))
    except (ValueError, TypeError) as e:
        raise RecordingError(f"recording metadata is unreadable: {e}") from e

    def frames() -> Iterator[tuple[str, bytes | ProcessInfo]]:
        while True:
            head = f.read(_FRAME.size)
            if not head:
                return
            if len(head) < _FRAME.size:
                raise RecordingError("recording ends inside a frame header (truncated file)")
            kind, size = _FRAME.unpack(head)
            if size > MAX_FRAME:
                raise RecordingError(f"frame of {size} bytes is implausible: the file is corrupt")
            payload = f.read(size)
            if len(payload) < size:
                raise RecordingError("recording ends inside a frame (truncated file)")
            if kind == b"R":
                yield "record", payload
            elif kind == b"P":
                yield "process", ProcessInfo(**json.loads(payload))
            else:
                raise RecordingError(f"unknown frame kind {kind!r}: the file is corrupt")

    return meta, frames()
