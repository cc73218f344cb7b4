"""The PostgreSQL decoder on a real PostgreSQL 15 (Debian's postgresql-15, started by
tests/support/dbservers.py in a temporary directory as `nobody` on a free loopback port) with real
psycopg 3 traffic through the recording relay: both ends' views, the simple and extended
protocols, pipelining, prepared statements, errors, a planted password and literal that must never
come out, and bad input."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols.postgres import PostgresDecoder
from correlator.segments import SEGMENT_DATA, Operation, Segment
from tests.support.dbservers import postgres_server
from tests.support.relay import Relay, relaying
from tests.support.segment_cuts import (
    C2S_ISN,
    M32,
    S2C_ISN,
    cut_whole,
    merge_runs,
    mutate,
    recut,
    true_positions,
    with_pos,
)

SECRET = "sekrit-42"
PASSWORD = "pw-sekrit-77"  # the superuser's (SCRAM) password
CLEAR_PASSWORD = "clear-sekrit-99"  # sent in a cleartext PasswordMessage: must never come out


@pytest.fixture(scope="module")
def pg_port() -> Iterator[int]:
    with postgres_server(PASSWORD, extra_users={"cleartext": CLEAR_PASSWORD},
                         hba_extra="host all cleartext 127.0.0.1/32 password\n") as pg:
        yield pg.port


def _connect(port: int, **kw: object) -> psycopg.Connection:
    args: dict[str, object] = {"host": "127.0.0.1", "port": port, "user": "kspan", "password": PASSWORD,
                               "dbname": "kspandb", "autocommit": True}
    args.update(kw)
    return psycopg.connect(**args)


def _settle(r: Relay) -> None:
    time.sleep(0.3)  # the relay's pumps have forwarded everything once the clients are done


def decode(segs: list[Segment]) -> tuple[list[Operation], dict[str, int]]:
    d = PostgresDecoder()
    ops: list[Operation] = []
    for s in segs:
        ops += d.feed(s)
    ops += d.close(segs[-1].end_ns + 1 if segs else 0)
    return ops, d.counters


def exported(ops: list[Operation]) -> str:
    """Everything of the operations that leaves the agent, as one string."""
    parts: list[str] = []
    for o in ops:
        parts += [o.name, o.error or "", o.error_message or ""]
        parts += [f"{k}={v}" for k, v in o.attributes.items()]
    return "\n".join(parts)


def _summary(o: Operation) -> tuple[object, ...]:
    a = o.attributes
    return (o.name, a.get("db.operation.name"), a.get("db.collection.name"), a.get("db.query.text"),
            a.get("db.response.status_code"), o.error)


WORKLOAD_OPS = [
    ("CREATE TABLE items", "CREATE TABLE", "items", "CREATE TABLE items(id int primary key, name text)", None, None),
    ("INSERT items", "INSERT", "items", "INSERT INTO items VALUES (?, ?)", None, None),
    ("SELECT items", "SELECT", "items", "SELECT name FROM items WHERE id = $1", None, None),
    ("SELECT items", "SELECT", "items", "SELECT id FROM items WHERE name = $1", None, None),
    ("SELECT items", "SELECT", "items", "SELECT id FROM items WHERE name = $1", None, None),
    ("SELECT missing_table", "SELECT", "missing_table", "SELECT * FROM missing_table", "42P01", "42P01"),
    ("SELECT kspandb", "SELECT", None, "SELECT ?::int", "22P02", "22P02"),
    ("UPDATE items", "UPDATE", "items", "UPDATE items SET name = name WHERE id = $1", None, None),
    ("UPDATE items", "UPDATE", "items", "UPDATE items SET name = name WHERE id = $1", None, None),
    ("UPDATE items", "UPDATE", "items", "UPDATE items SET name = name WHERE id = $1", None, None),
    ("BATCH SELECT kspandb", "BATCH SELECT", None, "SELECT ?; SELECT ?", None, None),
]  # fmt: skip


@pytest.fixture(scope="module")
def workload(pg_port: int) -> Iterator[Relay]:
    with relaying(("127.0.0.1", pg_port)) as r:
        with _connect(r.port) as c:
            c.execute("CREATE TABLE items (id int primary key, name text)")
            psycopg.ClientCursor(c).execute("INSERT INTO items VALUES (%s, %s)", (1, SECRET))  # a literal
            c.execute("SELECT name FROM items WHERE id = %s", (1,)).fetchall()
            for _ in range(2):  # a named statement: Parse once, then Bind/Execute by its name
                c.execute("SELECT id FROM items WHERE name = %s", (SECRET,), prepare=True).fetchall()
            with pytest.raises(psycopg.errors.UndefinedTable):
                c.execute("SELECT * FROM missing_table")
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                c.execute(f"SELECT '{SECRET}'::int")  # the server's message quotes the literal
            with c.pipeline():
                for i in range(3):
                    c.execute("UPDATE items SET name = name WHERE id = %s", (i,))
            c.execute("SELECT 1; SELECT 2")
        # A cleartext PasswordMessage on a second connection.
        with _connect(r.port, user="cleartext", password=CLEAR_PASSWORD, dbname="postgres") as c2:
            c2.execute("SELECT 1").fetchall()
        _settle(r)
        yield r


def test_client_and_server_views_give_the_same_operations(workload: Relay) -> None:
    for view, client in ((workload.client_segments(), True), (workload.server_segments(), False)):
        ops, counters = decode(view[0])
        assert [_summary(o) for o in ops] == WORKLOAD_OPS
        assert all(o.client is client and o.protocol == "postgresql" for o in ops)
        assert all(o.attributes["db.namespace"] == "kspandb" for o in ops)
        assert all(o.attributes["db.system.name"] == "postgresql" for o in ops)
        assert all(o.start_ns <= o.end_ns for o in ops)
        assert [o.start_ns for o in ops] == sorted(o.start_ns for o in ops)
        assert ops[2].attributes["db.response.returned_rows"] == 1
        assert ops[5].error_message == "relation ? does not exist"
        assert ops[6].error_message == "invalid input syntax for type integer: ?"
        assert ops[10].attributes["db.operation.batch.size"] == 2
        # libpq asks for TLS first (sslmode=prefer); the server's 'N' refusal is stepped over.
        assert counters.get("encryption_requests") == 1
        assert counters.get("auth_messages", 0) >= 1
        for bad in ("unsynced_segments", "bad_frames", "decode_errors", "unmatched_responses", "no_response"):
            assert bad not in counters, counters
        ops2, counters2 = decode(view[1])
        assert [o.name for o in ops2] == ["SELECT postgres"] and ops2[0].attributes["db.namespace"] == "postgres"
        assert counters2.get("auth_messages") == 1  # the cleartext password, never read


def test_the_pipeline_is_three_operations_answered_in_order(workload: Relay) -> None:
    ops, _ = decode(workload.client_segments()[0])
    updates = [o for o in ops if o.name == "UPDATE items"]
    assert len(updates) == 3
    assert [o.end_ns for o in updates] == sorted(o.end_ns for o in updates)
    # Everything each side wrote in a row as one transfer: the three Executes before their one
    # Sync, and their answers, in one segment each way.
    coalesced: list[Segment] = []
    for s in workload.server_segments(full=True)[0]:
        if coalesced and coalesced[-1].egress == s.egress:
            last = coalesced[-1]
            coalesced[-1] = replace(last, data=last.data + s.data, length=last.length + s.length, end_ns=s.end_ns)
        else:
            coalesced.append(s)
    ops2, counters = decode(coalesced)
    assert [_summary(o) for o in ops2] == WORKLOAD_OPS
    assert "unmatched_responses" not in counters


def test_secrets_never_leave(workload: Relay) -> None:
    raw = b"".join(c[3] for c in workload.chunks)
    assert SECRET.encode() in raw and CLEAR_PASSWORD.encode() in raw  # the traffic did carry them
    views = [workload.client_segments(), workload.server_segments(), workload.client_segments(full=True),
             workload.server_segments(full=True)]
    for view in views:
        for segs in view.values():
            ops, _ = decode(segs)
            assert ops
            text = exported(ops)
            for secret in (SECRET, PASSWORD, CLEAR_PASSWORD, "sekrit"):
                assert secret not in text


def test_picked_up_mid_stream(workload: Relay) -> None:
    segs = workload.client_segments()[0]
    k = next(i for i, s in enumerate(segs) if s.egress and b"INSERT INTO items" in s.data)
    ops, counters = decode(segs[k:])
    # No startup seen, no namespace: a span without a collection is named by its operation alone.
    expected = [(n.removesuffix(" kspandb"), *rest) for n, *rest in WORKLOAD_OPS]
    assert [_summary(o) for o in ops] == expected[1:]
    assert all("db.namespace" not in o.attributes for o in ops)
    assert [o.name for o in ops][:2] == ["INSERT items", "SELECT items"]
    assert counters["no_startup"] == 1
    # Picked up inside a transfer: the first bytes are the end of a message.
    first = segs[k]
    cut = replace(first, data=first.data[3:], length=first.length - 3)
    ops, counters = decode([cut, *segs[k + 1 :]])
    assert [_summary(o) for o in ops] == expected[2:], counters  # the cut INSERT is lost, counted:
    assert counters["unsynced_segments"] == 1
    assert counters["undecided_messages"] == 1  # its CommandComplete: 'C' is sent by both sides


def test_split_anywhere_gives_the_same_operations(workload: Relay) -> None:
    segs = workload.server_segments(full=True)[0]
    whole, _ = decode(segs)
    split = [
        replace(s, data=s.data[i : i + 7], length=len(s.data[i : i + 7]))
        for s in segs
        for i in range(0, len(s.data), 7)
    ]
    parts, counters = decode(split)
    assert [_summary(o) for o in parts] == [_summary(o) for o in whole]
    assert "unsynced_segments" not in counters


def test_truncated_big_values(pg_port: int) -> None:
    big = SECRET + "x" * 3000 + SECRET
    with relaying(("127.0.0.1", pg_port)) as r:
        with _connect(r.port) as c:
            c.execute("CREATE TABLE IF NOT EXISTS big (id int, v text)")
            psycopg.ClientCursor(c).execute("INSERT INTO big VALUES (%s, %s)", (1, big))  # a 3 KB Query
            c.execute("INSERT INTO big VALUES (%s, %s)", (2, big))  # a 3 KB Bind
            rows = c.execute("SELECT repeat('y', 200) FROM generate_series(1, 300)").fetchall()
            assert len(rows) == 300
            c.execute("SELECT v FROM big").fetchall()  # 6 KB of the secret in DataRows
            c.execute("SELECT count(*) FROM big WHERE id = %s", (1,)).fetchall()
        _settle(r)
        for view in (r.client_segments(), r.server_segments()):
            ops, counters = decode(view[0])
            names = [o.name for o in ops]
            assert names == ["CREATE TABLE big", "INSERT big", "INSERT big", "SELECT kspandb", "SELECT big",
                             "SELECT big"], names
            assert ops[1].attributes["db.query.text"].startswith("INSERT INTO big VALUES (?")
            assert ops[2].attributes["db.query.text"] == "INSERT INTO big VALUES ($1, $2)"
            assert ops[-1].attributes["db.query.text"] == "SELECT count(*) FROM big WHERE id = $1"
            assert ops[-1].attributes["db.response.returned_rows"] == 1
            assert "sekrit" not in exported(ops)
            assert counters["gap_bytes"] > 0
            assert counters["query_text_cut"] == 1
            assert "decode_errors" not in counters
        # Positions past the stepped-over values are the full copies' own; where a gap ended the
        # framing, the request found after it has none (a guess), the rest theirs.
        for client, cut, whole in ((True, r.client_segments(), r.client_segments(full=True)),
                                   (False, r.server_segments(), r.server_segments(full=True))):  # fmt: skip
            want = _req_pos(with_pos(whole[0], client))
            got, counters = decode(with_pos(cut[0], client))
            assert None not in want and len(got) == len(want)
            assert all(o.req_pos in (None, w) for o, w in zip(got, want, strict=True))
            assert 1 <= sum(o.req_pos is None for o in got) <= counters.get("resynchronised", 0)
            assert got[0].req_pos == want[0] and got[1].req_pos == want[1]  # the 3 KB Query: stepped over
        # Any transfer boundaries, the copies cut: never a wrong position.
        _RUNS_POS[:] = merge_runs(r.client_segments(full=True)[0])
        _FULL_POS[:] = _req_pos(with_pos(r.client_segments(full=True)[0], True))
        _recut_positions()


def test_garbage_on_the_port(pg_port: int) -> None:
    with relaying(("127.0.0.1", pg_port)) as r:
        with socket.create_connection(("127.0.0.1", r.port)) as s:
            s.sendall(b"\x00\x00\x00\x10GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 3)
            s.settimeout(5)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        _settle(r)
        for view in (r.client_segments(), r.server_segments()):
            ops, counters = decode(view[0])
            assert ops == []
            assert counters.get("unsynced_segments", 0) + counters.get("undecided_messages", 0) >= 1, counters
            assert "decode_errors" not in counters


def test_a_message_cut_mid_frame_is_counted() -> None:
    q = b"Q\x00\x00\x00\x1eSELECT 1 FROM items WHERE"
    seg = Segment(conn_id=1, pid=1, tid=1, egress=True, start_ns=1, end_ns=2, length=len(q), data=q)
    d = PostgresDecoder()
    assert d.feed(seg) == []
    assert d.close(3) == []
    assert d.counters["cut_at_close"] == 1


def test_an_unanswered_query_ends_at_close() -> None:
    q = b"Q\x00\x00\x00\x0dSELECT 1\x00"
    d = PostgresDecoder()
    seg = Segment(conn_id=1, pid=1, tid=1, egress=True, start_ns=10, end_ns=11, length=len(q), data=q)
    assert d.feed(seg) == []
    ops = d.close(50)
    assert [(o.name, o.error, o.end_ns, o.client) for o in ops] == [("SELECT", "no_response", 50, True)]
    assert d.counters["no_response"] == 1


@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=600), st.integers(0, 5000)), max_size=20))
def test_arbitrary_segments_never_raise(chunks: list[tuple[bool, bytes, int]]) -> None:
    d = PostgresDecoder()
    for i, (egress, data, extra) in enumerate(chunks):
        data = data[:512]
        d.feed(Segment(conn_id=1, pid=1, tid=1, egress=egress, start_ns=i, end_ns=i, length=len(data) + extra,
                       data=data))
    d.close(len(chunks))
    assert "decode_errors" not in d.counters


_REAL: list[Segment] = []


# A flipped byte that is or becomes SQL syntax (a quote opened early or removed, a comment start)
# can turn a literal's contents into bare words no redactor could tell from identifiers; the
# kernel's copies are cut, never rewritten, so the secret check holds for flips of other bytes.
_SQL_SYNTAX = frozenset(b"'\"$`\\-/*#EeBbXxNnUu&")


@given(st.data())
def _mutated_real_traffic_never_raises(data: st.DataObject) -> None:
    segs = mutate(_REAL, data, _SQL_SYNTAX)
    ops, counters = decode(segs)
    assert "decode_errors" not in counters
    assert "sekrit" not in exported(ops)


def test_mutated_real_traffic_never_raises(workload: Relay) -> None:
    """Real traffic with bytes flipped and copies cut anywhere: counted, never raised, no secret."""
    _REAL[:] = workload.client_segments()[0]
    _mutated_real_traffic_never_raises()


@given(st.data())
def _rechunked_like_the_kernel(data: st.DataObject) -> None:
    segs = recut(_RUNS, data)
    ops, counters = decode(segs)
    assert "decode_errors" not in counters
    assert "sekrit" not in exported(ops)
    assert len(ops) <= len(WORKLOAD_OPS)  # lost ones are counted, none invented
    if not any(s.truncated for s in segs):  # nothing cut: exactly the workload
        assert [_summary(o) for o in ops] == WORKLOAD_OPS


_RUNS: list[Segment] = []


def test_any_transfer_boundaries_cut_to_512_bytes(workload: Relay) -> None:
    """The workload's bytes written in transfers of any size, each copied up to 512 bytes."""
    _RUNS[:] = merge_runs(workload.client_segments(full=True)[0])
    _rechunked_like_the_kernel()


