"""The Redis decoder on real traffic: Debian's redis-server started here in a temporary directory,
redis-py (RESP2 and RESP3) through the recording relay, both ends' views decoded. Plus bad input
(garbage, cut messages, a connection picked up mid-stream, values beyond the copy) and properties
over arbitrary bytes and splits."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols.redis import COUNTERS, MAX_PENDING, RedisDecoder
from correlator.segments import SEGMENT_DATA, Operation, Segment
from tests.support.dbservers import Server, redis_server
from tests.support.relay import Relay, relaying
from tests.support.segment_cuts import C2S_ISN, M32, S2C_ISN, cut_whole, merge_runs, recut, true_positions, with_pos

SECRET = "sekrit-42"  # planted in keys, values, channel names and messages
PASSWORD = "pw-Sekrit-77"  # the AUTH server's requirepass


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with redis_server(None) as s:
        yield s


@pytest.fixture(scope="module")
def auth_server() -> Iterator[Server]:
    with redis_server(PASSWORD) as s:
        yield s


def decode(segs: list[Segment], **kw: bool) -> tuple[list[Operation], RedisDecoder]:
    d = RedisDecoder(**kw)
    ops: list[Operation] = []
    for s in segs:
        ops += d.feed(s)
    ops += d.close((segs[-1].end_ns if segs else 0) + 1)
    return ops, d


def settle(r: Relay, conns: int, quiet_s: float = 0.15) -> None:
    """Wait until the relay has seen `conns` connections and no chunk arrived for quiet_s."""
    deadline = time.monotonic() + 10
    last = -1
    while time.monotonic() < deadline:
        n = len(r.chunks)
        if n == last and len({c[0] for c in r.chunks}) >= conns:
            return
        last = n
        time.sleep(quiet_s)


def views(r: Relay, idx: int, full: bool = False) -> list[tuple[bool, list[Segment]]]:
    """(True, the client's segments), (False, the server's) of one relayed connection."""
    return [(True, r.client_segments(full)[idx]), (False, r.server_segments(full)[idx])]


def shape(ops: list[Operation]) -> list[tuple[str, str | None, str | None]]:
    return [(o.name, o.attributes.get("db.query.text"), o.error) for o in ops]  # type: ignore[misc]


def assert_clean(ops: list[Operation], *secrets: str) -> None:
    for o in ops:
        text = repr((o.name, o.attributes, o.error, o.error_message))
        for s in (SECRET, PASSWORD, *secrets):
            assert s.lower() not in text.lower(), (s, text)


def after_handshake(ops: list[Operation]) -> list[Operation]:
    """redis-py's connect-time commands (HELLO, AUTH, CLIENT SETINFO, ...) dropped."""
    i = 0
    while i < len(ops) and ops[i].name in ("HELLO", "AUTH", "CLIENT", "CLIENT SETINFO"):
        i += 1
    return ops[i:]


