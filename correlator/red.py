"""What one unsampled exchange adds to the RED and service-graph metrics, without a span.

Head sampling drops most traces, but metrics must count every request: the kernel sends an
unsampled exchange as a short KSPAN_REC_METRIC record (correlator.records.MetricExchange) and
this module turns it into RedFacts, the same attribute set exporters/metrics.py derives from a
span of that exchange (so sampled and unsampled requests land in the same series). The request
head's part (method, route, server address, version) is the span path's derivation (head_part),
memoised by the head without its target, the route coming from the path alone; the status is the
kernel's parse. Without the response's tail, a response that has a status line is taken as
complete unless the exchange timed out or was evicted (spans check the framing; the difference
is a closed, cut response). Pure and deterministic.

MetricPath (correlator/_red.c) is that path, one per correlator: Correlator.metric calls it for
every metric record.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from correlator import _red, semconv
from correlator.records import EndReason, MetricExchange, ParentKind, Role
from correlator.routes import OVERFLOW_ROUTE
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


# The metric-record path itself (the request head's memos, the route and its cap, outcome and
# attribute set, the RedFacts) is C: correlator/_red.c, given these types and constants once.
_red.setup(
    red_facts=RedFacts, facts_fields=RedFacts._fields, metric_fields=MetricExchange._fields,
    head_fields=HeadPart._fields, format_addr=format_addr, aborted_err=_ABORTED_ERR,
    err_incomplete=semconv.ERR_INCOMPLETE, overflow_route=OVERFLOW_ROUTE, closed=_CLOSED, server=_SERVER, peer=_PEER,
)  # fmt: skip
MetricPath = _red.MetricPath