# -- request positions (Operation.req_pos) -----------------------------------------------------

def _m(t: bytes, body: bytes) -> bytes:
    return t + struct.pack(">I", len(body) + 4) + body


_PARAMS = b"user\x00kspan\x00database\x00kspandb\x00\x00"
STARTUP = struct.pack(">II", 8 + len(_PARAMS), 196608) + _PARAMS
SYNC, DESCRIBE, EXECUTE = _m(b"S", b""), _m(b"D", b"P\x00"), _m(b"E", b"\x00\x00\x00\x00\x00")
READY, DONE = _m(b"Z", b"I"), _m(b"C", b"SELECT 1\x00")
HELLO = _m(b"R", b"\x00\x00\x00\x00") + READY  # AuthenticationOk, ReadyForQuery
EXT_OK = _m(b"1", b"") + _m(b"2", b"") + _m(b"n", b"") + DONE  # Parse/BindComplete, NoData, CommandComplete


def _query(sql: bytes) -> bytes:
    return _m(b"Q", sql + b"\x00")


def _parse(sql: bytes, name: bytes = b"") -> bytes:
    return _m(b"P", name + b"\x00" + sql + b"\x00\x00\x00")


def _bind(stmt: bytes = b"", value: bytes | None = None) -> bytes:
    params = b"\x00\x00" if value is None else b"\x00\x01" + struct.pack(">I", len(value)) + value
    return _m(b"B", b"\x00" + stmt + b"\x00\x00\x00" + params + b"\x00\x00")


