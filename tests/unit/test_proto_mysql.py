"""The MySQL decoder on a real MariaDB (Debian's mariadb-server, started by
tests/support/dbservers.py in a temporary directory on a free loopback port) with real PyMySQL
traffic through the recording relay: both ends' views, the handshake's database, COM_QUERY,
COM_INIT_DB, server-side prepared statements (COM_STMT_PREPARE / COM_STMT_EXECUTE sent over
PyMySQL's own connection), errors, a planted password and literal that must never come out, and
bad input. Each operation's req_pos: the exact stream position of its command packet, from either
end, however the bytes were cut."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import replace

import pymysql
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pymysql.constants import CLIENT, COMMAND

from correlator.protocols.mysql import MySQLDecoder
from correlator.segments import Operation, Segment
from tests.support.dbservers import mariadb_server
from tests.support.relay import Relay, relaying
from tests.support.segment_cuts import M32, merge_runs, mutate, recut, true_positions, with_pos

SECRET = "sekrit-42"
PASSWORD = "pw-sekrit-77"  # the application user's (scrambled on the wire)
NEW_PASSWORD = "clear-sekrit-99"  # in a query's text: must never come out


@pytest.fixture(scope="module")
def my_port() -> Iterator[int]:
    with mariadb_server(PASSWORD, databases=("kspandb", "other")) as db:
        yield db.port


def _connect(port: int, **kw: object) -> pymysql.Connection:
    args: dict[str, object] = {"host": "127.0.0.1", "port": port, "user": "app", "password": PASSWORD,
                               "database": "kspandb", "autocommit": True,
                               "client_flag": CLIENT.MULTI_STATEMENTS}
    args.update(kw)
    return pymysql.connect(**args)


def _read_response(c: pymysql.Connection) -> list[bytes]:
    """A prepared statement's answer as PyMySQL reads packets: up to its OK / ERR or second EOF."""
    first = c._read_packet()
    out = [first._data]
    if first.is_ok_packet() or first.is_error_packet():
        return out
    eofs = 0
    while eofs < 2:
        p = c._read_packet()
        out.append(p._data)
        eofs += p.is_eof_packet()
    return out


def _prepare(c: pymysql.Connection, sql: str) -> int:
    c._execute_command(COMMAND.COM_STMT_PREPARE, sql)
    ok = c._read_packet()
    stmt_id, ncols, nparams = struct.unpack_from("<IHH", ok._data, 1)
    for block in (nparams, ncols):
        if block:
            for _ in range(block + 1):  # the definitions and their EOF
                c._read_packet()
    return int(stmt_id)


def _execute(c: pymysql.Connection, stmt_id: int, value: str) -> list[bytes]:
    v = value.encode()
    payload = struct.pack("<IBI", stmt_id, 0, 1) + b"\x00" + b"\x01" + b"\xfd\x00" + bytes([len(v)]) + v
    c._execute_command(COMMAND.COM_STMT_EXECUTE, payload)
    return _read_response(c)


def _settle() -> None:
    time.sleep(0.3)


def decode(segs: list[Segment]) -> tuple[list[Operation], dict[str, int]]:
    d = MySQLDecoder()
    ops: list[Operation] = []
    for s in segs:
        ops += d.feed(s)
    ops += d.close(segs[-1].end_ns + 1 if segs else 0)
    return ops, d.counters


REQ_BASE = 0xFFFFFE00  # the client's first sequence number: the workload's positions wrap past 2**32
RESP_BASE = 0x5000
ISN = (REQ_BASE, RESP_BASE)


def command_positions(segs: list[Segment], client_view: bool) -> list[int]:
    """Where each command with a response starts in the client's whole byte stream, found by walking
    its packets (a command is a packet with sequence id 0 after the handshake), apart from the
    decoder: the req_pos every view must give."""
    stream = b"".join(s.data for s in segs if s.egress == client_view)
    out: list[int] = []
    i = 0
    while i + 4 <= len(stream):
        n = int.from_bytes(stream[i : i + 3], "little")
        if stream[i + 3] == 0 and stream[i + 4] in (COMMAND.COM_QUERY, COMMAND.COM_INIT_DB, COMMAND.COM_STMT_PREPARE,
                                                    COMMAND.COM_STMT_EXECUTE):  # fmt: skip
            out.append((REQ_BASE + i) & M32)
        i += 4 + n
    return out