def test_commands_both_views(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        c.set(f"user:{SECRET}", SECRET)
        assert c.get(f"user:{SECRET}") == SECRET.encode()
        assert c.get("missing") is None
        c.incr("n")
        c.hset("h", mapping={"f": SECRET, "g": "2"})
        c.hgetall("h")
        c.rpush("l", SECRET, "b", "c")
        c.lrange("l", 0, -1)
        c.execute_command("CLIENT", "SETNAME", f"name-{SECRET}")
        c.config_get("maxmemory")
        with pytest.raises(redis.ResponseError):
            c.lpush(f"user:{SECRET}", "x")  # WRONGTYPE
        with pytest.raises(redis.ResponseError):
            c.execute_command(f"NOSUCH{SECRET}", SECRET)  # echoed back in the error text
        c.delete(f"user:{SECRET}", "n", "h", "l")
        c.close()
        settle(r, 1)
        expected = [
            ("SET", "SET ? ?", None), ("GET", "GET ?", None), ("GET", "GET ?", None),
            ("INCRBY", "INCRBY ? ?", None), ("HSET", "HSET ? ? ? ? ?", None), ("HGETALL", "HGETALL ?", None),
            ("RPUSH", "RPUSH ? ? ? ?", None), ("LRANGE", "LRANGE ? ? ?", None),
            ("CLIENT SETNAME", "CLIENT SETNAME ?", None), ("CONFIG GET", "CONFIG GET ?", None),
            ("LPUSH", "LPUSH ? ?", "WRONGTYPE"), ("_OTHER", "_OTHER ?", "ERR"), ("DEL", "DEL ? ? ? ?", None),
        ]  # fmt: skip
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert all(o.attributes["db.system.name"] == "redis" for o in ops)
            body = after_handshake(ops)
            assert shape(body) == expected
            # redis-py's first command is its CLIENT SETINFO handshake: the database is 0.
            assert {o.attributes.get("db.namespace") for o in ops} == {"0"}
            wrongtype = body[10]
            assert wrongtype.attributes["db.response.status_code"] == "WRONGTYPE"
            assert wrongtype.error_message and "wrong kind" not in wrongtype.error_message
            assert all(o.name == o.attributes["db.operation.name"] for o in ops)
            assert all(o.start_ns <= o.end_ns for o in ops)
            assert d.counters["commands"] == d.counters["replies"] == len(ops)
            bad = {k: v for k, v in d.counters.items() if k not in ("commands", "replies", "unknown_commands")}
            assert not any(bad.values()), bad
            assert d.counters["unknown_commands"] == 1


def test_pipeline_of_50(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        c.ping()
        p = c.pipeline(transaction=False)
        for _ in range(50):
            p.incr(f"{SECRET}:n")
        assert p.execute()[-1] == 50
        c.delete(f"{SECRET}:n")
        c.close()
        settle(r, 1)
        for client, segs in views(r, 0, full=True):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            body = after_handshake(ops)
            assert [o.name for o in body] == ["PING"] + ["INCRBY"] * 50 + ["DEL"]
            incrs = body[1:51]
            # One write carried the 50 commands: they start together and end in order.
            assert len({o.start_ns for o in incrs}) <= 3
            assert [o.end_ns for o in incrs] == sorted(o.end_ns for o in incrs)
            assert d.counters["replies_unpaired"] == 0 and d.counters["commands_lost"] == 0
        # The kernel copies 512 bytes of the 2-kB write: the commands beyond are lost, and
        # their 32-odd replies are counted, not paired with DEL.
        for client, segs in views(r, 0):
            assert any(s.truncated for s in segs)
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            body = after_handshake(ops)
            n_incr = sum(o.name == "INCRBY" for o in body)
            assert 10 <= n_incr < 50
            assert n_incr + d.counters["replies_unpaired"] == 50
            assert d.counters["commands_lost"] >= 1
            assert [o.name for o in body] == ["PING"] + ["INCRBY"] * n_incr + ["DEL"]
            assert body[-1].error is None


def test_multi_exec(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        c.set("t:s", SECRET)
        p = c.pipeline(transaction=True)
        p.set("t:a", "1").incr("t:s").get("t:a")
        res = p.execute(raise_on_error=False)
        assert isinstance(res[1], redis.ResponseError)
        p = c.pipeline(transaction=True)
        p.set("t:b", "1").execute_command("SET", "t:only-key")  # wrong arity: refused when queued
        with pytest.raises(redis.ResponseError):
            p.execute()
        c.close()
        settle(r, 1)
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            body = after_handshake(ops)
            assert shape(body) == [
                ("SET", "SET ? ?", None), ("MULTI", "MULTI", None),
                ("SET", "SET ? ?", None), ("INCRBY", "INCRBY ? ?", "ERR"), ("GET", "GET ?", None),
                ("EXEC", "EXEC", None),
                ("MULTI", "MULTI", None), ("SET", "SET ?", "ERR"),
                ("SET", "SET ? ?", "EXECABORT"), ("EXEC", "EXEC", "EXECABORT"),
            ]  # fmt: skip
            exec_ = body[5]
            assert all(o.end_ns == exec_.end_ns for o in body[2:5])


def test_select_sets_namespace(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port, db=3)
        c.set("k", SECRET)
        c.execute_command("SELECT", 5)
        c.get("k")
        with pytest.raises(redis.ResponseError):
            c.execute_command("SELECT", 99)  # out of range: the namespace stays 5
        c.get("k")
        c.close()
        settle(r, 1)
        for client, segs in views(r, 0):
            ops, _ = decode(segs)
            assert all(o.client is client for o in ops)
            got = [(o.name, o.attributes.get("db.namespace")) for o in after_handshake(ops)]
            assert got == [("SELECT", "0"), ("SET", "3"), ("SELECT", "3"), ("GET", "5"), ("SELECT", "5"),
                           ("GET", "5")]  # fmt: skip
            # Picked up after the SELECTs, nothing tells the database: no namespace.
            later = [s for s in segs if s.start_ns >= after_handshake(ops)[3].start_ns]
            ops2, _ = decode(later)
            assert [o.attributes.get("db.namespace") for o in ops2] == [None, None, None]


def test_resp3_types_and_push(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port, protocol=3)
        c.hset("h3", mapping={"a": SECRET})
        assert c.hgetall("h3") == {b"a": SECRET.encode()}  # a map
        c.sadd("s3", SECRET)
        c.smembers("s3")  # a set
        c.zadd("z3", {SECRET: 1.5})
        assert c.zscore("z3", SECRET) == 1.5  # a double
        assert c.get("nothing") is None  # RESP3 null
        for t in ("bignum", "verbatim", "true", "false", "map", "set", "double", "null", "push"):
            c.execute_command("DEBUG", "PROTOCOL", t)
        c.close()
        # An attribute ahead of a reply: redis-py cannot parse it, so it is sent by hand.
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(b"HELLO 3\r\n")
            _read_until(s, b"modules")
            s.sendall(b"*3\r\n$5\r\nDEBUG\r\n$8\r\nPROTOCOL\r\n$6\r\nattrib\r\n*1\r\n$4\r\nPING\r\n")
            _read_until(s, b"PONG\r\n")
        settle(r, 2)
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            body = after_handshake(ops)
            assert [o.name for o in body] == ["HSET", "HGETALL", "SADD", "SMEMBERS", "ZADD", "ZSCORE", "GET"] + [
                "DEBUG"] * 9  # fmt: skip
            assert ops[0].name == "HELLO" and "db.query.text" not in ops[0].attributes
            assert d._resp3
            assert d.counters["pushes"] == 1  # DEBUG PROTOCOL push: a push, then the real reply
            assert d.counters["replies"] == d.counters["commands"] == len(ops)
        for client, segs in views(r, 1):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert shape(ops) == [("HELLO", None, None), ("DEBUG", "DEBUG ? ?", None), ("PING", "PING", None)]
            assert ops[0].client is client
            assert d.counters["protocol_errors"] == 0 and d.counters["replies_unpaired"] == 0


def _read_until(s: socket.socket, marker: bytes) -> bytes:
    buf = b""
    s.settimeout(5)
    while marker not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def test_resp3_tracking_invalidation_is_not_a_reply(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port, protocol=3, single_connection_client=True)
        c.execute_command("CLIENT", "TRACKING", "ON")
        c.set(f"tr:{SECRET}", "1")
        c.get(f"tr:{SECRET}")
        other = redis.Redis(port=server.port)
        other.set(f"tr:{SECRET}", "2")  # the server pushes an invalidation to the tracking client
        other.close()
        time.sleep(0.2)
        c.ping()
        c.close()
        settle(r, 1)
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert [o.name for o in after_handshake(ops)] == ["CLIENT TRACKING", "SET", "GET", "PING"]
            assert "CLIENT TRACKING" in [o.name for o in ops]
            assert d.counters["pushes"] >= 1  # the invalidation push
            assert d.counters["replies_unpaired"] == 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub(server: Server, protocol: int) -> None:
    chan = f"ch-{SECRET}"
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port, protocol=protocol)
        ps = c.pubsub()
        ps.subscribe(chan, "ch2")
        ps.psubscribe("pat:*")
        for _ in range(3):
            assert ps.get_message(timeout=5) is not None  # the three confirmations
        pub = redis.Redis(port=server.port)
        assert pub.publish(chan, SECRET) == 1
        assert pub.publish("pat:x", SECRET) == 1
        pub.close()
        got = [ps.get_message(timeout=5) for _ in range(2)]
        assert all(m is not None and m["type"] in ("message", "pmessage") for m in got)
        ps.ping()
        assert ps.get_message(timeout=5) is not None
        ps.unsubscribe()  # all channels: one confirmation each
        ps.punsubscribe()
        for _ in range(3):
            assert ps.get_message(timeout=5) is not None
        ps.close()
        c.close()
        settle(r, 1)
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops, chan)
            assert shape(after_handshake(ops)) == [
                ("SUBSCRIBE", "SUBSCRIBE ? ?", None), ("PSUBSCRIBE", "PSUBSCRIBE ?", None), ("PING", "PING", None),
                ("UNSUBSCRIBE", "UNSUBSCRIBE", None), ("PUNSUBSCRIBE", "PUNSUBSCRIBE", None),
            ]  # fmt: skip
            body = after_handshake(ops)
            assert body[0].end_ns <= body[1].end_ns  # redis-py pipelines them; confirmations come in order
            assert d.counters["pushes"] == 2  # the two messages: not replies
            assert d.counters["replies_unpaired"] == 0 and d.counters["commands_unanswered"] == 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_auth_secret_never_leaves(auth_server: Server, protocol: int) -> None:
    with relaying(("127.0.0.1", auth_server.port)) as r:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=r.port, password=f"wrong-{PASSWORD}", protocol=protocol).ping()
        c = redis.Redis(port=r.port, password=PASSWORD, protocol=protocol)
        c.set(SECRET, SECRET)
        c.execute_command("AUTH", PASSWORD)  # AUTH again, mid-connection
        c.close()
        settle(r, 2)
        first = "HELLO" if protocol == 3 else "AUTH"
        conns = sorted(r.client_segments())  # redis-py retries the refused connection
        assert len(conns) >= 2
        for idx in conns:
            errors = {"WRONGPASS"} if idx != conns[-1] else set()
            for client, segs in views(r, idx):
                assert any(PASSWORD.encode() in s.data for s in segs)  # it was on the wire
                ops, d = decode(segs)
                assert all(o.client is client for o in ops)
                assert_clean(ops)
                assert ops[0].name == first and "db.query.text" not in ops[0].attributes
                assert {o.error for o in ops if o.name == first} - {None} == errors
                if idx == conns[-1]:
                    assert [o.name for o in ops][-2:] == ["SET", "AUTH"]
                    assert all("db.query.text" not in o.attributes for o in ops if o.name == "AUTH")


