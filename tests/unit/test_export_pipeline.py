"""ExportPipeline: batching, bounded queue, retry, collector down then back, shutdown."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from correlator.spans import ProcessInfo, Span
from exporters.config import build_exporters, load_config
from exporters.pipeline import ENCODE_AT_SUBMIT, ExportPipeline
from tests.support.otlp_receiver import OtlpReceiver, unused_port
from tests.support.sample_spans import chain_trace, many_traces, processes


class RecordingExporter:
    """A real in-process exporter (no network) that records batches and can be told to fail."""

    def __init__(self, fail: bool = False, permanent: bool = False, delay_s: float = 0.0) -> None:
        self.batches: list[tuple[list[Span], dict[int, ProcessInfo]]] = []
        self.fail = fail
        self.permanent = permanent
        self.delay_s = delay_s
        self.last_error = ""
        self.last_failure_permanent = False
        self.calls = 0
        self.shut = False

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            self.last_error = "told to fail"
            self.last_failure_permanent = self.permanent
            return False
        self.batches.append((list(spans), dict(processes)))
        return True

    def shutdown(self) -> None:
        self.shut = True

    @property
    def spans(self) -> list[Span]:
        return [s for b, _ in self.batches for s in b]


def _wait(cond, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_batches_by_size_and_by_delay() -> None:
    exp = RecordingExporter()
    p = ExportPipeline([exp], max_batch=6, max_delay_s=0.2)
    try:
        p.submit(many_traces(4), processes())  # 12 spans: two full batches at once
        _wait(lambda: len(exp.spans) == 12, 1.0)
        assert [len(b) for b, _ in exp.batches] == [6, 6]
        t0 = time.monotonic()
        p.submit(chain_trace("late"), processes())  # 3 spans: sent when max_delay_s passes
        _wait(lambda: len(exp.spans) == 15, 2.0)
        assert time.monotonic() - t0 >= 0.15
    finally:
        stats = p.shutdown(2)
    assert stats["exported"] == 15 and stats["submitted"] == 15 and stats["dropped"] == 0
    assert exp.shut


def test_batches_are_cut_across_submissions_in_order_with_their_processes() -> None:
    """The queue holds whole submissions; a batch spans several and splits one at its end."""
    exp = RecordingExporter(fail=True)
    p = ExportPipeline([exp], max_batch=5, max_delay_s=0.05, backoff_initial_s=0.02, backoff_max_s=0.02)
    procs = processes()
    submitted: list[Span] = []
    try:
        for i in range(7):  # 7 x 3 spans, each submission naming only its own processes
            trace = chain_trace(f"c{i}")
            submitted += trace
            p.submit(trace, {pid: procs[pid] for pid in (101, 202)})
            procs = processes()  # fresh objects: a batch must carry each submission's own
        _wait(lambda: exp.calls >= 2)  # failed batches stay queued, whole and in order
        assert p.stats()["queued"] == 21
        exp.fail = False
        _wait(lambda: len(exp.spans) == 21)
        assert [len(b) for b, _ in exp.batches] == [5, 5, 5, 5, 1]
        assert [s.span_id for s in exp.spans] == [s.span_id for s in submitted]
        for batch, batch_procs in exp.batches:
            assert {s.pid for s in batch} <= set(batch_procs)
        assert p.stats()["exported"] == 21 and p.stats()["queued"] == 0
        assert not p._lanes[0].chunks
    finally:
        p.shutdown(1)


def test_a_full_batch_is_sent_at_once_not_after_the_delay() -> None:
    exp = RecordingExporter()
    p = ExportPipeline([exp], max_batch=9, max_delay_s=30.0)
    try:
        t0 = time.monotonic()
        for i in range(3):  # the third submission completes a batch: the worker wakes for it
            p.submit(chain_trace(f"f{i}"), processes())
        _wait(lambda: len(exp.spans) == 9, 2.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        p.shutdown(1)


def test_submit_copies_what_it_is_given() -> None:
    exp = RecordingExporter()
    p = ExportPipeline([exp], max_batch=3, max_delay_s=0.01)
    try:
        spans, procs = chain_trace(), processes()
        p.submit(spans, procs)
        spans.clear()  # a caller reusing its list (and mapping) does not change what is exported
        procs.clear()
        _wait(lambda: len(exp.spans) == 3)
        assert set(exp.batches[0][1]) == {101, 202}
    finally:
        p.shutdown(1)


def test_each_batch_carries_the_processes_of_its_spans_even_after_they_exit() -> None:
    exp = RecordingExporter(fail=True)
    p = ExportPipeline([exp], max_delay_s=0.05, backoff_initial_s=0.05, backoff_max_s=0.05)
    try:
        procs = processes()
        p.submit(chain_trace(), procs)
        procs.clear()  # the processes exited and the agent forgot them
        _wait(lambda: exp.calls >= 2)
        exp.fail = False
        _wait(lambda: len(exp.spans) == 3)
        (_, batch_procs) = exp.batches[0]
        assert set(batch_procs) == {101, 202}
        assert batch_procs[202].service_name == "backend"
        assert p.stats()["queued"] == 0
        assert not p._lanes[0].chunks  # released (with their processes) once exported
    finally:
        p.shutdown(1)


def test_full_queue_drops_whole_traces_and_counts_them() -> None:
    exp = RecordingExporter(fail=True)
    p = ExportPipeline([exp], max_queue_spans=10, max_batch=100, max_delay_s=0.05,
                       backoff_initial_s=0.05, backoff_max_s=0.05)
    try:
        p.submit(many_traces(3, "a"), processes())  # 9 spans fit
        p.submit(many_traces(2, "b"), processes())  # 6 more: no whole trace fits
        s = p.stats()
        assert s["queued"] == 9 and s["dropped_queue_full"] == 6
        exp.fail = False
        _wait(lambda: len(exp.spans) == 9)
        assert {sp.trace_id for sp in exp.spans} == {sp.trace_id for sp in many_traces(3, "a")}
    finally:
        p.shutdown(1)


def test_permanent_rejection_is_dropped_and_counted_not_retried_forever(caplog: pytest.LogCaptureFixture) -> None:
    exp = RecordingExporter(fail=True, permanent=True)
    p = ExportPipeline([exp], max_delay_s=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="kspan.exporters"):
            p.submit(chain_trace("a"), processes())
            _wait(lambda: p.stats()["dropped_rejected"] == 3)
            assert p.stats()["queued"] == 0
            assert exp.calls == 1
            p.submit(chain_trace("b"), processes())
            _wait(lambda: p.stats()["dropped_rejected"] == 6)
        rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert len(rejected) == 1 and "told to fail" in rejected[0].getMessage()  # rate-limited
    finally:
        p.shutdown(1)


def test_slow_exporter_never_blocks_submit_and_other_exporters_keep_going() -> None:
    slow, fast = RecordingExporter(delay_s=0.5), RecordingExporter()
    p = ExportPipeline([slow, fast], max_batch=3, max_delay_s=0.01)
    try:
        t0 = time.perf_counter()
        for i in range(200):
            p.submit(chain_trace(f"s{i}"), processes())
        per_submit = (time.perf_counter() - t0) / 200
        assert per_submit < 0.005
        _wait(lambda: len(fast.spans) == 600, 5.0)
        assert len(slow.spans) < 600  # still busy: its lane did not hold up the other
    finally:
        p.shutdown(0.2)


def test_an_exporter_that_raises_is_contained() -> None:
    class Broken(RecordingExporter):
        def export(self, spans, processes):  # type: ignore[override]
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("bug")
            return super().export(spans, processes)

    exp = Broken()
    p = ExportPipeline([exp], max_delay_s=0.01, backoff_initial_s=0.01)
    try:
        p.submit(chain_trace(), processes())
        _wait(lambda: len(exp.spans) == 3)
        assert p.stats()["export_failures"] == 1
    finally:
        p.shutdown(1)


def test_shutdown_reports_what_it_could_not_deliver(caplog: pytest.LogCaptureFixture) -> None:
    exp = RecordingExporter(fail=True)
    p = ExportPipeline([exp], max_delay_s=0.01, backoff_initial_s=0.05)
    p.submit(chain_trace(), processes())
    with caplog.at_level(logging.WARNING, logger="kspan.exporters"):
        t0 = time.monotonic()
        stats = p.shutdown(0.3)
        took = time.monotonic() - t0
    assert took < 1.5
    assert stats["dropped_shutdown"] == 3 and stats["queued"] == 0
    assert any("could not be exported" in r.getMessage() for r in caplog.records)
    p.submit(chain_trace("after"), processes())  # after shutdown: counted, not raised
    assert p.stats()["dropped_shutdown"] == 6


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_collector_down_then_back(protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 5: spans queue in a bounded buffer, the excess is dropped and counted, nothing blocks
    capture, export resumes once the collector is back."""
    grpc_port, http_port = unused_port(), unused_port()
    port = grpc_port if protocol == "grpc" else http_port
    cfg = load_config({"OTEL_EXPORTER_OTLP_TIMEOUT": "2000"}, endpoint=f"http://127.0.0.1:{port}",
                      protocol=protocol)
    (exporter,) = build_exporters(cfg)
    p = ExportPipeline([exporter], max_queue_spans=300, max_batch=50, max_delay_s=0.05,
                       backoff_initial_s=0.05, backoff_max_s=0.3)
    rx: OtlpReceiver | None = None
    try:
        with caplog.at_level(logging.WARNING, logger="kspan.exporters"):
            worst = 0.0
            for i in range(150):  # 450 spans while nobody listens
                t0 = time.perf_counter()
                p.submit(chain_trace(f"down{i}"), processes())
                worst = max(worst, time.perf_counter() - t0)
            # A submit that waited on the network would take the export timeout (2 s) or a backoff;
            # the bound leaves room for a loaded CI core descheduling this thread.
            assert worst < 0.5, f"submit blocked for {worst:.3f} s"
            _wait(lambda: p.stats()["export_failures"] >= 2)
            s = p.stats()
            assert s["exported"] == 0
            assert s["queued"] == 300
            assert s["dropped_queue_full"] == 150
            down_logs = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
            assert len(down_logs) == 1, down_logs  # once per outage, not once per attempt
            assert f"127.0.0.1:{port}" in down_logs[0] and "--otlp-endpoint" in down_logs[0]

            rx = OtlpReceiver(grpc_port=grpc_port, http_port=http_port).start()
            rx.wait_for_spans(lambda ss: len(ss) == 300, timeout_s=15)
            _wait(lambda: p.stats()["queued"] == 0)
            assert any("resumed" in r.getMessage() for r in caplog.records)

            p.submit(chain_trace("after"), processes())
            got = rx.wait_for_spans(lambda ss: len(ss) == 303, timeout_s=5)
        # Nothing was duplicated or half-sent: whole traces, each span once.
        ids = [s["span_id"] for s in got]
        assert len(ids) == len(set(ids))
        per_trace: dict[str, int] = {}
        for s in got:
            per_trace[s["trace_id"]] = per_trace.get(s["trace_id"], 0) + 1
        assert set(per_trace.values()) == {3}
        final = p.shutdown(2)
        assert final["exported"] == 303 and final["dropped_queue_full"] == 150 and final["dropped_shutdown"] == 0
    finally:
        p.shutdown(0.5)
        if rx is not None:
            rx.stop()