def exported(ops: list[Operation]) -> str:
    parts: list[str] = []
    for o in ops:
        parts += [o.name, o.error or "", o.error_message or ""]
        parts += [f"{k}={v}" for k, v in o.attributes.items()]
    return "\n".join(parts)


def _summary(o: Operation) -> tuple[object, ...]:
    a = o.attributes
    return (o.name, a.get("db.operation.name"), a.get("db.collection.name"), a.get("db.query.text"),
            a.get("db.namespace"), a.get("db.response.status_code"), o.error)


WORKLOAD_OPS = [
    ("SET kspandb", "SET", None, "SET NAMES utf8mb4", "kspandb", None, None),  # PyMySQL's own
    ("CREATE TABLE items", "CREATE TABLE", "items", "CREATE TABLE items(id INT PRIMARY KEY, name VARCHAR(?) UNIQUE)",
     "kspandb", None, None),
    ("INSERT items", "INSERT", "items", "INSERT INTO items VALUES (?, ?)", "kspandb", None, None),
    ("SELECT items", "SELECT", "items", "SELECT name FROM items WHERE id = ?", "kspandb", None, None),
    ("SELECT missing_table", "SELECT", "missing_table", "SELECT * FROM missing_table", "kspandb", "1146", "1146"),
    ("INSERT items", "INSERT", "items", "INSERT INTO items VALUES (?, ?)", "kspandb", "1062", "1062"),
    ("USE other", "USE", None, None, "other", None, None),
    ("BATCH SELECT other", "BATCH SELECT", None, "SELECT ?; SELECT ?", "other", None, None),
    ("USE kspandb", "USE", None, None, "kspandb", None, None),
    ("PREPARE items", "PREPARE", "items", "SELECT id, name FROM items WHERE name = ?", "kspandb", None, None),
    ("SELECT items", "SELECT", "items", "SELECT id, name FROM items WHERE name = ?", "kspandb", None, None),
    ("SELECT items", "SELECT", "items", "SELECT id, name FROM items WHERE name = ?", "kspandb", None, None),
    ("PREPARE missing", "PREPARE", "missing", "SELECT * FROM missing WHERE a = ?", "kspandb", "1146", "1146"),
    ("CREATE USER kspandb", "CREATE USER", None, "CREATE USER ? @ ? IDENTIFIED BY ?", "kspandb", None, None),
    ("SELECT kspandb", "SELECT", None, "SELECT ?", "kspandb", None, None),
]  # fmt: skip


@pytest.fixture(scope="module")
def workload(my_port: int) -> Iterator[Relay]:
    with relaying(("127.0.0.1", my_port)) as r:
        c = _connect(r.port)
        with c.cursor() as cur:
            cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(64) UNIQUE)")
            cur.execute("INSERT INTO items VALUES (%s, %s)", (1, SECRET))  # PyMySQL inlines the literal
            cur.execute("SELECT name FROM items WHERE id = %s", (1,))
            assert cur.fetchall() == ((SECRET,),)
            with pytest.raises(pymysql.err.ProgrammingError):
                cur.execute("SELECT * FROM missing_table")
            with pytest.raises(pymysql.err.IntegrityError):
                cur.execute("INSERT INTO items VALUES (2, %s)", (SECRET,))  # "Duplicate entry 'sekrit-42'"
            c.select_db("other")
            cur.execute("SELECT 1; SELECT 2")
            while cur.nextset():
                pass
            c.select_db("kspandb")
            stmt = _prepare(c, "SELECT id, name FROM items WHERE name = ?")
            for _ in range(2):
                rows = _execute(c, stmt, SECRET)
                assert any(SECRET.encode() in p for p in rows)  # the row came back
            c._execute_command(COMMAND.COM_STMT_CLOSE, struct.pack("<I", stmt))
            c._execute_command(COMMAND.COM_STMT_PREPARE, "SELECT * FROM missing WHERE a = ?")
            with pytest.raises(pymysql.err.ProgrammingError):
                c._read_packet()
            cur.execute(f"CREATE USER 'newbie'@'127.0.0.1' IDENTIFIED BY '{NEW_PASSWORD}'")
            cur.execute("SELECT 3")
        c.close()
        _settle()
        yield r


