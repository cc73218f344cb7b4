"""The correlator's public API: kernel exchanges in, finished spans out.

Pure and deterministic: no I/O, no clock reads (time comes in with the records and advance()),
ids from a keyed hash of each exchange's identity. The same feed/advance sequence always yields
the same spans, which is what makes `kspan replay` and recorded-stream tests exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from correlator import _spans, http1, red, semconv
from correlator.clock import WallClock
from correlator.linker import PARENT_SOURCE_ATTR, SOURCE_BY_KIND, Linker, make_linker
from correlator.peers import PeerMatcher
from correlator.protocol_spans import ProtocolSpans
from correlator.records import EndReason, Exchange, ExchangeId, MetricExchange, ParentHint, ParentKind, Role
from correlator.routes import DEFAULT_MAX_ROUTES, OVERFLOW_ROUTE, RouteCap, route_template
from correlator.sampling import ALWAYS_ON, SamplerConfig, keeps_remote, keeps_root
from correlator.segments import SegmentRecord
from correlator.spans import AttrValue, Span, SpanKind, StatusCode
from correlator.tracecontext import clean_tracestate, parse_traceparent, traceparent_sampled


@dataclass
class CorrelatorConfig:
    id_salt: bytes = b""  # keys the id hash: ids are unguessable across hosts/runs, stable in a replay
    max_hold_s: float = 30.0  # how long a span waits for its parent before it goes out as an orphan
    max_held_spans: int = 100_000  # cap on waiting spans; the oldest go out as orphans beyond it
    query: str = "redact"  # url.query: "keep", "redact" (credential values -> REDACTED) or "drop"
    routes: list[str] = field(default_factory=list)  # server route templates, e.g. "/users/{id}"
    # No template matched: http.route from correlator/routes.py's heuristic, at most max_routes
    # distinct per service (listening address and port), the rest OVERFLOW_ROUTE.
    auto_routes: bool = True
    max_routes: int = DEFAULT_MAX_ROUTES
    # Identities remembered after release (about 80 bytes each, kept at most max_hold_s) so a
    # child that arrives after its parent still links to it, and a repeated record is dropped.
    max_resolved: int = 50_000
    max_pipelined: int = 16  # requests taken from one captured head
    # How long (stream time) a server exchange from a local peer without a kernel PEER hint waits
    # for its client exchange, matched by 4-tuple (correlator/peers.py).
    peer_wait_s: float = 1.0
    # Head sampling for the records the kernel did not decide (no kernel ids): the same sampler
    # the kernel was given, so those records are kept or dropped as the kernel would have.
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def validate(self) -> None:
        if not isinstance(self.id_salt, bytes):
            raise ValueError("id_salt must be bytes")
        if self.query not in semconv.QUERY_MODES:
            raise ValueError(f"query mode {self.query!r} is not one of {', '.join(semconv.QUERY_MODES)}")
        if not self.max_hold_s > 0:
            raise ValueError(f"max_hold_s must be > 0 seconds, got {self.max_hold_s!r}")
        for name in ("max_held_spans", "max_resolved", "max_pipelined", "max_routes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        semconv.RouteTable(self.routes)


@dataclass
class CorrelatorStats:
    exchanges: int = 0  # records fed
    spans: int = 0  # spans released (feed, advance, flush)
    unparsed_exchanges: int = 0  # request head not HTTP/1.x: no span
    unparsed_bytes: int = 0  # request + response bytes of those exchanges
    unparsed_responses: int = 0  # response bytes seen but no status line parsed (span kept)
    orphaned_spans: int = 0  # released without their parent (it never came within max_hold, or flush)
    held_dropped: int = 0  # released early as orphans because max_held_spans was reached
    truncated_heads: int = 0  # a request or response head cut by the capture limits (span kept)
    pipelined_splits: int = 0  # extra spans from pipelined requests in one captured head
    timeouts: int = 0  # exchanges the kernel ended by timeout
    closed_no_response: int = 0  # connection closed before any response
    responses_incomplete: int = 0  # connection closed mid-response
    evicted: int = 0  # exchanges the kernel gave up on (state evicted, process exit)
    no_response: int = 0  # next request began with no response seen (no error set: pipelining)
    traceparents: int = 0  # valid W3C traceparent headers honoured
    traceparents_invalid: int = 0  # traceparent headers ignored as invalid
    late_links: int = 0  # children linked to a parent released before they arrived
    duplicate_ids: int = 0  # an identity seen again after the first was linked: the repeat went out unlinked
    duplicate_exchanges: int = 0  # an identity seen again while the first waited for its local client: dropped
    ambiguous_parents: int = 0  # client spans left unlinked: their thread served several requests at once
    self_hints: int = 0  # a parent hint naming the exchange itself (ignored)
    internal_errors: int = 0  # bug guard: a record that raised inside the correlator (span lost)
    peer_links_by_tuple: int = 0  # server ends linked to their local client by 4-tuple, not a kernel hint
    routes_overflowed: int = 0  # server spans named OVERFLOW_ROUTE: their service hit max_routes
    held: int = 0  # gauge: spans waiting for their parent now
    peer_waiting: int = 0  # gauge: server exchanges waiting for their local client (<= max_held_spans)
    resolved_remembered: int = 0  # gauge: identities remembered for late children
    kernel_identified: int = 0  # records whose ids and sampling the kernel fixed: spans went out at once
    sampled_exchanges: int = 0  # HTTP exchanges whose trace head sampling kept (spans exported)
    unsampled_exchanges: int = 0  # full records head sampling dropped: metrics only (REC_METRIC not included)
    metric_records: int = 0  # unsampled exchanges the kernel sent as metric records (no span made)
    metric_unparsed: int = 0  # metric records whose request head is not HTTP/1.x: not counted

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Correlator:
    def __init__(self, clock: WallClock, config: CorrelatorConfig | None = None) -> None:
        cfg = config if config is not None else CorrelatorConfig()
        cfg.validate()
        self.config = cfg
        self.clock = clock
        self._stats = CorrelatorStats()
        # The counters CorrelatorStats reports, bumped in place by correlator/_spans.c, the linker and
        # the Python path below.
        self._c = _spans.Counters()
        self._linker: Linker = make_linker(cfg.id_salt, cfg.max_hold_s, cfg.max_held_spans, cfg.max_resolved, self._c)
        # Protocols beyond HTTP/1: one decoder per connection, a span per operation.
        self.protocols = ProtocolSpans(clock, cfg.id_salt)
        self._peers = PeerMatcher(int(cfg.peer_wait_s * 1e9), max_entries=cfg.max_held_spans)
        self._routes = semconv.RouteTable(cfg.routes)
        self._route_cap = RouteCap(cfg.max_routes)
        self._max_pipelined = cfg.max_pipelined
        self._resps: dict[bytes, http1.ResponseHead | None] = {}  # final response by head bytes
        self._hosts: dict[bytes, object] = {}
        self._sampler = cfg.sampler
        # trace id -> an incoming traceparent's sampled flag, for parentbased_* decisions on
        # records without kernel ids (their trace id is the traceparent's: linker rules).
        self._remote_sampled: dict[bytes, bool] = {}
        # Span assembly (correlator/_spans.c), with what it needs of this correlator.
        self._asm = _spans.Assembler(
            stats=self._c, offset=clock.offset_ns, admit=self._route_cap.admit, span_id=self._linker.span_id,
            head_part=self._head_part, hostport=self._hostport,
            match=None if self._routes.empty else self._routes.match, auto_routes=cfg.auto_routes,
            query=cfg.query, resps=self._resps, memo_size=_MEMO_SIZE,
        )  # fmt: skip
        # The per-record path (correlator/_spans.c): records with kernel ids whole, the others
        # through _feed_unidentified; the head memo (memo_size heads and head shapes) and the peer
        # pid table (4 * memo_size) are its own.
        linker = self._linker
        self._feeder = _spans.Feeder(
            assembler=self._asm, counters=self._c, memory=linker.memory, held=linker.held, waiting=linker.waiting,
            release=linker.release_children, parse=self._parse, slow=self._feed_unidentified,
            sources=SOURCE_BY_KIND, memo_size=_MEMO_SIZE,
        )  # fmt: skip
        self._parsed = self._feeder.parsed
        # Metric records (correlator/_red.c), with the same route cap and route rules as spans.
        self._metrics = red.MetricPath(
            derive=self._metric_head, admit=self._route_cap.admit, route_template=route_template,
            match=None if self._routes.empty else self._routes.match, auto_routes=cfg.auto_routes,
            memo_size=_MEMO_SIZE,
        )  # fmt: skip

    # public API -------------------------------------------------------------------------------

    @property
    def stats(self) -> CorrelatorStats:
        st = self._stats
        c = self._c
        for name in _spans.COUNTER_FIELDS:
            setattr(st, name, getattr(c, name))
        st.peer_links_by_tuple = self._peers.links
        st.routes_overflowed = self._route_cap.overflowed
        st.metric_records = self._metrics.records
        st.metric_unparsed = self._metrics.unparsed
        st.held = self._linker.held_count
        st.peer_waiting = self._peers.pending_count
        st.resolved_remembered = self._linker.resolved_count
        return st

    def feed(self, ex: Exchange) -> list[Span]:
        """One exchange record's spans. A record that raises inside the correlator makes none and
        is counted (internal_errors; last_error says why): bad input never stops the agent."""
        return self._feeder.feed(ex)

    def feed_batch(self, exchanges: Iterable[Exchange], spans_out: list[Span]) -> None:
        """feed() of each exchange in order, in one call into correlator/_spans.c: their spans
        are appended to spans_out. Exactly what a feed() per record would do, counters included
        (an error in a record counts as in feed() and the batch goes on). What else shares state
        with the span path keeps its place in the stream only if the caller keeps it: metric()
        takes the same route cap (which routes are admitted before the cap is full), and
        segment()/advance() run between records as the caller orders them; so a poll's records
        go in as runs of consecutive exchange records, each run one call."""
        self._feeder.feed_batch(exchanges, spans_out)

    @property
    def last_error(self) -> str:
        """'Type: message' of the last record that raised inside the correlator, for `kspan
        doctor`/logs ("" before any)."""
        return self._feeder.last_error

    @last_error.setter
    def last_error(self, value: str) -> None:
        self._feeder.last_error = value

    def metric(self, mx: MetricExchange) -> red.RedFacts | None:
        """What an unsampled exchange (a metric record) adds to metrics; None when its request
        head is not HTTP/1.x, as such an exchange would make no span either."""
        try:
            return self._metrics.metric(mx)
        except Exception as e:  # noqa: BLE001 - bad input must never stop the agent: count it
            self._c.internal_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"
            return None

    def metric_batch(self, mxs: list[MetricExchange], facts_out: list[red.RedFacts]) -> None:
        """metric() over a run of consecutive metric records, their facts appended to facts_out
        (one call per run: correlator/_red.c counts a record that raises and goes on)."""
        errors = self._metrics.metric_batch(mxs, facts_out)
        if errors:
            self._c.internal_errors += errors
            self.last_error = self._metrics.last_error

    def _metric_head(self, head: bytes, server: bool, tls: bool) -> tuple[red.HeadPart, str | None] | None:
        """A metric record's head part from the full parse, for correlator/_red.c to memoise (by
        the exact head, and by the head without its target): the RED head part as the span
        path derives it and the heuristic's route (None when a template named it or there is
        none), or None when the head is not HTTP/1.x."""
        reqs = http1.parse_requests(head, 1)
        if not reqs:
            return None
        req = reqs[0]
        _, attrs, _, _, _, has_host, auto_route = self._asm.derive(req, server, self._head_part(req, tls))
        return red.head_part(attrs, server, has_host), auto_route

    def advance(self, mono_now_ns: int) -> list[Span]:
        out = self._release_unmatched(self._peers.expire(mono_now_ns))
        out.extend(self._linker.expire(mono_now_ns))
        return self._decide(out)

    def segment(self, rec: SegmentRecord) -> list[Span]:
        """A transfer on a connection of another protocol (Redis, PostgreSQL, MySQL, HTTP/2):
        the spans of the operations it completed."""
        return self.protocols.feed(rec)

    def flush(self) -> list[Span]:
        out = self._release_unmatched(self._peers.drain())
        out.extend(self._linker.drain())
        out.extend(self.protocols.flush(0))
        return self._decide(out)

    # internals --------------------------------------------------------------------------------

    def _parse(self, head: bytes) -> _Parsed:
        """The full parse of a request head (correlator/_spans.c's head memo calls it on a miss)."""
        return _Parsed(http1.parse_requests(head, self._max_pipelined))

    def _feed_unidentified(self, ex: Exchange) -> list[Span]:
        """A record the kernel gave no ids (the agent's timeout sweep, recordings made before):
        linked here, and head-sampled as the kernel would have."""
        return self._decide(self._feed(ex))

    def _feed(self, ex: Exchange) -> list[Span]:
        st = self._c
        key = (ex.conn_id, ex.req_start_ns)
        if self._peers.is_pending(key):
            # A repeated identity while the first record still waits for its local client: a
            # recording replayed twice, or the agent's timeout sweep emitting a TIMEOUT record for
            # an exchange whose kernel record was read in the same poll (the sweep's records are
            # appended after the ring buffer's). Keep the first, drop and count the repeat: it
            # would bring the same span id again, and replacing would let a late TIMEOUT record
            # overwrite a complete one. Dropped before any other counter sees it, so each record
            # fed is exactly one of: spans, unparsed_exchanges, duplicate_exchanges,
            # internal_errors. (A repeat after the first left the wait reaches the linker, which
            # sends it out unlinked: duplicate_ids.)
            st.duplicate_exchanges += 1
            return []
        end_ns = max(ex.resp_end_ns, ex.resp_start_ns, ex.req_end_ns, ex.req_start_ns)
        if ex.parent_ambiguous:
            st.ambiguous_parents += 1
        parsed = self._parsed(ex.req_head)
        reqs = parsed.reqs
        if not reqs:
            st.unparsed_exchanges += 1
            st.unparsed_bytes += (ex.req_bytes + ex.resp_bytes) or len(ex.req_head)
            return self._linker.add(key, [], ex.parent, ex.pid, None, end_ns)
        tp = parsed.tp
        if parsed.tp_raw is not None:
            if tp is None:
                st.traceparents_invalid += 1
            else:
                st.traceparents += 1
                if self._sampler.code != ALWAYS_ON:
                    if len(self._remote_sampled) >= _MEMO_SIZE * 4:
                        self._remote_sampled.clear()
                    self._remote_sampled[tp[0]] = parsed.tp_sampled

        sid, root_trace = self._linker.ids(ex.conn_id, ex.req_start_ns)
        spans = self._asm.spans(ex, parsed, end_ns, sid, b"", None, None, True)
        if tp is not None:
            spans[0].trace_state = parsed.trace_state
        args = (key, spans, ex.pid, tp, end_ns, root_trace)
        peers = self._peers
        hint = ex.parent
        if hint is not None and hint.kind in _REMOTE_KINDS:
            # A remote parent names no exchange on this host; the traceparent decides the trace.
            hint = None
        if hint is None and peers.wants_peer(ex):
            hint = peers.client_for(ex)
            if hint is None:
                return self._release_unmatched(peers.hold(ex, args, end_ns))
        out = self._add(args, hint)
        if ex.role == Role.CLIENT:
            for pending, phint in peers.client_arrived(ex, end_ns):
                out.extend(self._add(pending.args, phint))
        return out

    def _add(self, args: tuple, hint: ParentHint | None) -> list[Span]:
        key, spans, pid, tp, end_ns, root_trace = args
        return self._linker.add(key, spans, hint, pid, tp, end_ns, root_trace)

    def _release_unmatched(self, pending: list) -> list[Span]:
        """Server exchanges whose local client never showed: they root their own trees."""
        out: list[Span] = []
        for p in pending:
            out.extend(self._add(p.args, None))
        return out

    def _decide(self, spans: list[Span]) -> list[Span]:
        """Head sampling in Python for spans the kernel gave no decision, as the kernel decides:
        per trace (so a trace is kept or dropped whole), an incoming traceparent's flag under
        parentbased_*."""
        cfg = self._sampler
        st = self._c
        if cfg.code == ALWAYS_ON:
            st.sampled_exchanges += len(spans)
            return spans
        remote = self._remote_sampled
        for s in spans:
            flag = remote.get(s.trace_id)
            s.sampled = keeps_root(cfg, s.trace_id) if flag is None else keeps_remote(cfg, s.trace_id, flag)
            if s.sampled:
                st.sampled_exchanges += 1
            else:
                st.unsampled_exchanges += 1
        return spans

    def _head_part(self, req: http1.RequestHead, tls: bool) -> _HeadPart:
        """What a span takes from its request head apart from the target: the same for every
        head of one shape."""
        method = semconv.KNOWN_METHODS.get(req.method)
        original = None
        if method is None:
            method, original = semconv.normalize_method(req.method)
        hostport = self._hostport(req.host) if req.host else None
        tail: dict[str, AttrValue] = {}
        if req.version:
            tail["network.protocol.version"] = req.version
        if req.user_agent:
            tail["user_agent.original"] = req.user_agent.decode("utf-8", "replace")
        if req.content_length is not None:
            tail["http.request.body.size"] = req.content_length
        return (method, original, "https" if tls else "http", hostport, tail)

    def _hostport(self, hb: bytes) -> tuple[str, int | None] | None:
        hostport = self._hosts.get(hb, _MISSING)
        if hostport is _MISSING:
            hostport = semconv.split_host_port(hb.decode("utf-8", "replace"))
            if len(self._hosts) >= _MEMO_SIZE:
                self._hosts.clear()
            self._hosts[hb] = hostport
        return hostport  # type: ignore[return-value]


_MEMO_SIZE = 1024  # distinct heads remembered; cleared (not LRU) when full: cheap and bounded
_MISSING = object()
_REMOTE_KINDS = (ParentKind.TRACEPARENT, ParentKind.TCP_OPTION)


class _Parsed:
    """A request head's parse and what the correlator derived from it, memoised together; heads
    of one shape (the same but for the target) share `heads`, what is derived from the rest."""

    __slots__ = ("reqs", "memo", "heads", "tp", "tp_raw", "tp_sampled", "trace_state")

    def __init__(self, reqs: list[http1.RequestHead]) -> None:
        self.reqs = reqs
        self.memo: dict[int, _Derived] = {}
        self.heads: dict[int, _HeadPart] = {}
        first = reqs[0] if reqs else None
        self.tp_raw = first.traceparent if first is not None else None
        self.tp = parse_traceparent(self.tp_raw) if self.tp_raw is not None else None
        self.tp_sampled = traceparent_sampled(self.tp_raw) if self.tp is not None and self.tp_raw else False
        self.trace_state = clean_tracestate(first.tracestate) if self.tp is not None and first else ""


_spans.setup(
    span=Span, span_fields=tuple(f.name for f in fields(Span)), exchange=Exchange, request=http1.RequestHead,
    response=http1.ResponseHead, parsed=_Parsed, request_slots=http1.RequestHead.__slots__,
    parsed_slots=_Parsed.__slots__, kind_server=SpanKind.SERVER, kind_client=SpanKind.CLIENT,
    unset=StatusCode.UNSET, error=StatusCode.ERROR, role_server=Role.SERVER, peer_kind=ParentKind.PEER,
    closed=EndReason.CLOSED, timeout=EndReason.TIMEOUT, evicted=EndReason.EVICTED,
    # error.type of an exchange the kernel ended before its response was complete
    aborted_err={EndReason.CLOSED: semconv.ERR_CLOSED, EndReason.TIMEOUT: semconv.ERR_TIMEOUT,
                 EndReason.EVICTED: semconv.ERR_EVICTED},
    err_incomplete=semconv.ERR_INCOMPLETE, status_messages=semconv.STATUS_MESSAGES, overflow_route=OVERFLOW_ROUTE,
    other_method=semconv.OTHER_METHOD, source_attr=PARENT_SOURCE_ATTR, framing_complete=http1.framing_complete,
    parse_final_response=http1.parse_final_response, parse_responses=http1.parse_responses,
    route_template=route_template, redact_query=semconv.redact_query, role_client=Role.CLIENT, hint=ParentHint,
    exchange_id=ExchangeId,
)  # fmt: skip


# What correlator/_spans.c's derive makes of a request head: (name, request attributes, scheme,
# path for url.full, query, Host/authority named the server, the heuristic's route or None when a
# template named it or there is none)
_Derived = tuple[str, dict[str, AttrValue], str, str, "str | None", bool, "str | None"]
# (method, method_original or None, scheme, Host as (host, port or None) or None, the request
# attributes after the target's: protocol version, user agent, body size)
_HeadPart = tuple[str, "str | None", str, "tuple[str, int | None] | None", dict[str, AttrValue]]