def _conv(client: bool, chunks: list[tuple[bool, bytes]], isn: tuple[int, int] = (C2S_ISN, S2C_ISN)) -> list[Segment]:
    """(frontend, bytes) transfers in order, as the traced end saw them (copied up to
    SEGMENT_DATA bytes), positioned."""
    segs = [Segment(1, 1, 1, front == client, i, i, len(b), b[:SEGMENT_DATA]) for i, (front, b) in enumerate(chunks)]
    return with_pos(segs, client, isn)


class _Front:
    """A frontend stream being written: where each request starts in it."""

    def __init__(self, isn: int = C2S_ISN) -> None:
        self.isn, self.sent = isn, 0

    def at(self, req: bytes) -> int:
        """The position of req's first byte, req being written next."""
        pos = (self.isn + self.sent) & M32
        self.sent += len(req)
        return pos


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_one_request_per_transfer(client: bool) -> None:
    f = _Front()
    f.at(STARTUP)
    q, ext, prep = _query(b"SELECT 1"), _parse(b"SELECT $1") + _bind() + DESCRIBE + EXECUTE + SYNC, _parse(
        b"SELECT 2", b"s1") + DESCRIBE + SYNC  # fmt: skip
    named = _bind(b"s1") + EXECUTE + SYNC  # a prepared statement run: the request opens with its Bind
    want = [f.at(q), f.at(ext)]
    f.at(prep)  # prepared, not run: no operation
    want.append(f.at(named))
    chunks = [(True, STARTUP), (False, HELLO), (True, q), (False, DONE + READY), (True, ext), (False, EXT_OK + READY),
              (True, prep), (False, _m(b"1", b"") + _m(b"n", b"") + READY), (True, named),
              (False, _m(b"2", b"") + DONE + READY)]  # fmt: skip
    ops, counters = decode(_conv(client, chunks))
    assert [(o.name, o.client, o.req_pos) for o in ops] == [("SELECT kspandb", client, p) for p in want]
    assert "unmatched_responses" not in counters


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_pipelined_in_one_transfer(client: bool) -> None:
    f = _Front(isn=4000)
    f.at(STARTUP)
    one = _parse(b"SELECT 1") + _bind() + DESCRIBE + EXECUTE
    two = _parse(b"SELECT 2") + _bind() + DESCRIBE + EXECUTE
    three = _bind() + EXECUTE  # the unnamed statement again: its Bind opens the request
    again = EXECUTE  # the portal run again (suspended at its row limit): the Execute itself
    want = [f.at(one), f.at(two), f.at(three), f.at(again)]
    f.at(SYNC)
    back = EXT_OK * 2 + _m(b"2", b"") + _m(b"s", b"") + DONE + READY
    ops, _ = decode(_conv(client, [(True, STARTUP), (False, HELLO), (True, one + two + three + again + SYNC),
                                   (False, back)], isn=(4000, S2C_ISN)))  # fmt: skip
    assert [o.req_pos for o in ops] == want and len(set(want)) == 4
    # Simple queries pipelined in one write.
    qs = [_query(b"SELECT %d" % i) for i in range(3)]
    f = _Front(isn=4000)
    f.at(STARTUP)
    want = [f.at(q) for q in qs]
    ops, _ = decode(_conv(client, [(True, STARTUP), (False, HELLO), (True, b"".join(qs)), (False, (DONE + READY) * 3)],
                          isn=(4000, S2C_ISN)))  # fmt: skip
    assert [o.req_pos for o in ops] == want