def test_big_values_are_stepped_over(server: Server) -> None:
    big = (SECRET * 3000).encode()  # 27 kB: most of it beyond the 512-byte copy
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        c.set("big", big)
        assert c.get("big") == big
        c.strlen("big")
        c.close()
        c = redis.Redis(port=r.port)
        c.mget("big", "big")  # the second value's header lies beyond the copy of the first
        c.strlen("big")
        c.close()
        settle(r, 2)
        for client, segs in views(r, 0):
            assert any(s.truncated for s in segs)
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert shape(after_handshake(ops)) == [
                ("SET", "SET ? ?", None), ("GET", "GET ?", None), ("STRLEN", "STRLEN ?", None),
            ]  # fmt: skip
            assert d.counters["bulk_bytes_skipped"] >= 2 * len(big) - 8 * SEGMENT_DATA
            assert d.counters["bytes_undecoded"] == 0 and d.counters["protocol_errors"] == 0
            assert d.counters["replies"] == d.counters["commands"] == len(ops)
        for client, segs in views(r, 1):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            # MGET still gives its operation, ending with the transfer that held its reply; the
            # undecodable rest is counted, and STRLEN pairs with its own reply.
            assert shape(after_handshake(ops)) == [("MGET", "MGET ? ?", None), ("STRLEN", "STRLEN ?", None)]
            assert d.counters["replies_lost"] == 1 and d.counters["bytes_undecoded"] > 0


