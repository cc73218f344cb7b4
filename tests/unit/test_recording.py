import io

import pytest

from correlator.spans import ProcessInfo
from tracer.recording import RecordingError, RecordingMeta, RecordingWriter, read_recording


def _meta() -> RecordingMeta:
    return RecordingMeta(clock_offset_ns=123, id_salt="ab", host="h", exchange_size=928)


def test_round_trip_keeps_records_and_processes_in_order() -> None:
    buf = io.BytesIO()
    w = RecordingWriter(buf, _meta())
    info = ProcessInfo(pid=7, service_name="svc", executable_name="python3", command_line="python3 svc.py")
    w.process(info)
    w.process(info)  # written once per pid
    w.record(b"\x01\x00\x00\x00rest")
    w.record(b"\x02\x00\x00\x00")
    meta, frames = read_recording(io.BytesIO(buf.getvalue()))
    assert meta == _meta()
    got = list(frames)
    assert got == [("process", info), ("record", b"\x01\x00\x00\x00rest"), ("record", b"\x02\x00\x00\x00")]
    assert w.records == 2


def test_bad_and_truncated_files_give_clear_errors() -> None:
    with pytest.raises(RecordingError, match="not a kspan recording"):
        read_recording(io.BytesIO(b"garbage"))
    buf = io.BytesIO()
    RecordingWriter(buf, _meta()).record(b"x" * 100)
    _, frames = read_recording(io.BytesIO(buf.getvalue()[:-10]))
    with pytest.raises(RecordingError, match="truncated"):
        list(frames)
