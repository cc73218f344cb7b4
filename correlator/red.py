"""What one unsampled exchange adds to the RED and service-graph metrics, without a span.

Head sampling drops most traces, but metrics must count every request: the kernel sends an
unsampled exchange as a short KSPAN_REC_METRIC record (correlator.records.MetricExchange) and
this module turns it into RedFacts, the same attribute set exporters/metrics.py derives from a
span of that exchange (so sampled and unsampled requests land in the same series). The request
head's part (method, route, server address, version) is memoised by the head's bytes, as spans'
is; the status is the kernel's parse. Pure and deterministic.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from correlator import semconv
from correlator.records import EndReason, MetricExchange, ParentKind, Role
from correlator.spans import AttrValue

AttrKey = tuple[tuple[str, AttrValue], ...]

_SERVER = int(Role.SERVER)
_PEER = int(ParentKind.PEER)
_CLOSED = int(EndReason.CLOSED)
_ABORTED_ERR = {
    _CLOSED: semconv.ERR_CLOSED,
    int(EndReason.TIMEOUT): semconv.ERR_TIMEOUT,
    int(EndReason.EVICTED): semconv.ERR_EVICTED,
}


class RedFacts(NamedTuple):
    pid: int
    server: bool
    attrs: AttrKey  # in exporters/metrics.py's RED attribute order
    seconds: float
    failed: bool  # the span would have status ERROR
    span_id: bytes  # b"" without kernel ids: the service graph then pairs nothing
    parent_span_id: bytes  # b"": a root
    peer_pid: int  # server: the local client's process (the kernel's PEER link); else 0
    local_peer: bool  # the other end is on this host (its span may pair with this one)
    peer: str  # client: the far end's name for a virtual node (server.address); server: client.address
    local_port: int


def format_addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == socket.AF_INET6:
        text = socket.inet_ntop(socket.AF_INET6, raw[:16])
        # An IPv4 peer on a dual-stack socket: report the IPv4 address users know.
        return text[7:] if text.startswith("::ffff:") and "." in text else text
    return ""


def outcome(code: int | None, end: int, responded: bool, server: bool) -> tuple[str | None, bool]:
    """(error.type, failed) as a span of the exchange would have them. Without the response's
    tail, a response that has a status line is taken as complete unless the exchange timed out
    or was evicted (spans check the framing; the difference is a closed, cut response)."""
    if code is not None:
        if code >= 500 or (code >= 400 and not server):
            return str(code), True
        if end != _CLOSED and end in _ABORTED_ERR:
            return _ABORTED_ERR[end], True
        return None, False
    if not responded:
        err = _ABORTED_ERR.get(end)
        return err, err is not None
    if end == _CLOSED:
        return semconv.ERR_INCOMPLETE, True
    err = _ABORTED_ERR.get(end)
    return err, err is not None


def head_part(attrs: dict[str, AttrValue], server: bool, has_host: bool) -> HeadPart:
    """The part of the RED key a request head decides, from a span's request attributes
    (derive in correlator/_spans.c), so both paths share one derivation."""
    method = ("http.request.method", attrs["http.request.method"])
    route = attrs.get("http.route")
    rest: AttrKey = (("http.route", route),) if server and route else ()
    tail = tuple((k, attrs[k]) for k in ("url.scheme", "network.protocol.version") if k in attrs)
    hostport: AttrKey | None = None
    if not server and has_host:
        hostport = (("server.address", attrs["server.address"]), ("server.port", attrs["server.port"]))
    return HeadPart(method, rest, tail, hostport)


class HeadPart(NamedTuple):
    method: tuple[str, AttrValue]
    route: AttrKey  # server: http.route when a template matched
    tail: AttrKey  # url.scheme (server), network.protocol.version
    hostport: AttrKey | None  # client: server.address/port from Host or the target's authority


class FactsBuilder:
    """RedFacts from metric records, memoising what repeats across requests (the attribute set
    of a head and outcome, address texts): the per-request cost is a few dict lookups."""

    def __init__(self, memo_size: int = 1024) -> None:
        self._memo_size = memo_size
        self._keys: dict[tuple, tuple[AttrKey, bool]] = {}
        self._addrs: dict[bytes, str] = {}

    def addr(self, family: int, raw: bytes) -> str:
        a = self._addrs.get(raw)
        if a is None:
            a = format_addr(family, raw)
            if len(self._addrs) >= self._memo_size * 4:
                self._addrs.clear()
            self._addrs[raw] = a
        return a

    def facts(self, mx: MetricExchange, head: HeadPart) -> RedFacts:
        server = mx.role == _SERVER
        family = mx.family
        remote = self.addr(family, mx.remote_addr) if family else ""
        by_peer = not server and head.hostport is None
        k = (head, server, mx.status, mx.end, mx.responded, remote if by_peer else "",
             mx.remote_port if by_peer else 0)
        hit = self._keys.get(k)
        if hit is None:
            hit = _attrs(mx, head, server, remote)
            if len(self._keys) >= self._memo_size:
                self._keys.clear()
            self._keys[k] = hit
        attrs, failed = hit
        if server:
            peer = remote
            peer_pid = mx.parent_pid if mx.parent_kind == _PEER else 0
        else:
            hp = head.hostport
            peer = str(hp[0][1]) if hp else (remote or "unknown_service")
            peer_pid = 0
        local_peer = bool(remote) and (remote.startswith("127.") or remote == "::1"
                                       or remote == self.addr(family, mx.local_addr))
        return RedFacts(mx.pid, server, attrs, max(0, mx.end_ns - mx.start_ns) / 1e9, failed, mx.span_id,
                        mx.parent_span_id, peer_pid, local_peer, peer, mx.local_port)


def _attrs(mx: MetricExchange, head: HeadPart, server: bool, remote: str) -> tuple[AttrKey, bool]:
    status = mx.status
    code = status if 100 <= status <= 599 else None
    err, failed = outcome(code, mx.end, mx.responded, server)
    out: list[tuple[str, AttrValue]] = [head.method]
    if code is not None:
        out.append(("http.response.status_code", code))
    if err is not None:
        out.append(("error.type", err))
    if server:
        out.extend(head.route)
    else:
        hp = head.hostport
        if hp is None and remote:
            hp = (("server.address", remote), ("server.port", mx.remote_port))
        if hp:
            out.extend(hp)
    out.extend(head.tail)
    return tuple(out), failed