def test_garbage_on_the_port(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        for payload in (bytes(range(256)) * 4, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\xaa" * 600,
                        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):  # fmt: skip
            with socket.create_connection(("127.0.0.1", r.port)) as s:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(5)
                with contextlib.suppress(OSError):
                    while s.recv(65536):
                        pass
        settle(r, 3)
        for idx in range(3):
            for client, segs in views(r, idx):
                ops, d = decode(segs)
                assert all(o.client is client for o in ops)
                assert d.counters["decoder_errors"] == 0
                lost = d.counters["protocol_errors"] + d.counters["replies_unpaired"] + d.counters["bytes_undecoded"]
                assert lost > 0, d.counters
                for o in ops:
                    assert o.name in ("GET", "_OTHER") and o.error is not None


def test_cut_mid_frame_and_midstream_pickup(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        for i in range(5):
            c.set(f"k{i}", SECRET)
            c.get(f"k{i}")
        c.close()
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$9\r\nsekrit")  # the client dies mid-command
        settle(r, 2)
        full_ops = {client: decode(segs)[0] for client, segs in views(r, 0)}
        for client, segs in views(r, 0):
            # Picked up mid-message: the first segment starts 7 bytes into a command.
            start = next(i for i, s in enumerate(segs) if s.data.startswith(b"*3\r\n$3\r\nSET"))
            first = segs[start]
            tail = [replace(first, data=first.data[7:], length=first.length - 7)] + segs[start + 1 :]
            ops, d = decode(tail)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert d.counters["protocol_errors"] + d.counters["bytes_undecoded"] > 0
            assert d.counters["replies_unpaired"] == 1  # the cut SET's reply
            assert len(ops) == 9 and ops[0].name == "GET"  # the cut SET's GET, then 4 SET/GET pairs
            assert shape(ops) == shape(full_ops[client][-len(ops) :])
            # Picked up at the SET's value: a lone bulk string decides nothing (it could be a
            # reply as well as a command's tail), so the direction still comes out right.
            at = first.data.index(b"$9\r\n")
            tail = [replace(first, data=first.data[at:], length=first.length - at)] + segs[start + 1 :]
            ops, d = decode(tail)
            assert all(o.client is client for o in ops)
            assert d.counters["replies_unpaired"] == 2  # the value, then the SET's OK
            assert shape(ops) == shape(full_ops[client][-9:])
            # Picked up with the first segment a reply: counted, then in step.
            ops2, d2 = decode(segs[start + 1 :])
            assert all(o.client is client for o in ops2)
            assert d2.counters["replies_unpaired"] == 1
            assert shape(ops2) == shape(full_ops[client][-len(ops2) :])
        for client, segs in views(r, 1):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert ops == [] and d.counters["messages_cut"] == 1


def test_script_errors_monitor_and_client_reply(server: Server) -> None:
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        with pytest.raises(redis.ResponseError):
            c.eval(f"return redis.error_reply('SEKRIT42 {SECRET}')", 0)  # a script picks its own prefix
        with pytest.raises(redis.ResponseError):
            c.eval(f"return redis.error_reply('WRONGTYPE {SECRET}')", 0)  # or one of Redis's
        c.close()
        # MONITOR: after its OK, the server streams a line per command it runs; none is a reply.
        with socket.create_connection(("127.0.0.1", r.port)) as m:
            m.sendall(b"*1\r\n$7\r\nMONITOR\r\n")
            _read_until(m, b"+OK\r\n")
            other = redis.Redis(port=server.port)
            other.set(SECRET, SECRET)
            other.get(SECRET)
            other.close()
            _read_until(m, b'"GET"')
        # CLIENT REPLY OFF: the server answers nothing until CLIENT REPLY ON (inline commands).
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(b"CLIENT REPLY OFF\r\nSET a " + SECRET.encode() + b"\r\nCLIENT REPLY SKIP\r\nGET a\r\n"
                      b"CLIENT REPLY ON\r\nPING\r\n")  # fmt: skip
            _read_until(s, b"+PONG\r\n")
        settle(r, 3)
        for client, segs in views(r, 0):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops, "SEKRIT42")
            got = [(o.name, o.attributes.get("db.query.text"), o.attributes.get("db.response.status_code"))
                   for o in after_handshake(ops)]  # fmt: skip
            assert got == [("EVAL", "EVAL ? ?", "_OTHER"), ("EVAL", "EVAL ? ?", "WRONGTYPE")]
        for client, segs in views(r, 1):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert shape(ops) == [("MONITOR", "MONITOR", None)]
            assert d.counters["pushes"] >= 2 and d.counters["replies_unpaired"] == 0
        for client, segs in views(r, 2):
            ops, d = decode(segs)
            assert all(o.client is client for o in ops)
            assert_clean(ops)
            assert shape(ops) == [
                ("CLIENT REPLY", "CLIENT REPLY ?", None), ("SET", "SET ? ?", None),
                ("CLIENT REPLY", "CLIENT REPLY ?", None), ("GET", "GET ?", None),
                ("CLIENT REPLY", "CLIENT REPLY ?", None), ("PING", "PING", None),
            ]  # fmt: skip
            assert d.counters["replies"] == 2 and d.counters["replies_unpaired"] == 0


def test_hints_from_the_caller(server: Server) -> None:
    """The lead knows which end the traced process is and whether the connection was seen from
    its start; without a handshake command the database is then 0."""
    with relaying(("127.0.0.1", server.port)) as r:
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
            _read_until(s, b"+OK\r\n")
        settle(r, 1)
        for client, segs in views(r, 0):
            ops, _ = decode(segs)
            assert [o.attributes.get("db.namespace") for o in ops] == [None]
            ops, _ = decode(segs, client=client, from_start=True)
            assert [(o.name, o.client, o.attributes.get("db.namespace")) for o in ops] == [("SET", client, "0")]


def test_pending_table_is_bounded_without_mispairing() -> None:
    n = MAX_PENDING + 7
    cmd = b"*2\r\n$3\r\nGET\r\n$9\r\n" + SECRET.encode() + b"\r\n"
    d = RedisDecoder(client=True)
    ops: list[Operation] = []
    for i in range(n):  # command i at time i
        ops += d.feed(Segment(1, 1, 1, True, i, i, len(cmd), cmd))
    for i in range(n):  # its reply at time 10**6 + i
        ops += d.feed(Segment(1, 1, 1, False, 10**6 + i, 10**6 + i, 5, b"+OK\r\n"))
    assert len(ops) == MAX_PENDING
    assert d.counters["commands_evicted"] == 7 and d.counters["replies_unpaired"] == 7
    assert all(o.end_ns - 10**6 == o.start_ns for o in ops)  # each paired with its own reply


def test_counters_are_declared() -> None:
    d = RedisDecoder()
    assert tuple(d.counters) == COUNTERS


# -- properties --------------------------------------------------------------------------------

_CMDS = ["GET", "SET", "DEL", "INCR", "HSET", "LPUSH", "PING", "CONFIG", "CLIENT", "EXPIRE", "MGET"]


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _segs(chunks: list[tuple[bool, bytes]], cap: int) -> list[Segment]:
    out = []
    for i, (egress, data) in enumerate(chunks):
        out.append(Segment(conn_id=1, pid=1, tid=1, egress=egress, start_ns=i * 10, end_ns=i * 10 + 5,
                           length=len(data), data=data[:cap]))  # fmt: skip
    return out


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=700)), max_size=30), st.integers(0, SEGMENT_DATA))
def test_arbitrary_bytes_never_raise(chunks: list[tuple[bool, bytes]], cap: int) -> None:
    for kw in ({}, {"client": True}, {"client": False}):
        d = RedisDecoder(**kw)  # type: ignore[arg-type]
        for s in _segs(chunks, cap):
            for o in d.feed(s):
                assert o.protocol == "redis" and o.start_ns <= o.end_ns
        d.close(10**12)
        assert d.counters["decoder_errors"] == 0
        assert all(v >= 0 for v in d.counters.values())


