"""correlator/_spans.c's per-record path: the Memory of released identities against an
insertion-ordered model, the Feeder's repeat check, late links, memo and peer-table bounds, and
feed_batch against a feed() per record (spans and counters)."""

from __future__ import annotations

import gc
import struct
import tracemalloc
from collections import OrderedDict
from dataclasses import fields, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from correlator import _spans
from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.linker import PARENT_SOURCE_ATTR
from correlator.records import EndReason, Exchange, ExchangeId, ParentHint, ParentKind, Role
from correlator.sampling import parse_sampler
from correlator.spans import Span
from tests.support.exchanges import make_chain, make_exchange, request_bytes, response_bytes

# ---- Memory ----------------------------------------------------------------------------------

_KEYS = st.tuples(st.integers(0, 40), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
_TRACE = st.binary(min_size=0, max_size=16)
_LINK = st.one_of(st.none(), st.binary(min_size=0, max_size=8))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _KEYS, _TRACE, _LINK),
        st.tuples(st.just("get"), _KEYS),
        st.tuples(st.just("expire"), st.integers(-5, 60)),
        st.tuples(st.just("now"), st.integers(0, 50)),
    ),
    max_size=300,
)


class _Model:
    """What Memory promises: an insertion-ordered dict (a re-put keeps its place, takes the new
    value and time), the oldest out beyond max_entries, expire() from the front while the front
    resolved at or before the deadline."""

    def __init__(self, max_entries: int) -> None:
        self.max = max_entries
        self.d: OrderedDict[tuple[int, int], tuple[bytes, bytes | None, int]] = OrderedDict()
        self.now = 0

    def put(self, key: tuple[int, int], trace: bytes, link: bytes | None) -> None:
        if key not in self.d and len(self.d) == self.max:
            self.d.popitem(last=False)
        self.d[key] = (trace, link or None, self.now)

    def expire(self, deadline: int) -> None:
        while self.d and next(iter(self.d.values()))[2] <= deadline:
            self.d.popitem(last=False)


@given(st.integers(1, 9), _OPS)
def test_memory_matches_an_insertion_ordered_model(max_entries: int, ops: list[tuple]) -> None:
    mem, model = _spans.Memory(max_entries), _Model(max_entries)
    for op in ops:
        if op[0] == "put":
            mem.put(op[1], op[2], op[3])
            model.put(op[1], op[2], op[3])
        elif op[0] == "get":
            want = model.d.get(op[1])
            assert mem.get(op[1]) == (None if want is None else want[:2])
            assert (op[1] in mem) is (op[1] in model.d)
        elif op[0] == "expire":
            mem.expire(op[1])
            model.expire(op[1])
        else:
            mem.now = model.now = op[1]
        assert len(mem) == len(model.d)
    for key, (trace, link, _) in model.d.items():
        assert mem.get(key) == (trace, link)