def test_client_and_server_views_give_the_same_operations(workload: Relay) -> None:
    for view, client in ((workload.client_segments(), True), (workload.server_segments(), False)):
        ops, counters = decode(view[0])
        assert [_summary(o) for o in ops] == WORKLOAD_OPS
        assert all(o.client is client and o.protocol == "mysql" for o in ops)
        assert all(o.attributes["db.system.name"] == "mariadb" for o in ops)
        assert all(o.start_ns <= o.end_ns for o in ops)
        assert [o.start_ns for o in ops] == sorted(o.start_ns for o in ops)
        by_name = {o.attributes.get("db.query.text"): o for o in ops}
        assert by_name["SELECT name FROM items WHERE id = ?"].attributes["db.response.returned_rows"] == 1
        assert by_name["SELECT ?"].attributes["db.response.returned_rows"] == 1
        assert ops[10].attributes["db.response.returned_rows"] == 1  # a binary result set
        assert ops[4].error_message == "SQLSTATE 42S02: Table ?t exist"
        assert ops[5].error_message == "SQLSTATE 23000: Duplicate entry ?"
        assert ops[7].attributes["db.operation.batch.size"] == 2
        for bad in ("unsynced_segments", "decode_errors", "unmatched_responses", "no_response",
                    "unknown_statements", "undecided_packets"):
            assert bad not in counters, counters


def test_recorded_commands_are_named_by_their_stream_positions(workload: Relay) -> None:
    truth = command_positions(workload.client_segments(full=True)[0], True)
    assert len(truth) == len(WORKLOAD_OPS)
    assert truth[0] > truth[-1]  # the positions wrapped past 2**32 inside the workload
    for client_view, view in ((True, workload.client_segments()), (False, workload.server_segments()),
                              (True, workload.client_segments(full=True)),
                              (False, workload.server_segments(full=True))):  # fmt: skip
        ops, _ = decode(with_pos(view[0], client_view, ISN))
        assert [o.req_pos for o in ops] == truth, client_view  # each exact, so distinct; both ends alike


def test_secrets_never_leave(workload: Relay) -> None:
    raw = b"".join(c[3] for c in workload.chunks)
    assert SECRET.encode() in raw and NEW_PASSWORD.encode() in raw
    for view in (workload.client_segments(), workload.server_segments(), workload.client_segments(full=True),
                 workload.server_segments(full=True)):
        ops, _ = decode(view[0])
        assert ops
        text = exported(ops)
        for secret in (SECRET, PASSWORD, NEW_PASSWORD, "sekrit"):
            assert secret not in text


def test_picked_up_mid_stream(workload: Relay) -> None:
    segs = workload.client_segments()[0]
    k = next(i for i, s in enumerate(segs) if s.egress and b"INSERT INTO items" in s.data)
    truth = command_positions(workload.client_segments(full=True)[0], True)
    segs = with_pos(segs, True, ISN)
    ops, counters = decode(segs[k:])
    assert [o.req_pos for o in ops] == truth[2:]  # from the first command after the pick-up
    expected = [(n.removesuffix(" kspandb"), op, coll, text, None, *rest)
                for n, op, coll, text, _ns, *rest in WORKLOAD_OPS[2:6]]
    assert [_summary(o) for o in ops][:4] == expected
    # COM_INIT_DB names the database from there on.
    assert [_summary(o) for o in ops][4:] == WORKLOAD_OPS[6:]
    assert counters["no_handshake"] == 1
    # Picked up inside a transfer: the first bytes are the end of a packet.
    first = segs[k]
    ops, counters = decode([replace(first, data=first.data[5:], length=first.length - 5, pos=first.pos + 5),
                            *segs[k + 1 :]])  # fmt: skip
    assert [o.name for o in ops][:3] == ["SELECT items", "SELECT missing_table", "INSERT items"]
    assert counters["unsynced_segments"] == 1
    # Framed again from the next command's transfer start: every later command is placed.
    assert [o.req_pos for o in ops] == truth[3:]


