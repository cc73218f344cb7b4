"""Batching, bounded queueing and retry between the capture loop and the span exporters.

The capture loop must never wait on a collector: submit() only appends to bounded in-memory queues
(one lane per exporter, each with its own thread, so a collector outage does not stall the console
or the file; an OTLP lane encodes a large submission first) and counts what does not fit. While
an exporter fails, its queued spans are retried with capped exponential backoff; when the queue is
full, incoming traces are dropped whole and counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from correlator.spans import ProcessInfo, Span
from exporters.base import SpanExporter

log = logging.getLogger("kspan.exporters")

MAX_RETRY_AFTER_S = 60.0
REJECT_LOG_INTERVAL_S = 60.0


_PID = attrgetter("pid")

# A queued submission: its spans (or, for an exporter that encodes, their request bytes), how many
# spans, and the processes they reference, kept with them until they leave (a process may exit,
# and the agent forget it, before its spans are exported).
_Chunk = tuple[list[Span] | bytes, int, Mapping[int, ProcessInfo]]
_NO_PROCESSES: Mapping[int, ProcessInfo] = {}
# Submissions of at least this many spans are encoded as they arrive; smaller ones (a lightly loaded
# poll) wait as spans and are encoded together by the worker: an encoder call costs ~20 us on a
# cold core whatever its size, more than a few spans' encoding.
ENCODE_AT_SUBMIT = 32


def _describe(exporter: SpanExporter) -> str:
    d = getattr(exporter, "describe", None)
    return d() if callable(d) else type(exporter).__name__


class _Lane:
    """One exporter's queue and worker thread. The queue holds whole submissions (one per poll of
    the capture loop), so the producer does no work per span; the worker cuts batches from them.

    An exporter with encode_spans(spans, processes) -> bytes and export_bytes(body, n_spans) (the
    OTLP ones: a request is a concatenation of ResourceSpans fields, so requests concatenate into
    one) has its large submissions encoded as they arrive, while their spans are still in this
    core's cache, and the spans are freed where they were made; the worker encodes the small ones
    together, joins the bytes and sends them. Encoded chunks stay encoded for a retry."""

    def __init__(
        self,
        exporter: SpanExporter,
        max_queue_spans: int,
        max_batch: int,
        max_delay_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
    ) -> None:
        self.exporter = exporter
        self.name = _describe(exporter)
        self.max_queue = max_queue_spans
        self.max_batch = max(1, max_batch)
        self.max_delay_s = max_delay_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.cond = threading.Condition()
        self.chunks: deque[_Chunk] = deque()
        self.queued = 0  # spans in chunks
        self.oldest_enqueued = 0.0
        self.stopping = False
        self.deadline = float("inf")
        self.exported = 0
        self.batches = 0
        self.dropped_queue_full = 0
        self.dropped_rejected = 0
        self.dropped_shutdown = 0
        self.export_failures = 0
        self.export_seconds = 0.0
        self.outage_since: float | None = None
        self.last_reject_log = float("-inf")
        self.outage_failures = 0
        self.encode = getattr(exporter, "encode_spans", None)
        self.send = getattr(exporter, "export_bytes", None)
        if self.send is None:
            self.encode = None
        self.encode_at = min(ENCODE_AT_SUBMIT, self.max_batch)  # so a span chunk never exceeds a batch
        self.last_encode_log = float("-inf")
        self.thread = threading.Thread(target=self._run, name=f"kspan-export-{self.name}", daemon=True)

    # --- producer side (capture loop) ---

    def offer(self, spans: list[Span], processes: Mapping[int, ProcessInfo]) -> None:
        """spans and processes are the pipeline's own copies, shared by every lane, never mutated."""
        with self.cond:
            if self.stopping:
                self.dropped_shutdown += len(spans)
                return
            before = self.queued
            room = self.max_queue - before
            if len(spans) > room:
                accepted = self._fit_whole_traces(spans, room)
                self.dropped_queue_full += len(spans) - len(accepted)
                if not accepted:
                    return
                spans = accepted
            if self.encode is None or len(spans) < self.encode_at:
                self.chunks.append((spans, len(spans), processes))
            elif not self._encode_into_queue(spans, processes):
                return
            self.queued = before + len(spans)
            # The worker waits only while the queue is empty or short of a batch: wake it when either
            # changes, not on every submission.
            if not before:
                self.oldest_enqueued = time.monotonic()
                self.cond.notify()
            elif before < self.max_batch <= self.queued:
                self.cond.notify()

    def _encode_into_queue(self, spans: list[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        # In pieces of at most a batch: the worker never splits encoded bytes.
        assert self.encode is not None
        step = self.max_batch
        pieces = [spans] if len(spans) <= step else [spans[i : i + step] for i in range(0, len(spans), step)]
        try:
            encoded = [(self.encode(piece, processes), len(piece), _NO_PROCESSES) for piece in pieces]
        except Exception as e:  # a span the encoder cannot represent: dropped and counted, never raised
            self._encode_failed(len(spans), e)
            return False
        self.chunks.extend(encoded)
        return True

    def _encode_failed(self, n: int, e: Exception) -> None:
        """Caller holds the lock."""
        self.dropped_rejected += n
        setattr_safe(self.exporter, "last_error", f"cannot encode spans: {e!r}")
        now = time.monotonic()
        if now - self.last_encode_log >= REJECT_LOG_INTERVAL_S:
            self.last_encode_log = now
            log.error("kspan: bug: could not encode %d spans for %s (%d dropped so far)",
                      n, self.name, self.dropped_rejected, exc_info=e)

    @staticmethod
    def _fit_whole_traces(spans: Sequence[Span], room: int) -> list[Span]:
        # Drop whole traces, not arbitrary spans: a half trace misleads more than a missing one.
        if room <= 0:
            return []
        by_trace: dict[bytes, list[Span]] = {}
        for s in spans:
            by_trace.setdefault(s.trace_id, []).append(s)
        out: list[Span] = []
        for group in by_trace.values():
            if len(out) + len(group) <= room:
                out.extend(group)
        return out

    # --- consumer side (worker thread) ---

    def _take_batch(self) -> tuple[list[_Chunk], int] | None:
        """Wait for a batch worth sending: the chunks at the head of the queue that make it, and
        how many spans. None when stopping with nothing left (or past the deadline)."""
        with self.cond:
            while True:
                if self.stopping and (not self.queued or time.monotonic() >= self.deadline):
                    return None
                if self.queued:
                    if self.stopping or self.queued >= self.max_batch:
                        break
                    wait = self.oldest_enqueued + self.max_delay_s - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                else:
                    self.cond.wait()
            # Peek, do not pop: on failure the same spans stay at the head of the queue.
            chunks = self.chunks
            taken = n = 0
            if self.encode is not None:  # whole chunks: none is larger than a batch
                while taken < len(chunks) and (not taken or n + chunks[taken][1] <= self.max_batch):
                    n += chunks[taken][1]
                    taken += 1
                return [chunks[i] for i in range(taken)], n
            # A chunk that straddles the batch's end is split in two where it ends.
            while n < self.max_batch and taken < len(chunks):
                spans, size, procs = chunks[taken]
                room = self.max_batch - n
                if size > room:
                    assert isinstance(spans, list)
                    chunks[taken] = (spans[room:], size - room, procs)
                    chunks.insert(taken, (spans[:room], room, procs))
                    size = room
                n += size
                taken += 1
            return [chunks[i] for i in range(taken)], n

    @staticmethod
    def _spans_of(head: list[_Chunk]) -> tuple[list[Span], Mapping[int, ProcessInfo]]:
        if len(head) == 1:
            return head[0][0], head[0][2]  # type: ignore[return-value]
        batch: list[Span] = []
        merged: dict[int, ProcessInfo] = {}
        for spans, _, procs in head:
            batch += spans  # type: ignore[arg-type]
            merged.update(procs)
        return batch, merged

    def _encoded(self, head: list[_Chunk]) -> list[_Chunk]:
        """The head's chunks all encoded: each run of span chunks in one encoder call (outside the
        lock: the capture loop keeps submitting meanwhile), then put back in the queue in their
        place, so a retry sends the same bytes. A run the encoder refuses is dropped and counted."""
        assert self.encode is not None
        if all(isinstance(c[0], bytes) for c in head):
            return head
        out: list[_Chunk] = []
        failed = 0
        run: list[_Chunk] = []
        for chunk in [*head, (b"", 0, _NO_PROCESSES)]:  # a sentinel ends the last run
            if not isinstance(chunk[0], bytes):
                run.append(chunk)
                continue
            if run:
                spans, procs = self._spans_of(run)
                try:
                    out.append((self.encode(spans, procs), len(spans), _NO_PROCESSES))
                except Exception as e:  # counted below, like a submission the encoder refused
                    failed += len(spans)
                    with self.cond:
                        self._encode_failed(len(spans), e)
                run = []
            if chunk[1]:
                out.append(chunk)
        with self.cond:
            chunks = self.chunks
            if len(chunks) >= len(head) and all(chunks[i] is c for i, c in enumerate(head)):
                for _ in head:
                    chunks.popleft()
                chunks.extendleft(reversed(out))
                self.queued -= failed
        return out

    def _release(self, taken: int) -> None:
        with self.cond:
            popleft = self.chunks.popleft
            for _ in range(min(taken, len(self.chunks))):  # shutdown may have cleared them
                self.queued -= popleft()[1]
            # oldest_enqueued stays: what remains is no older than it, so at worst it leaves early.

    def _sleep(self, seconds: float) -> None:
        """Back off; a shutdown starting meanwhile ends the wait early (one prompt last try), and
        during shutdown the wait never passes the shutdown deadline."""
        with self.cond:
            was_stopping = self.stopping
            end = min(time.monotonic() + seconds, self.deadline)
            while self.stopping == was_stopping:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def _run(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            item = self._take_batch()
            if item is None:
                return
            head, n = item
            t0 = time.perf_counter()
            try:
                if self.send is not None and self.encode is not None:
                    head = self._encoded(head)
                    if not head:
                        continue  # every span refused by the encoder (counted)
                    n = sum(c[1] for c in head)
                    body = head[0][0] if len(head) == 1 else b"".join([c[0] for c in head])  # type: ignore[misc]
                    ok = bool(self.send(body, n))  # type: ignore[arg-type]
                else:
                    spans, procs = self._spans_of(head)
                    ok = bool(self.exporter.export(spans, procs))
            except Exception as e:  # the contract says never raise; a bug must not end exporting
                log.exception("kspan: bug: %s raised while exporting", self.name)
                setattr_safe(self.exporter, "last_error", repr(e))
                ok = False
            self.export_seconds += time.perf_counter() - t0
            if ok:
                self.exported += n
                self.batches += 1
                self._release(len(head))
                if self.outage_since is not None:
                    log.warning(
                        "kspan: export to %s resumed after %.1f s (%d failed attempts); %d spans still queued",
                        self.name, time.monotonic() - self.outage_since, self.outage_failures, self.queued,
                    )
                    self.outage_since = None
                    self.outage_failures = 0
                backoff = self.backoff_initial_s
                continue
            self.export_failures += 1
            reason = getattr(self.exporter, "last_error", "") or "export failed"
            if getattr(self.exporter, "last_failure_permanent", False):
                # The endpoint refused these spans for good: retrying would block the queue forever.
                self.dropped_rejected += n
                self._release(len(head))
                now = time.monotonic()
                # Rate-limited: a closed stdout or a misconfigured endpoint rejects every batch.
                if now - self.last_reject_log >= REJECT_LOG_INTERVAL_S:
                    self.last_reject_log = now
                    log.warning("kspan: %s rejected %d spans, dropped (%d so far): %s",
                                self.name, n, self.dropped_rejected, reason)
                continue
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                hint = getattr(self.exporter, "outage_hint", "") or "check the exporter's configuration"
                log.warning(
                    "kspan: cannot reach %s: %s; spans are queued (%d, at most %d) and the excess "
                    "dropped; %s",
                    self.name, reason, self.queued, self.max_queue, hint,
                )
            self.outage_failures += 1
            # An endpoint that says when to come back (HTTP Retry-After) is obeyed, within reason.
            asked = min(float(getattr(self.exporter, "retry_after_s", 0.0) or 0.0), MAX_RETRY_AFTER_S)
            self._sleep(max(backoff * random.uniform(0.8, 1.2), asked))
            backoff = min(backoff * 2, self.backoff_max_s)

    def stats(self) -> dict[str, Any]:
        with self.cond:
            return {
                "exporter": self.name,
                "exported": self.exported,
                "batches": self.batches,
                "queued": self.queued,
                "dropped_queue_full": self.dropped_queue_full,
                "dropped_rejected": self.dropped_rejected,
                "dropped_shutdown": self.dropped_shutdown,
                "export_failures": self.export_failures,
                "export_seconds": self.export_seconds,
                "failing": self.outage_since is not None,
                "last_error": getattr(self.exporter, "last_error", ""),
            }


def setattr_safe(obj: object, name: str, value: object) -> None:
    try:
        setattr(obj, name, value)
    except (AttributeError, TypeError):
        pass


class ExportPipeline:
    """submit() never blocks and never raises; stats() counts everything; shutdown() flushes within a
    deadline and reports what it could not deliver."""

    def __init__(
        self,
        exporters: Sequence[SpanExporter],
        max_queue_spans: int = 20000,
        max_batch: int = 512,
        max_delay_s: float = 1.0,
        backoff_initial_s: float = 0.25,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._lanes = [
            _Lane(e, max_queue_spans, max_batch, max_delay_s, backoff_initial_s, backoff_max_s)
            for e in exporters
        ]
        self.submitted = 0
        self.submit_errors = 0
        self._count_lock = threading.Lock()  # submit() may be called from several threads
        self._closed = False
        for lane in self._lanes:
            lane.thread.start()

    def submit(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> None:
        """processes: at least the pids of these spans. Both are copied (once, for every exporter):
        the caller may reuse them, and the queue keeps them until the spans leave."""
        if not spans:
            return
        try:
            owned = list(spans)
            procs = dict(processes)
            with self._count_lock:
                self.submitted += len(owned)
            for lane in self._lanes:
                lane.offer(owned, procs)
        except Exception:  # never let export trouble reach the capture loop
            self.submit_errors += 1
            log.exception("kspan: bug: submitting %d spans failed", len(spans))

    def stats(self) -> dict[str, Any]:
        """Totals over exporters (with N exporters each span counts N times in exported/dropped) plus
        one entry per exporter under "exporters"."""
        lanes = [lane.stats() for lane in self._lanes]
        total: dict[str, Any] = {"submitted": self.submitted, "submit_errors": self.submit_errors}
        for key in ("exported", "batches", "queued", "dropped_queue_full", "dropped_rejected",
                    "dropped_shutdown", "export_failures", "export_seconds"):
            total[key] = sum(s[key] for s in lanes)
        total["dropped"] = total["dropped_queue_full"] + total["dropped_rejected"] + total["dropped_shutdown"]
        # Spans an endpoint accepted the request for but reported as rejected (OTLP partial success).
        total["rejected_by_endpoint"] = sum(int(getattr(lane.exporter, "rejected_spans", 0)) for lane in self._lanes)
        total["exporters"] = lanes
        return total

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queue is empty (True) or the timeout passes (False); exports continue."""
        end = time.monotonic() + timeout_s
        for lane in self._lanes:
            with lane.cond:
                lane.oldest_enqueued = 0.0  # make the worker send what it has now
                lane.cond.notify_all()
        while time.monotonic() < end:
            if all(lane.stats()["queued"] == 0 for lane in self._lanes):
                return True
            time.sleep(0.01)
        return all(lane.stats()["queued"] == 0 for lane in self._lanes)

    def shutdown(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Export what can be exported before the deadline, then stop; returns stats() with
        "dropped_shutdown" counting spans that were still queued."""
        if self._closed:
            return self.stats()
        self._closed = True
        deadline = time.monotonic() + max(0.0, timeout_s)
        for lane in self._lanes:
            with lane.cond:
                lane.stopping = True
                lane.deadline = deadline
                lane.cond.notify_all()
        for lane in self._lanes:
            lane.thread.join(max(0.0, deadline - time.monotonic()) + 0.5)
        for lane in self._lanes:
            with lane.cond:
                left = lane.queued
                if left:
                    lane.dropped_shutdown += left
                    lane.chunks.clear()
                    lane.queued = 0
            if left:
                log.warning(
                    "kspan: shutdown: %d spans could not be exported to %s within %.1f s (%s)",
                    left, lane.name, timeout_s, getattr(lane.exporter, "last_error", "") or "timed out",
                )
            try:
                lane.exporter.shutdown()
            except Exception:
                log.exception("kspan: %s failed to shut down cleanly", lane.name)
        return self.stats()