def test_memory_grows_past_its_first_ring_and_deletes_through_probe_chains() -> None:
    """Thousands of identities (the ring grows from 256, the index rehashes), then the oldest
    half pushed out by new ones (backward-shift deletion in a crowded index): every survivor
    still found, every evicted one gone."""
    n = 5000
    mem = _spans.Memory(n)
    for i in range(n):
        mem.now = i
        mem.put((0xFFFF_8880_0000_0000 + i * 64, 1_000_000 + i), i.to_bytes(16, "big"), (i + 1).to_bytes(8, "big"))
    for i in range(n, n + n // 2):
        mem.put((0xFFFF_8880_0000_0000 + i * 64, 1_000_000 + i), i.to_bytes(16, "big"), None)
    assert len(mem) == n
    for i in range(n + n // 2):
        got = mem.get((0xFFFF_8880_0000_0000 + i * 64, 1_000_000 + i))
        if i < n // 2:
            assert got is None, i
        else:
            assert got == (i.to_bytes(16, "big"), (i + 1).to_bytes(8, "big") if i < n else None), i
    mem.expire(n - 1)  # every entry was put at a time <= n - 1
    assert len(mem) == 0


def test_memory_rejects_bad_input_with_clear_errors() -> None:
    mem = _spans.Memory(4)
    with pytest.raises(ValueError, match="trace id"):
        mem.put((1, 2), b"\0" * 17, None)
    with pytest.raises(ValueError, match="span id"):
        mem.put((1, 2), b"\0" * 16, b"\0" * 9)
    with pytest.raises(TypeError):
        mem.get("not a key")
    with pytest.raises(TypeError):
        mem.expire(1.5)
    with pytest.raises(ValueError):
        _spans.Memory(0)
    mem.put((1, 2), b"\1" * 16, b"")  # an empty link is no link
    assert mem.get((1, 2)) == (b"\1" * 16, None)
    mem.expire(-1)  # before every time: nothing goes
    assert len(mem) == 1
    mem.expire(2**80)  # beyond every u64 time: all go
    assert len(mem) == 0


# ---- the Feeder ------------------------------------------------------------------------------


def _corr(**kw) -> Correlator:
    return Correlator(WallClock(0), CorrelatorConfig(id_salt=b"f", **kw))


def _ids(ex: Exchange, trace: bytes, sid: int, psid: int = 0, kind: ParentKind | None = None,
         sampled: bool = True) -> Exchange:
    parent = ex.parent
    if kind is not None:
        parent = ParentHint(kind, parent.pid if parent else 0, parent.exchange if parent else ExchangeId(0, 0))
    return replace(ex, kernel_ids=True, trace_id=trace, span_id=struct.pack(">Q", sid),
                   parent_span_id=struct.pack(">Q", psid) if psid else b"", sampled=sampled, parent=parent)


def _span_tuple(s: Span) -> tuple:
    return tuple(repr(getattr(s, f.name)) for f in fields(Span))


def _mixed_stream() -> list[Exchange]:
    """Kernel-identified chains, records without ids (the sweep's), repeats, a non-HTTP head,
    a held child released by its later parent, an unsampled trace and a corrupt record."""
    out: list[Exchange] = []
    for i in range(12):
        chain = make_chain(("A", "B"), start_ns=10_000_000_000 + i * 10_000_000,
                           conn_base=0xFFFF_8880_0000_0000 + i * 0x10000)
        trace = bytes([i + 1]) * 16
        for j, ex in enumerate(chain.exchanges):
            if i % 3 == 2:
                out.append(ex)  # no kernel ids: the Python linker's path
            else:
                out.append(_ids(ex, trace, 100 * i + j + 1, 100 * i + j if j else 0, sampled=i % 4 != 1))
        if i % 5 == 0:
            out.append(out[-1])  # a repeat of a record already fed
    junk = make_exchange(b"\x16\x03\x01 not http", b"", conn_id=0xFFFF_8880_00FF_0000)
    out.append(_ids(junk, b"\xee" * 16, 9001))
    # A record that raises inside (a head that is not bytes): counted, no span, the batch goes on.
    out.append(replace(out[0], conn_id=0xFFFF_8880_00FE_0000, req_head=None))  # type: ignore[arg-type]
    out.append(_ids(make_exchange(request_bytes("GET", "/after"), response_bytes(), conn_id=0xFFFF_8880_00FD_0000),
                    b"\xdd" * 16, 9002))
    return out


def test_feed_batch_gives_what_a_feed_per_record_gives() -> None:
    stream = _mixed_stream()
    one, batch = _corr(), _corr()
    want = [s for ex in stream for s in one.feed(ex)]
    got: list[Span] = []
    batch.feed_batch(stream, got)
    batch.feed_batch([], got)  # an empty run changes nothing
    assert [_span_tuple(s) for s in got] == [_span_tuple(s) for s in want]
    assert batch.stats.as_dict() == one.stats.as_dict()
    st_ = one.stats
    # 8 identified chains of 4, the non-HTTP record, the corrupt one and the one after it
    assert (st_.kernel_identified, st_.internal_errors, st_.unparsed_exchanges) == (35, 1, 1)
    assert st_.duplicate_exchanges + st_.duplicate_ids == 3  # one repeat each of chains 0, 5 and 10
    assert st_.unsampled_exchanges == 8 and not any(s.sampled for s in want if s.trace_id in (b"\2" * 16, b"\n" * 16))
    assert want[-1].attributes["url.path"] == "/after"
    assert "TypeError" in one.last_error and one.last_error == batch.last_error


def test_feed_batch_takes_any_iterable_and_counts_what_is_not_an_exchange() -> None:
    corr = _corr()
    with pytest.raises(TypeError, match="spans_out"):
        corr.feed_batch([], ())  # type: ignore[arg-type]
    ex = _ids(make_exchange(request_bytes(), response_bytes()), b"\x0a" * 16, 5)
    out: list[Span] = []
    corr.feed_batch(iter([object(), ex]), out)  # type: ignore[list-item]
    assert len(out) == 1 and out[0].span_id == struct.pack(">Q", 5)
    assert corr.stats.internal_errors == 1 and corr.last_error


@pytest.mark.parametrize("sampler", ["always_on", "always_off"])
@pytest.mark.parametrize("parent_http", [True, False])
def test_a_held_child_released_by_an_identified_parent_is_head_sampled(sampler: str, parent_http: bool) -> None:
    """A record without kernel ids (the sweep's) waits for its parent; when the parent comes with
    kernel ids, HTTP or not, the child goes out in the parent's trace and is sampled and counted
    as the kernel would have: every exported exchange is in sampled_exchanges or
    unsampled_exchanges, whichever parent released it."""
    chain = make_chain(("A", "B"))
    server = chain.by_name["A.server"]
    if not parent_http:
        server = replace(server, req_head=b"\x16\x03\x01\x00\x05hello")
    server = _ids(server, b"\x05" * 16, 21, 20, sampled=sampler == "always_on")
    child = replace(chain.by_name["A.client"], end=EndReason.TIMEOUT, resp_start_ns=0, resp_end_ns=0,
                    resp_head=b"", resp_tail=b"", resp_bytes=0, status=0)
    corr = _corr(sampler=parse_sampler(sampler, None)[0])
    assert corr.feed(child) == [] and corr.stats.held == 1
    spans = corr.feed(server)
    kid = spans[-1]
    # a non-HTTP exchange makes no span: its children link to what it links to
    assert kid.parent_span_id == struct.pack(">Q", 21 if parent_http else 20) and kid.trace_id == b"\x05" * 16
    assert kid.attributes[PARENT_SOURCE_ATTR] == "thread"
    assert kid.sampled is (sampler == "always_on")
    st_ = corr.stats
    assert st_.held == 0
    assert st_.sampled_exchanges + st_.unsampled_exchanges == len(spans)
    assert (st_.sampled_exchanges if sampler == "always_on" else st_.unsampled_exchanges) == len(spans)


def test_the_head_memo_and_the_peer_pid_table_stay_bounded() -> None:
    corr = _corr()
    feeder = corr._feeder
    memo = 1024  # correlator._MEMO_SIZE
    for i in range(3 * memo):
        head = request_bytes("GET", f"/items/{i}", host=f"h{i % 7}", headers=[("X-N", str(i))])
        ex = make_exchange(head, response_bytes(), conn_id=0xFFFF_8880_0000_0000 + i * 64, role=Role.SERVER,
                           local=("127.0.0.1", 8080), remote=("127.0.0.1", 40000 + i % 20000))
        # a local server end naming its client as PEER: its pid is kept for the client span
        peer = ParentHint(ParentKind.PEER, 77, ExchangeId(0xFFFF_8880_1000_0000 + i * 64, 5 + i))
        corr.feed(_ids(replace(ex, parent=peer), bytes([i % 251 + 1]) * 16, i + 1, i + 100_000, kind=ParentKind.PEER))
        assert len(feeder.heads) <= memo and len(feeder.shapes) <= memo
        assert feeder.peer_pids <= 4 * memo
    assert corr.stats.kernel_identified == 3 * memo and corr.stats.internal_errors == 0
    assert feeder.peer_pids > 0


def test_the_feed_path_holds_no_memory_per_record_once_warm() -> None:
    """A long run of identified records on a bounded correlator: Python allocations stop growing
    once its memo and Memory are full (a leaked reference per record would grow them)."""
    corr = _corr(max_resolved=500)
    heads = [request_bytes("GET", f"/p/{i % 50}") for i in range(50)]
    resp = response_bytes(200, body=b"ok")

    def run(start: int, n: int) -> None:
        out: list[Span] = []
        batch = [_ids(make_exchange(heads[i % 50], resp, conn_id=0xFFFF_8880_0000_0000 + i * 64,
                                    req_start_ns=1_000_000_000 + i * 1000), b"\x09" * 16, i + 1)
                 for i in range(start, start + n)]
        corr.feed_batch(batch, out)
        assert len(out) == n

    run(0, 3000)
    gc.collect()
    tracemalloc.start()
    try:
        run(3000, 2000)
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
        run(5000, 20_000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown  # 20,000 records: well under 4 bytes each
    assert corr.stats.resolved_remembered == 500


def test_a_held_child_takes_the_kernels_decision_for_its_parents_trace() -> None:
    """Under parentbased_always_off a root decision made in user space would drop it; its parent
    came with an incoming traceparent the kernel honoured (sampled), so the whole trace is kept."""
    tp_trace = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
    chain = make_chain(("A", "B"))
    server = _ids(chain.by_name["A.server"], tp_trace, 21, 0xB7AD6B7169203331, kind=ParentKind.TRACEPARENT)
    child = replace(chain.by_name["A.client"], end=EndReason.TIMEOUT, resp_start_ns=0, resp_end_ns=0,
                    resp_head=b"", resp_tail=b"", resp_bytes=0, status=0)
    corr = _corr(sampler=parse_sampler("parentbased_always_off", None)[0])
    assert corr.feed(child) == []
    spans = corr.feed(server)
    assert [s.sampled for s in spans] == [True, True] and spans[1].trace_id == tp_trace
    assert corr.stats.sampled_exchanges == 2 and corr.stats.unsampled_exchanges == 0


@pytest.mark.parametrize("segment", ["caf\u00e9", "\u20ac5", "\U0001f600x", "plain"])
def test_span_names_and_url_full_keep_every_character(segment: str) -> None:
    """Names and url.full are joined from pieces of any width (1, 2 and 4 bytes a character)."""
    path = f"/shop/{segment}/items"
    head = f"GET {path} HTTP/1.1\r\nHost: h\u00f6st:8080\r\n\r\n".encode()  # UTF-8 on the wire
    client = make_exchange(head, response_bytes(), role=Role.CLIENT, conn_id=0xFFFF_8880_0000_3000)
    (span,) = _corr().feed(_ids(client, b"\x0c" * 16, 3))
    assert span.attributes["url.full"] == f"http://h\u00f6st:8080{path}"
    server = make_exchange(head, response_bytes(), role=Role.SERVER, conn_id=0xFFFF_8880_0000_4000)
    (span,) = _corr(routes=["/shop/{name}/items"]).feed(_ids(server, b"\x0d" * 16, 4))
    assert span.name == "GET /shop/{name}/items" and span.attributes["url.path"] == path