def test_split_and_coalesced_give_the_same_operations(workload: Relay) -> None:
    segs = workload.server_segments(full=True)[0]
    whole, _ = decode(segs)
    split = [replace(s, data=s.data[i : i + 5], length=len(s.data[i : i + 5]))
             for s in segs for i in range(0, len(s.data), 5)]
    parts, counters = decode(split)
    assert [_summary(o) for o in parts] == [_summary(o) for o in whole] == WORKLOAD_OPS
    assert "unsynced_segments" not in counters
    truth = command_positions(segs, False)
    assert [o.req_pos for o in decode(with_pos(split, False, ISN))[0]] == truth
    coalesced: list[Segment] = []
    for s in segs:
        if coalesced and coalesced[-1].egress == s.egress:
            last = coalesced[-1]
            coalesced[-1] = replace(last, data=last.data + s.data, length=last.length + s.length, end_ns=s.end_ns)
        else:
            coalesced.append(s)
    ops, _ = decode(coalesced)
    assert [_summary(o) for o in ops] == WORKLOAD_OPS
    assert [o.req_pos for o in decode(with_pos(coalesced, False, ISN))[0]] == truth


def test_truncated_big_values(my_port: int) -> None:
    big = SECRET + "x" * 3000 + SECRET
    with relaying(("127.0.0.1", my_port)) as r:
        c = _connect(r.port)
        with c.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS big (id INT, v TEXT)")
            cur.execute("INSERT INTO big VALUES (%s, %s)", (1, big))  # a 3 KB COM_QUERY
            cur.execute("SELECT REPEAT('y', 200) FROM seq_1_to_300")
            assert len(cur.fetchall()) == 300
            cur.execute("SELECT v FROM big")
            cur.fetchall()
            cur.execute("SELECT COUNT(*) FROM big WHERE id = %s", (1,))
            cur.fetchall()
        c.close()
        _settle()
        truth = command_positions(r.client_segments(full=True)[0], True)
        for client_view, view in ((True, r.client_segments()), (False, r.server_segments())):
            # The 3 KB query and the big results ran past their copies: positions stay exact.
            assert [o.req_pos for o in decode(with_pos(view[0], client_view, ISN))[0]] == truth
            ops, counters = decode(view[0])
            names = [o.name for o in ops]
            assert names == ["SET kspandb", "CREATE TABLE big", "INSERT big", "SELECT seq_1_to_300", "SELECT big",
                             "SELECT big"], (names, counters)
            assert ops[2].attributes["db.query.text"].startswith("INSERT INTO big VALUES (?")
            assert ops[-1].attributes["db.query.text"] == "SELECT COUNT(*) FROM big WHERE id = ?"
            assert ops[-1].attributes["db.response.returned_rows"] == 1
            assert "db.response.returned_rows" not in ops[3].attributes  # its rows went past the copy
            assert "sekrit" not in exported(ops)
            assert counters["gap_bytes"] > 0
            assert counters["query_text_cut"] == 1
            assert "decode_errors" not in counters


def test_garbage_on_the_port(my_port: int) -> None:
    with relaying(("127.0.0.1", my_port)) as r:
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.settimeout(5)
            s.recv(4096)  # the greeting
            s.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 3)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        _settle()
        for view in (r.client_segments(), r.server_segments()):
            ops, counters = decode(view[0])
            assert ops == []
            assert "decode_errors" not in counters
            assert sum(counters.values()) >= 1, counters


def test_a_packet_cut_mid_frame_is_counted() -> None:
    q = b"\x20\x00\x00\x00\x03SELECT 1 FROM"
    d = MySQLDecoder()
    assert d.feed(Segment(1, 1, 1, True, 1, 2, len(q), q)) == []
    assert d.close(3) == []
    assert d.counters["cut_at_close"] == 1