def _workload_chunks() -> tuple[list[tuple[bool, bytes]], list[int]]:
    f = _Front()
    f.at(STARTUP)
    q = _query(b"SELECT 1")
    ext = _parse(b"SELECT $1") + _bind(value=b"7") + DESCRIBE + EXECUTE + SYNC
    bad = _parse(b"SELEC oops") + _bind() + DESCRIBE + EXECUTE + SYNC  # refused at its Parse
    err = _m(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00")
    want = [f.at(q), f.at(ext), f.at(bad)]
    return [(True, STARTUP), (False, HELLO), (True, q), (False, DONE + READY), (True, ext), (False, EXT_OK + READY),
            (True, bad), (False, err + READY)], want  # fmt: skip


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_the_same_however_the_bytes_are_cut(client: bool) -> None:
    chunks, want = _workload_chunks()
    whole, _ = decode(_conv(client, chunks))
    assert [o.req_pos for o in whole] == want and whole[-1].error == "42601"
    for n in (1, 2, 5, 9):
        split = [(front, b[i : i + n]) for front, b in chunks for i in range(0, len(b), n)]
        ops, counters = decode(_conv(client, split))
        assert [(o.name, o.req_pos) for o in ops] == [(o.name, o.req_pos) for o in whole], n
        assert "unsynced_segments" not in counters
    # Each side's transfers coalesced into one: the same.
    ops, _ = decode(_conv(client, [(True, STARTUP), (False, HELLO), (True, b"".join(b for fr, b in chunks[2:] if fr)),
                                   (False, b"".join(b for fr, b in chunks[2:] if not fr))]))  # fmt: skip
    assert [o.req_pos for o in ops] == want


def test_req_pos_wraps_at_2_32() -> None:
    chunks, _ = _workload_chunks()
    isn = 2**32 - len(STARTUP) - 3  # the first request begins 3 bytes before the wrap
    f = _Front(isn)
    f.at(STARTUP)
    want = [f.at(b) for fr, b in chunks[2:] if fr]
    assert want[0] == 2**32 - 3 and want[1] < want[0]
    for n in (1000, 1, 4):
        split = [(front, b[i : i + n]) for front, b in chunks for i in range(0, len(b), n)]
        ops, _ = decode(_conv(True, split, isn=(isn, S2C_ISN)))
        assert [o.req_pos for o in ops] == want


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_after_gaps(client: bool) -> None:
    """Messages beyond the copy are stepped over by their length and positions stay exact: each
    segment carries its own. When a gap swallows a boundary, the request found where decoding
    resumes may have begun in the lost bytes: no position until the next request boundary."""
    f = _Front()
    f.at(STARTUP)
    long_q = _query(b"SELECT '" + b"x" * 3000 + b"'")
    q2, q3, q4 = _query(b"SELECT 2"), _query(b"SELECT 3"), _query(b"SELECT 4")
    big_bind = _parse(b"INSERT INTO t VALUES ($1)") + _bind(value=b"v" * 2000) + DESCRIBE + EXECUTE + SYNC
    want = [f.at(long_q), f.at(q2), f.at(big_bind)]
    f.at(q3)  # where decoding resumes after the Bind's gap: a guess
    want += [None, f.at(q4)]
    chunks = [(True, STARTUP), (False, HELLO), (True, long_q), (False, DONE + READY), (True, q2),
              (False, DONE + READY), (True, big_bind), (False, EXT_OK + READY), (True, q3), (False, DONE + READY),
              (True, q4), (False, DONE + READY)]  # fmt: skip
    segs = _conv(client, chunks)
    assert segs[2].truncated and segs[6].truncated and segs[4].pos == (C2S_ISN + len(STARTUP) + len(long_q)) & M32
    ops, counters = decode(segs)
    assert [o.req_pos for o in ops] == want
    assert counters["inferred_executes"] == 1 and counters["resynchronised"] == 1


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_of_a_failed_prepare(client: bool) -> None:
    f = _Front()
    f.at(STARTUP)
    prep = _parse(b"SELEC oops", b"s1") + DESCRIBE + SYNC  # no Execute: the operation is the Parse's
    want = f.at(prep)
    err = _m(b"E", b"SERROR\x00C42601\x00Msyntax error\x00\x00")
    ops, _ = decode(_conv(client, [(True, STARTUP), (False, HELLO), (True, prep), (False, err + READY)]))
    assert [(o.error, o.req_pos) for o in ops] == [("42601", want)]


@pytest.mark.parametrize("client", [True, False])
def test_req_pos_picked_up_mid_stream(client: bool) -> None:
    """No startup seen: the first bytes are a resync's guess, so the request they start has no
    position; the ones after the next boundary do."""
    _, want = _workload_chunks()
    chunks, _ = _workload_chunks()
    ops, counters = decode(_conv(client, chunks[2:], isn=(want[0], S2C_ISN)))
    assert [o.req_pos for o in ops] == [None, want[1], want[2]]
    assert counters["no_startup"] == 1
    # Picked up inside an extended request's write: the Bind found there does not open it.
    ext = chunks[4][1]
    at = len(_parse(b"SELECT $1"))
    assert ext[at:].startswith(b"B")
    tail = [(True, ext[at:]), (False, EXT_OK + READY), *chunks[6:]]
    ops, _ = decode(_conv(client, tail, isn=(want[1] + at, S2C_ISN)))
    assert [o.req_pos for o in ops] == [None, want[2]]


def _c2s(segs: list[Segment], client_view: bool) -> bytes:
    return b"".join(s.data for s in segs if s.egress == client_view)


def _req_pos(segs: list[Segment]) -> list[int | None]:
    return [o.req_pos for o in decode(segs)[0]]


def test_recorded_req_pos_exact_on_both_ends(workload: Relay) -> None:
    """psycopg's traffic: each operation named by its request's first byte (a Query, or the Parse
    or Bind opening an extended request), distinct, the same on both ends and however the bytes
    were cut."""
    full: dict[bool, list[int | None]] = {}
    for client, view in ((True, workload.client_segments(full=True)), (False, workload.server_segments(full=True))):
        segs = with_pos(view[0], client)
        got = _req_pos(segs)
        assert len(got) == len(WORKLOAD_OPS) and None not in got and len(set(got)) == len(got)
        stream = _c2s(segs, client)
        at = [(p - C2S_ISN) & M32 for p in got if p is not None]
        assert at == sorted(at) and {stream[a : a + 1] for a in at} <= {b"Q", b"P", b"B"}
        assert stream[at[-1] : at[-1] + 1] == b"Q" and b"SELECT 1; SELECT 2" in stream[at[-1] : at[-1] + 30]
        full[client] = got
        # The 512-byte copies: nothing of the workload lies beyond a message's stepped-over rest.
        cut = workload.client_segments()[0] if client else workload.server_segments()[0]
        assert _req_pos(with_pos(cut, client)) == got
        split = [replace(s, data=s.data[i : i + 7], length=len(s.data[i : i + 7])) for s in view[0]
                 for i in range(0, len(s.data), 7)]  # fmt: skip
        assert _req_pos(with_pos(split, client)) == got
        assert _req_pos(with_pos(merge_runs(view[0]), client)) == got
    assert full[True] == full[False]
    _RUNS_POS[:] = merge_runs(workload.client_segments(full=True)[0])
    _FULL_POS[:] = full[True]
    _recut_positions()
    _whole_cuts_positions()


_RUNS_POS: list[Segment] = []
_FULL_POS: list[int | None] = []


@given(st.data())
def _recut_positions(data: st.DataObject) -> None:
    # Transfers of any size, cut to the copy: the positions given are true ones.
    segs = with_pos(recut(_RUNS_POS, data), True)
    ops, counters = decode(segs)
    assert "decode_errors" not in counters
    true_positions(ops, _FULL_POS)


@given(st.lists(st.integers(1, SEGMENT_DATA), min_size=1, max_size=8))
def _whole_cuts_positions(sizes: list[int]) -> None:
    # Transfers within the copy: every operation, at the recorded positions.
    assert _req_pos(with_pos(cut_whole(_RUNS_POS, sizes), True)) == _FULL_POS