_replies = st.recursive(
    st.sampled_from([b"+OK\r\n", b"-ERR " + SECRET.encode() + b"\r\n", b":7\r\n", b"$-1\r\n", b"_\r\n", b",1.5\r\n",
                     b"#t\r\n", b"(123\r\n", _bulk(SECRET.encode()), b"=8\r\ntxt:abcd\r\n"]),  # fmt: skip
    lambda inner: st.lists(inner, max_size=4).flatmap(
        lambda xs: st.sampled_from([b"*%d\r\n" % len(xs), b"~%d\r\n" % len(xs)]).map(lambda h: h + b"".join(xs))),
    max_leaves=8,
)


@given(st.lists(st.tuples(st.sampled_from(_CMDS), st.lists(st.binary(max_size=600), max_size=3), _replies),
                min_size=1, max_size=10),
       st.lists(st.integers(1, 900), min_size=1, max_size=8), st.integers(0, 80), st.booleans())  # fmt: skip
def test_truncated_copies_never_mislead(cmds: list[tuple[str, list[bytes], bytes]], cuts: list[int], cap: int,
                                        client: bool) -> None:  # fmt: skip
    """Real-shaped traffic copied `cap` bytes per transfer: never an exception, never a value out,
    never more operations than commands, and losses are counted."""
    chunks: list[tuple[bool, bytes]] = []
    for name, args, reply in cmds:
        wire = b"*%d\r\n" % (1 + len(args)) + _bulk(name.encode()) + b"".join(_bulk(SECRET.encode() + a) for a in args)
        for egress, w in ((client, wire), (not client, reply)):
            i = k = 0
            while i < len(w):
                chunks.append((egress, w[i : i + cuts[k % len(cuts)]]))
                i += cuts[k % len(cuts)]
                k += 1
    ops, d = decode(_segs(chunks, cap))
    assert len(ops) <= len(cmds) and d.counters["decoder_errors"] == 0
    assert {o.name.split(" ")[0] for o in ops} <= set(_CMDS) | {"_OTHER"}
    for o in ops:
        assert o.client is client
        assert SECRET not in repr((o.name, o.attributes, o.error, o.error_message))
    if any(len(c) > cap for _, c in chunks) and len(ops) < len(cmds):
        lost = ("commands_lost", "replies_unpaired", "bytes_undecoded", "protocol_errors", "messages_cut")
        assert any(d.counters[k] for k in lost), d.counters