def test_an_unanswered_query_ends_at_close() -> None:
    q = b"\x09\x00\x00\x00\x03SELECT 1"
    d = MySQLDecoder()
    assert d.feed(Segment(1, 1, 1, True, 10, 11, len(q), q)) == []
    ops = d.close(50)
    assert [(o.name, o.error, o.end_ns, o.client) for o in ops] == [("SELECT", "no_response", 50, True)]
    assert d.counters["no_handshake"] == 1


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=600), st.integers(0, 5000)), max_size=20))
def test_arbitrary_segments_never_raise(chunks: list[tuple[bool, bytes, int]]) -> None:
    d = MySQLDecoder()
    for i, (egress, data, extra) in enumerate(chunks):
        data = data[:512]
        d.feed(Segment(1, 1, 1, egress, i, i, len(data) + extra, data))
    d.close(len(chunks))
    assert "decode_errors" not in d.counters


_REAL: list[Segment] = []
_SQL_SYNTAX = frozenset(b"'\"$`\\-/*#EeBbXxNnUu&_")  # see test_proto_postgres.py


@given(st.data())
def _mutated_real_traffic(data: st.DataObject) -> None:
    segs = mutate(_REAL, data, _SQL_SYNTAX)
    ops, counters = decode(segs)
    assert "decode_errors" not in counters
    assert "sekrit" not in exported(ops)


def test_mutated_real_traffic_never_raises(workload: Relay) -> None:
    _REAL[:] = workload.client_segments()[0]
    _mutated_real_traffic()


@given(st.data())
def _rechunked_like_the_kernel(data: st.DataObject) -> None:
    segs = with_pos(recut(_RUNS, data), True, ISN)
    ops, counters = decode(segs)
    assert "decode_errors" not in counters
    assert "sekrit" not in exported(ops)
    assert len(ops) <= len(WORKLOAD_OPS)  # lost ones are counted, none invented
    true_positions(ops, _TRUTH)
    if not any(s.truncated for s in segs):  # nothing cut: exactly the workload
        assert [_summary(o) for o in ops] == WORKLOAD_OPS
        assert [o.req_pos for o in ops] == _TRUTH


_RUNS: list[Segment] = []
_TRUTH: list[int] = []


def test_any_transfer_boundaries_cut_to_512_bytes(workload: Relay) -> None:
    """The workload's bytes written in transfers of any size, each copied up to 512 bytes."""
    _RUNS[:] = merge_runs(workload.client_segments(full=True)[0])
    _TRUTH[:] = command_positions(_RUNS, True)
    _rechunked_like_the_kernel()


# -- req_pos on built packets: one transfer each, pipelined, byte by byte, gaps, resynchronising ----

