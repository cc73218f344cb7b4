"""Parent/child linking: deterministic ids, and holding spans until their trace id is known.

Identity of an exchange: (conn_id, req_start_ns). span_id = H(salt, identity)[:8], so a parent
hint (which names the parent's identity) gives the parent's span id without any lookup. The
trace id is only known once the root of the tree is known, and in the kernel's order the root
finishes last (curl -> A -> B emits B-server, A-client, A-server, curl-client), so a span with a
hint is held until its parent is resolved; resolving a span releases its held descendants.

Rules (the issue was silent on some; these are the choices):
- Root (no hint): trace id from the span's own valid traceparent (incoming for a server span,
  outgoing for a client span of an instrumented app), its parent = the traceparent's parent id
  and trace_state from tracestate. Without one, the trace id of the first traceparent found in
  its held subtree (breadth first), so an instrumented app's outgoing trace id wins for the whole
  tree; else H(salt, "trace", identity).
- Hint and traceparent both: the parent is always the hinted (kspan-seen) span and the trace id
  is the parent's; a traceparent only decides the trace of the tree it roots (see above).
- Hint naming an exchange that was not HTTP (no span): it is resolved as a pass-through node;
  its children link to its own parent (or become roots of its trace).
- Held past max_hold (advance) or over the cap: the topmost held ancestor of the oldest held
  span is released as an orphan: parent_span_id stays the hinted parent's id, trace id from the
  subtree's traceparent if any, else H(salt, "trace", hinted identity) so siblings stay together,
  and so a parent that was merely slower than max_hold (a long request) and turns out to be a
  root without traceparent lands in the same trace as the children released before it.
- Resolved identities are remembered (bounded, for max_hold) so a child that arrives after its
  parent still links to it. The memory is correlator/_spans.c's Memory, shared with the feed path
  there, which remembers every exchange the kernel identified and releases what was held for it.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from hashlib import blake2b

from correlator import _spans
from correlator.records import ParentHint, ParentKind
from correlator.spans import Span

Key = tuple[int, int]  # (conn_id, req_start_ns)

_M64 = (1 << 64) - 1
_pack2 = struct.Struct("<QQ").pack
_pack3 = struct.Struct("<QQI").pack
_Z8 = b"\0" * 8
_Z7_1 = b"\0" * 7 + b"\1"
_Z16 = b"\0" * 16
_Z15_1 = b"\0" * 15 + b"\1"


# `kspan.parent.source` on every span: how its parent was found, so a user can audit a link.
PARENT_SOURCE_ATTR = "kspan.parent.source"
# (parent_source here, and correlator/_spans.c's feed path, read this one table)
SOURCE_BY_KIND = {
    int(ParentKind.THREAD): "thread",
    int(ParentKind.PROCESS): "process",
    int(ParentKind.PEER): "peer",
    int(ParentKind.GOROUTINE): "goroutine",
    int(ParentKind.TRACEPARENT): "traceparent",
    int(ParentKind.TCP_OPTION): "tcp_option",
    int(ParentKind.EVIDENCE): "evidence",
}


def parent_source(kind: int) -> str:
    return SOURCE_BY_KIND.get(kind, "none")


class _Node:
    __slots__ = ("key", "spans", "parent_key", "hint_kind", "pid", "tp_trace", "tp_parent", "since")

    def __init__(
        self,
        key: Key,
        spans: list[Span],
        parent_key: Key | None,
        hint_kind: int,
        pid: int,
        tp_trace: bytes | None,
        tp_parent: bytes | None,
    ) -> None:
        self.key = key
        self.spans = spans
        self.parent_key = parent_key
        self.hint_kind = hint_kind
        self.pid = pid
        self.tp_trace = tp_trace
        self.tp_parent = tp_parent
        self.since = 0


class Linker:
    def __init__(
        self, salt: bytes, max_hold_ns: int, max_held: int, max_resolved: int, counters: _spans.Counters | None = None
    ) -> None:
        # blake2b keys are at most 64 bytes: a longer salt is hashed down once.
        self._salt = salt if len(salt) <= 64 else blake2b(salt, digest_size=64).digest()
        self.max_hold_ns = max_hold_ns
        self.max_held = max(1, max_held)
        self.max_resolved = max(1, max_resolved)
        self._h24 = blake2b(digest_size=24, key=self._salt)
        # spans, orphaned_spans, held_dropped, late_links, duplicate_ids, self_hints are the linker's
        self.c = counters if counters is not None else _spans.Counters()
        # held and waiting are read by correlator/_spans.c's feed path too (a repeat of a held
        # identity is dropped there; a kernel-identified parent releases its waiting children).
        self.held: OrderedDict[Key, _Node] = OrderedDict()  # oldest first (since is monotonic)
        self.waiting: dict[Key, list[Key]] = {}  # parent identity -> held children, in arrival order
        # identity -> (trace id, the id children link to), oldest first, and stream time (now): up
        # to max_resolved entries (50,000 by default), in C without a Python object per entry.
        self.memory = _spans.Memory(self.max_resolved)

    # ids -------------------------------------------------------------------------------------

    def ids(self, conn_id: int, req_start_ns: int) -> tuple[bytes, bytes]:
        """(span_id, trace_id if this exchange roots a trace without a traceparent): one hash."""
        h = self._h24.copy()
        h.update(_pack2(conn_id & _M64, req_start_ns & _M64))
        d = h.digest()
        sid = d[:8]
        tid = d[8:]
        if sid == _Z8:
            sid = _Z7_1
        if tid == _Z16:
            tid = _Z15_1
        return sid, tid

    def span_id(self, conn_id: int, req_start_ns: int, index: int = 0) -> bytes:
        if index == 0:
            return self.ids(conn_id, req_start_ns)[0]
        # Pipelined requests after the first share its identity: the index tells them apart.
        h = self._h24.copy()
        h.update(_pack3(conn_id & _M64, req_start_ns & _M64, index & 0xFFFFFFFF))
        sid = h.digest()[:8]
        return sid if sid != _Z8 else _Z7_1

    def trace_id(self, key: Key) -> bytes:
        return self.ids(key[0], key[1])[1]

    # state -----------------------------------------------------------------------------------

    @property
    def held_count(self) -> int:
        return len(self.held)

    @property
    def resolved_count(self) -> int:
        return len(self.memory)

    def release_children(self, key: Key, trace: bytes, link: bytes | None) -> list[Span]:
        """The held spans that waited for key, released now that key went out with this trace
        and link (correlator/_spans.c's feed path calls it for an exchange the kernel identified,
        once key is remembered)."""
        out: list[Span] = []
        kids = self.waiting.pop(key, None)
        if kids:
            for ck in kids:
                ch = self.held.pop(ck, None)
                if ch is not None:
                    self._release(ch, trace, link, out)
        return out

    def add(
        self,
        key: Key,
        spans: list[Span],
        hint: ParentHint | None,
        pid: int,
        tp: tuple[bytes, bytes] | None,
        at_ns: int,
        root_trace: bytes | None = None,
    ) -> list[Span]:
        """Take the spans of one exchange (several when pipelined, none when it was not HTTP) and
        return every span whose trace id became known. root_trace: ids(key)[1] if the caller has
        it already (saves a hash)."""
        mem = self.memory
        if at_ns > mem.now:
            mem.now = at_ns
        out: list[Span] = []
        if key in self.held or key in mem:
            # The kernel names an exchange once; a repeat (replayed or corrupt record) must not
            # steal the first one's children. Its spans go out unlinked as their own trace.
            self.c.duplicate_ids += 1
            self._emit_detached(key, spans, tp, out)
            return out
        parent_key: Key | None = None
        kind = 0
        if hint is not None:
            parent_key = (hint.exchange.conn_id, hint.exchange.req_start_ns)
            kind = int(hint.kind)
            if parent_key == key:
                self.c.self_hints += 1
                parent_key = None
        node = _Node(key, spans, parent_key, kind, pid, tp[0] if tp else None, tp[1] if tp else None)
        node.since = mem.now
        kids = self.waiting.get(key)
        if kids and spans:
            # A client span whose server end (PEER child) is already here: record the peer.
            for ck in kids:
                c = self.held.get(ck)
                if c is not None and c.hint_kind == ParentKind.PEER:
                    for s in spans:
                        if not s.peer_pid:
                            s.peer_pid = c.pid
                    break
        if parent_key is None:
            self._release_root(node, out, root_trace)
            return out
        r = mem.get(parent_key)
        if r is not None:
            self.c.late_links += 1
            self._release(node, r[0], r[1], out)
            return out
        p = self.held.get(parent_key)
        if p is not None and kind == ParentKind.PEER:
            for s in p.spans:
                if not s.peer_pid:
                    s.peer_pid = pid
        self.held[key] = node
        self.waiting.setdefault(parent_key, []).append(key)
        while len(self.held) > self.max_held:
            _, oldest = next(iter(self.held.items()))
            n = self._orphan(oldest, out)
            self.c.held_dropped += n
        return out

    def expire(self, now_ns: int) -> list[Span]:
        """Release as orphans the held spans whose parent did not come within max_hold."""
        mem = self.memory
        if now_ns > mem.now:
            mem.now = now_ns
        out: list[Span] = []
        deadline = mem.now - self.max_hold_ns
        held = self.held
        while held:
            _, oldest = next(iter(held.items()))
            if oldest.since > deadline:
                break
            self.c.orphaned_spans += self._orphan(oldest, out)
        mem.expire(deadline)
        return out

    def drain(self) -> list[Span]:
        """Shutdown: release every held span (as orphans: their parents never came)."""
        out: list[Span] = []
        while self.held:
            _, oldest = next(iter(self.held.items()))
            self.c.orphaned_spans += self._orphan(oldest, out)
        return out

    # internals -------------------------------------------------------------------------------

    def _emit_detached(self, key: Key, spans: list[Span], tp: tuple[bytes, bytes] | None, out: list[Span]) -> None:
        trace = tp[0] if tp else self.trace_id((key[0] ^ 0x5A5A, key[1]))
        source = "traceparent" if tp else "none"
        for s in spans:
            s.trace_id = trace
            s.parent_span_id = tp[1] if tp else None
            s.attributes[PARENT_SOURCE_ATTR] = source
        out.extend(spans)
        self.c.spans += len(spans)

    def _subtree_traceparent(self, key: Key) -> bytes | None:
        """First traceparent trace id among the held descendants of key, breadth first."""
        kids = self.waiting.get(key)
        if not kids:
            return None
        q = deque(kids)
        seen: set[Key] = {key}
        held = self.held
        while q:
            k = q.popleft()
            if k in seen:
                continue
            seen.add(k)
            n = held.get(k)
            if n is None:
                continue
            if n.tp_trace is not None:
                return n.tp_trace
            more = self.waiting.get(k)
            if more:
                q.extend(more)
        return None

    def _release_root(self, node: _Node, out: list[Span], root_trace: bytes | None) -> None:
        if node.tp_trace is not None:
            self._release(node, node.tp_trace, node.tp_parent, out)
        else:
            trace = self._subtree_traceparent(node.key) or root_trace or self.trace_id(node.key)
            self._release(node, trace, None, out)

    def _orphan(self, node: _Node, out: list[Span]) -> int:
        """Release the topmost held ancestor of node (whose own parent never came) and its subtree.
        Returns the number of spans left without their parent."""
        top = node
        seen = {node.key}
        while top.parent_key is not None:
            p = self.held.get(top.parent_key)
            if p is None or p.key in seen:
                break
            seen.add(p.key)
            top = p
        del self.held[top.key]
        pk = top.parent_key
        assert pk is not None  # only hinted nodes are held
        sibs = self.waiting.get(pk)
        if sibs is not None:
            try:
                sibs.remove(top.key)
            except ValueError:
                pass
            if not sibs:
                del self.waiting[pk]
        trace = top.tp_trace or self._subtree_traceparent(top.key) or self.trace_id(pk)
        missing = self.span_id(pk[0], pk[1])
        before = len(out)
        self._release(top, trace, missing, out)
        # The orphans proper: spans left pointing at the parent that never came (the children
        # of a non-HTTP pass-through node when that node is the top).
        return sum(1 for s in out[before:] if s.parent_span_id == missing)

    def _release(self, node: _Node, trace: bytes, parent_link: bytes | None, out: list[Span]) -> None:
        """Give node its trace and parent, emit it, then its held descendants (breadth first)."""
        remember = self.memory.put
        waiting = self.waiting
        c = self.c
        q: deque[tuple[_Node, bytes | None]] | None = None
        n, pl = node, parent_link
        while True:
            spans = n.spans
            if spans:
                if n.parent_key is not None:
                    source = parent_source(n.hint_kind)
                else:
                    source = "traceparent" if pl is not None else "none"
                for s in spans:
                    s.trace_id = trace
                    s.parent_span_id = pl
                    s.attributes[PARENT_SOURCE_ATTR] = source
                out.extend(spans)
                c.spans += len(spans)
                link = spans[0].span_id
            else:
                link = pl  # not HTTP: its children hang on its own parent
            remember(n.key, trace, link)
            if waiting:
                kids = waiting.pop(n.key, None)
                if kids:
                    if q is None:
                        q = deque()
                    held = self.held
                    for ck in kids:
                        ch = held.pop(ck, None)
                        if ch is not None:
                            q.append((ch, link))
            if not q:
                break
            n, pl = q.popleft()


def make_linker(
    salt: bytes, max_hold_s: float, max_held: int, max_resolved: int, counters: _spans.Counters | None = None
) -> Linker:
    return Linker(salt, int(max_hold_s * 1e9), max_held, max_resolved, counters)