@given(
    st.lists(st.tuples(st.sampled_from(_CMDS), st.lists(st.binary(max_size=40), max_size=4), _replies), min_size=1,
             max_size=12),  # fmt: skip
    st.lists(st.integers(1, 64), min_size=1, max_size=8),
    st.booleans(),
)
def test_resp_roundtrip_any_split(cmds: list[tuple[str, list[bytes], bytes]], cuts: list[int], client: bool) -> None:
    """Commands and replies cut at arbitrary points (full copies): every command is one operation,
    in order, and no argument appears in the output."""
    wire_c, wire_r = b"", b""
    for name, args, reply in cmds:
        args = [SECRET.encode() + a for a in args]
        wire_c += b"*%d\r\n" % (1 + len(args)) + _bulk(name.encode()) + b"".join(_bulk(a) for a in args)
        wire_r += reply
    # The client's view: commands egress; interleave: all commands first, then replies, each split.
    chunks: list[tuple[bool, bytes]] = []
    for egress, wire in ((client, wire_c), (not client, wire_r)):
        i = k = 0
        while i < len(wire):
            n = cuts[k % len(cuts)]
            chunks.append((egress, wire[i : i + n]))
            i += n
            k += 1
    segs = _segs(chunks, 1 << 20)
    ops, d = decode(segs)
    assert [o.name.split(" ")[0] for o in ops] == [n for n, _, _ in cmds]
    assert all(o.client is client for o in ops)
    assert d.counters["replies_unpaired"] == d.counters["protocol_errors"] == 0
    for o in ops:
        assert SECRET not in repr((o.name, o.attributes, o.error, o.error_message))


# -- request positions (Operation.req_pos) -----------------------------------------------------

def _cmd(*words: bytes) -> bytes:
    return b"*%d\r\n" % len(words) + b"".join(_bulk(w) for w in words)


def _flight(cmd_egress: bool, writes: list[bytes], replies: list[bytes], pos: int = C2S_ISN) -> list[Segment]:
    """Each write a transfer (copied up to SEGMENT_DATA bytes), then each reply, positioned."""
    segs = [Segment(1, 1, 1, cmd_egress, i, i, len(w), w[:SEGMENT_DATA]) for i, w in enumerate(writes)]
    segs += [Segment(1, 1, 1, not cmd_egress, 100 + i, 100 + i, len(r), r) for i, r in enumerate(replies)]
    return with_pos(segs, cmd_egress, (pos, S2C_ISN))


