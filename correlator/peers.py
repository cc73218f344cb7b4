"""The two ends of one TCP connection on this host, matched by their 4-tuple when the kernel gave
the server end no PEER hint.

The kernel links a server request to its local client when the client's request is registered
before the server reads it. On loopback that can lose a race: the bytes are delivered inside the
client's send (or its SSL_write, for a new TLS connection), so the server may read and even
answer before the client's probe has run. Here the server exchange of a local peer waits, in
stream time, for a client exchange whose (local, remote) endpoints are the server's (remote,
local) and whose request began first; the client usually arrives within microseconds, since it
ends after the server. Pure and deterministic like the rest of the correlator.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from correlator.records import Exchange, ExchangeId, ParentHint, ParentKind, Role

Endpoints = tuple[str, int, str, int]  # (local addr, local port, remote addr, remote port) of the client

_PER_TUPLE = 8  # keep-alive exchanges remembered per connection


def is_local_peer(ex: Exchange) -> bool:
    a = ex.remote_addr
    return bool(a) and (a.startswith("127.") or a == "::1" or a == ex.local_addr)


@dataclass(slots=True)
class _Client:
    req_start_ns: int
    resp_end_ns: int
    conn_id: int
    pid: int
    seen_ns: int


@dataclass(slots=True)
class Pending:
    """A server exchange waiting for its client: what Linker.add needs, minus the hint."""

    ex: Exchange
    args: tuple[Any, ...]
    since_ns: int


class PeerMatcher:
    def __init__(self, wait_ns: int, max_entries: int = 50_000) -> None:
        self.wait_ns = wait_ns
        self.max_entries = max_entries
        self._clients: OrderedDict[Endpoints, list[_Client]] = OrderedDict()
        self._pending: OrderedDict[tuple[int, int], Pending] = OrderedDict()  # oldest first
        self._by_tuple: dict[Endpoints, list[tuple[int, int]]] = {}
        self.links = 0

    @staticmethod
    def wants_peer(ex: Exchange) -> bool:
        """A server exchange with no parent hint whose peer is on this host."""
        return ex.role == Role.SERVER and ex.parent is None and ex.family != 0 and is_local_peer(ex)

    def client_for(self, server: Exchange) -> ParentHint | None:
        """The local client exchange already seen for this server exchange, if any."""
        cands = self._clients.get((server.remote_addr, server.remote_port, server.local_addr, server.local_port))
        if not cands:
            return None
        for c in reversed(cands):  # the latest request that began before the server read it
            if c.req_start_ns <= server.req_start_ns and (not c.resp_end_ns or c.resp_end_ns >= server.req_start_ns):
                self.links += 1
                return ParentHint(ParentKind.PEER, c.pid, ExchangeId(c.conn_id, c.req_start_ns))
        return None

    def is_pending(self, key: tuple[int, int]) -> bool:
        """Whether the server exchange with this identity (conn_id, req_start_ns) is parked."""
        return key in self._pending

    def hold(self, server: Exchange, args: tuple[Any, ...], now_ns: int) -> list[Pending]:
        """Park a server exchange; returns the oldest ones pushed out by the bound (to go out unlinked).
        Its identity must not be parked already (the correlator drops and counts such a repeat):
        overwriting would lose the first one silently."""
        key = (server.conn_id, server.req_start_ns)
        if key in self._pending:
            raise ValueError(f"exchange {key} is already waiting for its client")
        self._pending[key] = Pending(server, args, now_ns)
        tup = (server.remote_addr, server.remote_port, server.local_addr, server.local_port)
        self._by_tuple.setdefault(tup, []).append(key)
        out = []
        while len(self._pending) > self.max_entries:
            out.append(self._pop_oldest())
        return out

    def client_arrived(self, client: Exchange, now_ns: int) -> list[tuple[Pending, ParentHint]]:
        """Remember a client exchange; return the parked server exchanges it is the other end of."""
        if client.role != Role.CLIENT or client.family == 0 or not is_local_peer(client):
            return []
        tup = (client.local_addr, client.local_port, client.remote_addr, client.remote_port)
        lst = self._clients.get(tup)
        if lst is None:
            lst = self._clients[tup] = []
        else:
            self._clients.move_to_end(tup)
        lst.append(_Client(client.req_start_ns, client.resp_end_ns, client.conn_id, client.pid, now_ns))
        del lst[:-_PER_TUPLE]
        while len(self._clients) > self.max_entries:
            self._clients.popitem(last=False)
        keys = self._by_tuple.get(tup)
        if not keys:
            return []
        matched = []
        for key in list(keys):
            p = self._pending.get(key)
            if p is None:
                keys.remove(key)
                continue
            hint = self.client_for(p.ex)
            if hint is not None:
                del self._pending[key]
                keys.remove(key)
                matched.append((p, hint))
        if not keys:
            del self._by_tuple[tup]
        return matched

    def expire(self, now_ns: int) -> list[Pending]:
        """Parked server exchanges whose client did not come within the wait: they are roots."""
        out = []
        deadline = now_ns - self.wait_ns
        while self._pending:
            p = next(iter(self._pending.values()))
            if p.since_ns > deadline:
                break
            out.append(self._pop_oldest())
        while self._clients:
            tup, lst = next(iter(self._clients.items()))
            if lst[-1].seen_ns > deadline:
                break
            del self._clients[tup]
        return out

    def drain(self) -> list[Pending]:
        out = []
        while self._pending:
            out.append(self._pop_oldest())
        return out

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def _pop_oldest(self) -> Pending:
        key, p = self._pending.popitem(last=False)
        tup = (p.ex.remote_addr, p.ex.remote_port, p.ex.local_addr, p.ex.local_port)
        keys = self._by_tuple.get(tup)
        if keys is not None:
            if key in keys:
                keys.remove(key)
            if not keys:
                del self._by_tuple[tup]
        return p