def _pkt(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def _query(sql: str) -> bytes:
    return _pkt(0, bytes([COMMAND.COM_QUERY]) + sql.encode())


OK = _pkt(1, b"\x00\x00\x00\x02\x00\x00\x00")  # affected 0, insert id 0, autocommit, no warnings
Q1, Q2 = _query("SELECT 1"), _query("SELECT a FROM t")


def _flight(data: bytes, c2s: bool, pos: int, length: int | None = None) -> tuple[bool, bytes, int, int]:
    return c2s, data, pos, len(data) if length is None else length


def _decode_views(flights: list[tuple[bool, bytes, int, int]]) -> dict[bool, tuple[list[Operation], dict[str, int]]]:
    """Both ends' decodes of transfers (client to server?, bytes, position, true length)."""
    out: dict[bool, tuple[list[Operation], dict[str, int]]] = {}
    for client_view in (True, False):
        segs = [Segment(1, 1, 1, c2s == client_view, t, t, length, data[:512], pos=pos)
                for t, (c2s, data, pos, length) in enumerate(flights)]  # fmt: skip
        ops, counters = decode(segs)
        assert all(o.client is client_view for o in ops)
        out[client_view] = ops, counters
    return out


def test_req_pos_one_command_per_transfer() -> None:
    r, s = 7_000_000, 123
    flights = [_flight(Q1, True, r), _flight(OK, False, s), _flight(Q2, True, r + len(Q1)), _flight(OK, False, s + 11)]
    for ops, _ in _decode_views(flights).values():
        assert [(o.name, o.req_pos) for o in ops] == [("SELECT", r), ("SELECT t", r + len(Q1))]


def test_req_pos_of_commands_pipelined_in_one_transfer() -> None:
    close = _pkt(0, bytes([COMMAND.COM_STMT_CLOSE]) + struct.pack("<I", 9))  # no response, no operation
    r = 40_000
    at = r + len(Q2)
    flights = [_flight(Q2, True, r), _flight(OK, False, 0), _flight(close + Q1 + Q2, True, at), _flight(OK, False, 11)]
    for ops, _ in _decode_views(flights).values():
        # (The first pipelined command's answer had not come before the second: the classic
        # protocol's rule makes it an operation without a status.) Each is named by where its own
        # packet starts in the one transfer.
        assert [(o.name, o.req_pos) for o in ops] == [("SELECT t", r), ("SELECT", at + len(close)),
                                                      ("SELECT t", at + len(close) + len(Q1))]  # fmt: skip


def test_req_pos_byte_by_byte_and_across_the_wrap_is_the_whole_transfers() -> None:
    r = 2**32 - 6  # Q1's header straddles the wrap, Q2 starts after it
    whole = [_flight(Q1, True, r), _flight(OK, False, 0), _flight(Q2, True, (r + len(Q1)) & M32),
             _flight(OK, False, 11)]  # fmt: skip
    split: list[tuple[bool, bytes, int, int]] = []
    for c2s, data, pos, _ in whole:
        split += [_flight(data[i : i + 1], c2s, (pos + i) & M32) for i in range(len(data))]
    want = [2**32 - 6, len(Q1) - 6]
    for flights in (whole, split):
        for ops, _ in _decode_views(flights).values():
            assert [o.req_pos for o in ops] == want


def test_a_command_split_over_transfers_starts_at_its_first_byte() -> None:
    """An operation's start is when its command packet's first byte came, not its last."""
    flights: list[tuple[bool, bytes, int, int]] = []
    starts = []
    for c2s, data in ((True, Q1), (False, OK), (True, Q2), (False, OK)):
        if c2s:
            starts.append(len(flights))
        flights += [_flight(data[i : i + 3], c2s, i) for i in range(0, len(data), 3)]
    for ops, _ in _decode_views(flights).values():
        assert [o.start_ns for o in ops] == starts, ops


def test_req_pos_after_an_uncopied_gap() -> None:
    big = _query("SELECT '" + "x" * 2000 + "'")  # 2 KB: its copy ends at 512 bytes
    r = 2**32 - 100
    after = (r + len(big)) & M32
    # A command written in two transfers, the first copied short: its rest, then the next command.
    first, rest = big[:1800], big[1800:]
    at = (after + len(Q1)) & M32
    flights = [_flight(big, True, r), _flight(OK, False, 0), _flight(Q1, True, after), _flight(OK, False, 11),
               _flight(first, True, at), _flight(rest + Q2, True, (at + 1800) & M32), _flight(OK, False, 22),
               _flight(OK, False, 33)]  # fmt: skip
    for ops, counters in _decode_views(flights).values():
        assert counters["gap_bytes"] == sum(length - 512 for _, _, _, length in flights if length > 512)
        assert [o.req_pos for o in ops] == [r, after, at, (at + len(big)) & M32]


def test_req_pos_is_unknown_when_the_boundary_was_found_inside_a_transfer() -> None:
    # Picked up inside a transfer: the framing is found past 3 bytes of a packet's tail, by content
    # alone. Its command is not placed; the next transfer, opening on a boundary of that framing,
    # is.
    r = 900
    flights = [_flight(b"abc" + Q1, True, r), _flight(OK, False, 0), _flight(Q2, True, r + 3 + len(Q1)),
               _flight(OK, False, 11)]  # fmt: skip
    for ops, counters in _decode_views(flights).values():
        assert counters["resync_skipped_bytes"] == 3
        assert [(o.name, o.req_pos) for o in ops] == [("SELECT", None), ("SELECT t", r + 3 + len(Q1))]