SET_C, GET_C, DEL_C = _cmd(b"SET", b"k", SECRET.encode()), _cmd(b"GET", b"k"), _cmd(b"DEL", b"k", b"j")
REPLIES = [b"+OK\r\n", _bulk(SECRET.encode()), b":1\r\n"]


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_one_command_per_transfer(client: bool) -> None:
    segs = _flight(client, [SET_C, GET_C, DEL_C], REPLIES)
    want = [C2S_ISN, C2S_ISN + len(SET_C), C2S_ISN + len(SET_C) + len(GET_C)]
    for hint in (client, None):
        ops, _ = decode(segs, client=hint, from_start=True)  # type: ignore[arg-type]
        assert [(o.name, o.client, o.req_pos) for o in ops] == [
            ("SET", client, want[0]), ("GET", client, want[1]), ("DEL", client, want[2])]  # fmt: skip


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_pipelined_in_one_transfer(client: bool) -> None:
    ops, _ = decode(_flight(client, [SET_C + GET_C + DEL_C], [b"".join(REPLIES)], pos=5000), client=client,
                    from_start=True)  # fmt: skip
    assert [o.req_pos for o in ops] == [5000, 5000 + len(SET_C), 5000 + len(SET_C) + len(GET_C)]
    # Inline commands (telnet style), several lines in one write: each line its own start.
    ops, _ = decode(_flight(client, [b"PING\r\nECHO hi\r\n\r\nPING\r\n"], [b"+PONG\r\n$2\r\nhi\r\n+PONG\r\n"],
                            pos=77), client=client, from_start=True)  # fmt: skip
    assert [(o.name, o.req_pos) for o in ops] == [("PING", 77), ("ECHO", 83), ("PING", 94)]


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_the_same_however_the_bytes_are_cut(client: bool) -> None:
    wire = SET_C + GET_C + DEL_C
    whole, _ = decode(_flight(client, [wire], REPLIES), client=client, from_start=True)
    assert len(whole) == 3 and all(o.req_pos is not None for o in whole)
    for n in (1, 2, 3, 7, len(SET_C) - 1):
        parts = [wire[i : i + n] for i in range(0, len(wire), n)]
        ops, d = decode(_flight(client, parts, REPLIES), client=client, from_start=True)
        assert [(o.name, o.req_pos) for o in ops] == [(o.name, o.req_pos) for o in whole], n
        assert d.counters["protocol_errors"] == 0


def test_req_pos_wraps_at_2_32() -> None:
    start = 2**32 - len(SET_C) - 3  # the GET's first byte lies 3 bytes before the wrap, DEL's after
    wire = SET_C + GET_C + DEL_C
    for cut in (len(wire), 1, 5):
        parts = [wire[i : i + cut] for i in range(0, len(wire), cut)]
        ops, _ = decode(_flight(True, parts, REPLIES, pos=start), client=True, from_start=True)
        assert [o.req_pos for o in ops] == [start, 2**32 - 3, len(GET_C) - 3]


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_after_a_gap(client: bool) -> None:
    """A value beyond the copy is stepped over: the next command's position is its own segment's,
    which the kernel gives past the uncopied bytes."""
    big = _cmd(b"SET", b"big", b"v" * 3000)
    replies = [b"+OK\r\n", b"$-1\r\n", b"+OK\r\n", b":0\r\n"]
    segs = _flight(client, [big, GET_C, big[:1500], big[1500:], DEL_C], replies)
    assert segs[0].truncated and segs[2].truncated and segs[3].truncated
    assert segs[1].pos == (C2S_ISN + len(big)) & M32
    ops, d = decode(segs, client=client, from_start=True)
    at = C2S_ISN + len(big) + len(GET_C)
    assert [(o.name, o.req_pos) for o in ops] == [
        ("SET", C2S_ISN), ("GET", C2S_ISN + len(big)), ("SET", at), ("DEL", (at + len(big)) & M32)]  # fmt: skip
    assert d.counters["bulk_bytes_skipped"] > 0 and d.counters["commands_lost"] == 0


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_is_none_where_decoding_resumes_on_a_guess(client: bool) -> None:
    # A cut pipelined write: its copy ends inside a command's header, the rest is unknown; the
    # next transfer starts like a command, a guess (it could be a value's tail), the one after
    # follows a decoded command.
    flight = SET_C * 30
    segs = _flight(client, [flight, GET_C, DEL_C], [])
    assert segs[0].truncated
    ops, d = decode(segs, client=client, from_start=True)
    whole = SEGMENT_DATA // len(SET_C)  # the SETs copied whole; the rest of the flight is lost
    assert [(o.name, o.req_pos) for o in ops] == [("SET", C2S_ISN + i * len(SET_C)) for i in range(whole)] + [
        ("GET", None), ("DEL", (C2S_ISN + len(flight) + len(GET_C)) & M32)]  # fmt: skip
    assert d.counters["resyncs"] == 1 and d.counters["commands_lost"] == 1
    # Not seen from its start: the first command's start is as much a guess.
    ops, _ = decode(_flight(client, [GET_C, DEL_C], REPLIES[1:]), client=client)
    assert [o.req_pos for o in ops] == [None, C2S_ISN + len(GET_C)]