def test_submit_is_thread_safe_under_concurrent_producers() -> None:
    exp = RecordingExporter()
    p = ExportPipeline([exp], max_batch=64, max_delay_s=0.01)
    try:
        def produce(k: int) -> None:
            for i in range(100):
                p.submit(chain_trace(f"p{k}-{i}"), processes())

        threads = [threading.Thread(target=produce, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert p.flush(5)
        assert len(exp.spans) == 1200 and len({s.span_id for s in exp.spans}) == 1200
    finally:
        p.shutdown(1)


def test_retry_after_from_the_endpoint_is_obeyed() -> None:
    class Throttled(RecordingExporter):
        def export(self, spans, processes):  # type: ignore[override]
            self.times.append(time.monotonic())
            self.retry_after_s = 0.4 if len(self.times) == 1 else 0.0
            self.fail = len(self.times) == 1
            return super().export(spans, processes)

    exp = Throttled()
    exp.times = []  # type: ignore[attr-defined]
    p = ExportPipeline([exp], max_delay_s=0.01, backoff_initial_s=0.01, backoff_max_s=0.02)
    try:
        p.submit(chain_trace(), processes())
        _wait(lambda: len(exp.spans) == 3)
        gap = exp.times[1] - exp.times[0]  # type: ignore[attr-defined]
        assert gap >= 0.35, gap
    finally:
        p.shutdown(1)


def _otlp_pipeline(rx: OtlpReceiver, **kw: Any) -> ExportPipeline:
    (exporter,) = build_exporters(load_config({}, endpoint=rx.http_endpoint, protocol="http/protobuf"))
    return ExportPipeline([exporter], **kw)


def _request_sizes(rx: OtlpReceiver) -> list[int]:
    return [sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans) for _, req, _ in rx.trace_requests]


def test_otlp_lane_encodes_small_submissions_together_and_joins_requests() -> None:
    """Submissions smaller than ENCODE_AT_SUBMIT wait as spans; the worker encodes a run of them
    in one call, and a batch is the requests joined: one decodable request."""
    with OtlpReceiver() as rx:
        p = _otlp_pipeline(rx, max_batch=7, max_delay_s=0.05)
        try:
            sent: list[Span] = []
            for i in range(5):  # 5 x 3 spans into batches of at most 7: whole submissions only
                trace = chain_trace(f"e{i}")
                sent += trace
                p.submit(trace, processes())
            got = rx.wait_for_spans(lambda ss: len(ss) == 15, timeout_s=5)
            assert p.flush(5)
        finally:
            stats = p.shutdown(2)
        assert sorted(s["span_id"] for s in got) == sorted(s.span_id.hex() for s in sent)
        sizes = _request_sizes(rx)
        assert max(sizes) <= 7 and sum(sizes) == 15 and stats["batches"] == len(sizes)
        by_id = {s["span_id"]: s for s in got}
        assert by_id[sent[0].span_id.hex()]["resource"]["service.name"] == "backend"
        assert stats["exported"] == 15 and stats["dropped"] == 0


def test_large_submissions_are_encoded_on_arrival_in_batch_sized_pieces() -> None:
    assert ENCODE_AT_SUBMIT <= 60
    with OtlpReceiver() as rx:
        p = _otlp_pipeline(rx, max_batch=25, max_delay_s=0.05)
        try:
            p.submit(many_traces(20), processes())  # 60 spans: requests of 25, 25, 10 at once
            chunks = list(p._lanes[0].chunks)
            assert all(isinstance(c[0], bytes) for c in chunks)
            assert [c[1] for c in chunks] in ([25, 25, 10], [25, 10], [10], [])
            p.submit(chain_trace("small"), processes())  # and a small one joins the last request
            rx.wait_for_spans(lambda ss: len(ss) == 63, timeout_s=5)
        finally:
            stats = p.shutdown(2)
        assert sorted(_request_sizes(rx)) == [13, 25, 25]
        assert stats["exported"] == 63 and stats["batches"] == 3


def test_a_failed_batch_is_retried_with_the_same_bytes() -> None:
    """Spans the worker encoded go back into the queue encoded: a retry does not encode again."""
    port = unused_port()
    (exporter,) = build_exporters(load_config({}, endpoint=f"http://127.0.0.1:{port}", protocol="http/protobuf"))
    p = ExportPipeline([exporter], max_batch=50, max_delay_s=0.02, backoff_initial_s=0.05, backoff_max_s=0.05)
    rx = None
    try:
        for i in range(4):
            p.submit(chain_trace(f"r{i}"), processes())
        _wait(lambda: p.stats()["export_failures"] >= 1)
        chunks = list(p._lanes[0].chunks)
        assert [type(c[0]) for c in chunks] == [bytes] and chunks[0][1] == 12
        rx = OtlpReceiver(http_port=port).start()
        rx.wait_for_spans(lambda ss: len(ss) == 12, timeout_s=5)
        (_, req, _) = rx.trace_requests[0]
        assert req.SerializeToString() == chunks[0][0]
    finally:
        stats = p.shutdown(2)
        if rx is not None:
            rx.stop()
    assert stats["exported"] == 12 and stats["dropped"] == 0


def _bad_trace(seed: str) -> list[Span]:
    import dataclasses

    bad = chain_trace(seed)
    bad[1] = dataclasses.replace(bad[1], start_ns=-1)  # not a fixed64: the encoder refuses it
    return bad


def test_spans_the_encoder_cannot_write_are_dropped_and_counted_at_submit(caplog: pytest.LogCaptureFixture) -> None:
    with OtlpReceiver() as rx:
        p = _otlp_pipeline(rx, max_batch=3, max_delay_s=0.05)  # 3 spans: encoded on arrival
        try:
            with caplog.at_level(logging.ERROR, logger="kspan.exporters"):
                p.submit(_bad_trace("bad"), processes())  # never raises into the capture loop
            assert p.stats()["dropped_rejected"] == 3 and p.stats()["submit_errors"] == 0
            assert p.stats()["queued"] == 0
            assert "cannot encode spans" in p.stats()["exporters"][0]["last_error"]
            assert any("could not encode 3 spans" in r.getMessage() for r in caplog.records)
            p.submit(chain_trace("good"), processes())
            rx.wait_for_spans(lambda ss: len(ss) == 3, timeout_s=5)
        finally:
            stats = p.shutdown(2)
        assert stats["exported"] == 3 and stats["dropped_rejected"] == 3


def test_spans_the_encoder_cannot_write_are_dropped_and_counted_by_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with OtlpReceiver() as rx:
        p = _otlp_pipeline(rx, max_batch=100, max_delay_s=0.2)
        try:
            with caplog.at_level(logging.ERROR, logger="kspan.exporters"):
                p.submit(_bad_trace("bad"), processes())  # small: queued as spans
                p.submit(many_traces(20), processes())  # large: encoded on arrival, sent still
                _wait(lambda: p.stats()["queued"] == 0)
            rx.wait_for_spans(lambda ss: len(ss) == 60, timeout_s=5)
            assert any("could not encode 3 spans" in r.getMessage() for r in caplog.records)
        finally:
            stats = p.shutdown(2)
        assert stats["exported"] == 60 and stats["dropped_rejected"] == 3 and stats["dropped"] == 3
