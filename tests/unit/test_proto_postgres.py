"""The PostgreSQL decoder on a real PostgreSQL 15 (Debian's postgresql-15, started by
tests/support/dbservers.py in a temporary directory as `nobody` on a free loopback port) with real
psycopg 3 traffic through the recording relay: both ends' views, the simple and extended
protocols, pipelining, prepared statements, errors, a planted password and literal that must never
come out, and bad input."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols.postgres import PostgresDecoder
from correlator.segments import Operation, Segment
from tests.support.dbservers import postgres_server
from tests.support.relay import Relay, relaying
from tests.support.segment_cuts import merge_runs, mutate, recut

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