def test_req_pos_of_a_transaction() -> None:
    """The commands queued in MULTI end at EXEC's reply, each still named by its own start."""
    multi, exec_ = _cmd(b"MULTI"), _cmd(b"EXEC")
    wire = multi + SET_C + GET_C + exec_
    ops, _ = decode(_flight(True, [wire], [b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n+OK\r\n$1\r\nv\r\n"], pos=9),
                    client=True, from_start=True)  # fmt: skip
    starts = {"MULTI": 9, "SET": 9 + len(multi), "GET": 9 + len(multi) + len(SET_C),
              "EXEC": 9 + len(multi) + len(SET_C) + len(GET_C)}  # fmt: skip
    assert sorted((o.name, o.req_pos) for o in ops) == sorted(starts.items())


@given(st.lists(st.tuples(st.sampled_from(_CMDS), st.lists(st.binary(max_size=300), max_size=3)), min_size=1,
                max_size=12),
       st.lists(st.integers(1, 700), min_size=1, max_size=8), st.integers(0, 2**32 - 1), st.booleans())  # fmt: skip
def test_req_pos_any_split_any_copy(cmds: list[tuple[str, list[bytes]]], cuts: list[int], isn: int,
                                    client: bool) -> None:  # fmt: skip
    """Commands written in transfers of any size and copied up to SEGMENT_DATA bytes: every
    position given is the command's true first byte; with whole copies every command has one."""
    wire, starts = b"", []
    for name, args in cmds:
        starts.append((isn + len(wire)) & M32)
        wire += _cmd(name.encode(), *(SECRET.encode() + a for a in args))
    writes, i, k = [], 0, 0
    while i < len(wire):
        writes.append(wire[i : i + cuts[k % len(cuts)]])
        i += cuts[k % len(cuts)]
        k += 1
    segs = _flight(client, writes, [], pos=isn)
    ops, _ = decode(segs, client=client, from_start=True)
    got = [o.req_pos for o in ops]
    assert {p for p in got if p is not None} <= set(starts)
    assert len(set(got) - {None}) == len([p for p in got if p is not None])  # distinct
    if not any(s.truncated for s in segs):
        assert got == starts


def _c2s(segs: list[Segment], client_view: bool) -> bytes:
    return b"".join(s.data for s in segs if s.egress == client_view)


def test_recorded_req_pos_exact_on_both_ends(server: Server) -> None:
    """Real redis-py traffic: each command named by its first byte, the same on both ends; 512-byte
    copies give the positions they can and never a wrong one."""
    with relaying(("127.0.0.1", server.port)) as r:
        c = redis.Redis(port=r.port)
        c.set("a", SECRET)
        c.get("a")
        p = c.pipeline(transaction=False)
        for _ in range(50):
            p.incr(f"{SECRET}:n")
        p.execute()
        t = c.pipeline(transaction=True)
        t.set("t", "1").incr("t").get("t")
        t.execute()
        c.set("big", SECRET * 300)
        c.delete("a", "t", "big", f"{SECRET}:n")
        c.close()
        settle(r, 1)
    full: dict[bool, set[int]] = {}
    for client, segs in views(r, 0, full=True):
        segs = with_pos(segs, client)
        ops, _ = decode(segs, client=client, from_start=True)
        assert len(ops) >= 60 and all(o.req_pos is not None for o in ops)
        got = [o.req_pos for o in ops if o.req_pos is not None]
        assert len(set(got)) == len(got)
        stream = _c2s(segs, client)
        for o in ops:
            assert o.req_pos is not None
            at = (o.req_pos - C2S_ISN) & M32
            assert stream[at : at + 1] == b"*"  # a command's first byte, and this command's:
            assert stream[at:].split(b"\r\n", 3)[2].upper().decode() == o.name.split(" ")[0]
        full[client] = set(got)
    assert full[True] == full[False]
    for client, segs in views(r, 0):
        assert any(s.truncated for s in segs)
        ops, _ = decode(with_pos(segs, client), client=client, from_start=True)
        assert len(true_positions(ops, full[client])) >= 10
    _RECORDED[:] = merge_runs(with_pos(r.client_segments(full=True)[0], True))
    _FULL_POS[:] = [o.req_pos for o in decode(with_pos(r.client_segments(full=True)[0], True), client=True,
                                              from_start=True)[0]]  # fmt: skip
    _recut_recorded()


_RECORDED: list[Segment] = []
_FULL_POS: list[int | None] = []


@given(st.data())
def _recut_recorded(data: st.DataObject) -> None:
    # Transfers of any size, cut to the copy: the positions given are true ones.
    segs = with_pos(recut(_RECORDED, data), True)
    ops, d = decode(segs, client=True, from_start=True)
    assert d.counters["decoder_errors"] == 0
    true_positions(ops, _FULL_POS)
    # Transfers within the copy: every command, the same positions as the recorded cuts gave.
    sizes = data.draw(st.lists(st.integers(1, SEGMENT_DATA), min_size=1, max_size=8))
    ops, _ = decode(with_pos(cut_whole(_RECORDED, sizes), True), client=True, from_start=True)
    assert [o.req_pos for o in ops] == _FULL_POS
