"""SQL text redaction, operation and collection names shared by the PostgreSQL and MySQL decoders."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols.sql import MAX_QUERY_TEXT, UNREADABLE, describe, identifier, redact, redact_message

SECRET = "sekrit-42"


@pytest.mark.parametrize(
    ("dialect", "sql", "text"),
    [
        ("postgresql", "SELECT * FROM users WHERE name = 'sekrit-42' AND id IN (1, 2, 3)",
         "SELECT * FROM users WHERE name = ? AND id IN (?)"),
        ("postgresql", "SELECT $$sekrit-42$$, $tag$ it's $$ sekrit-42 $tag$ FROM t", "SELECT ?, ? FROM t"),
        ("postgresql", "SELECT E'sekrit\\'-42', B'0101', X'FF', U&'d\\0061t', 1.5e-3, .5, 42",
         "SELECT ?, ?, ?, ?, ?, ?, ?"),
        ("postgresql", "SELECT 'it''s sekrit-42' -- sekrit-42\n FROM t /* sekrit /* nested */ -42 */",
         "SELECT ? FROM t"),
        ("postgresql", "insert into t (a, b) values ($1, $2)", "insert into t(a, b) values ($1, $2)"),
        ("postgresql", "SELECT x::int, \"Sekrit Col\" FROM t", 'SELECT x::int, "Sekrit Col" FROM t'),
        ("mysql", "SELECT \"sekrit-42\", 'a\\'sekrit-42', 0x1F, b'01', _utf8mb4'sekrit-42' FROM `db`.`t` # sekrit",
         "SELECT ?, ?, ?, ?, ? FROM `db`.`t`"),
        ("mysql", "SELECT 1--1", "SELECT ? - - ?"),  # MySQL: "--" opens a comment only before a space
        ("mysql", "SELECT 1 -- sekrit-42", "SELECT ?"),
        ("postgresql", "  SELECT\n\t1  ", "SELECT ?"),
    ],
)  # fmt: skip
def test_redaction(dialect: str, sql: str, text: str) -> None:
    got = redact(sql, dialect)  # type: ignore[arg-type]
    assert got == text
    assert SECRET not in got


@pytest.mark.parametrize(
    ("dialect", "sql"),
    [
        (d, q)
        for d in ("postgresql", "mysql")
        for q in (
            "SELECT * FROM t WHERE a = 'sekrit-4",  # cut by the 512-byte copy inside a literal
            "SELECT * FROM t WHERE a = E'sekrit-4",
            "SELECT * FROM t WHERE a = \"sekrit-4",
            "SELECT 1 /* sekrit-4",
        )
    ]
    + [("postgresql", "SELECT $q$sekrit-4"), ("postgresql", "SELECT U&'sekrit-4")],
)
def test_unterminated_literal_is_redacted_to_the_end(dialect: str, sql: str) -> None:
    assert "sekrit" not in redact(sql, dialect)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sql", "op", "coll", "n"),
    [
        ("SELECT a FROM items WHERE b = 1", "SELECT", "items", 1),
        ("select a from public.items", "SELECT", "public.items", 1),
        ('SELECT 1 FROM "My Items"', "SELECT", "My Items", 1),
        ("SELECT a FROM t1 JOIN t2 ON t1.a = t2.a", "SELECT", None, 1),
        ("SELECT a FROM t1, t2", "SELECT", None, 1),
        ("SELECT * FROM t WHERE x IN (SELECT y FROM u)", "SELECT", None, 1),
        ("SELECT 1 UNION SELECT 2 FROM b", "SELECT", None, 1),
        ("SELECT * FROM generate_series(1, 3)", "SELECT", None, 1),
        ("INSERT INTO items (a, b) VALUES (1, 2)", "INSERT", "items", 1),
        ("INSERT INTO a SELECT * FROM b", "INSERT", None, 1),
        ("UPDATE items SET a = 1 WHERE b = 2", "UPDATE", "items", 1),
        ("DELETE FROM items WHERE a = 1", "DELETE", "items", 1),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "SELECT", "x", 1),
        ("WITH x AS (SELECT 1) DELETE FROM items", "DELETE", "items", 1),
        ("CREATE TABLE IF NOT EXISTS kv (k int)", "CREATE TABLE", "kv", 1),
        ("CREATE UNIQUE INDEX i ON t (a)", "CREATE INDEX", None, 1),
        ("DROP TABLE kv", "DROP TABLE", "kv", 1),
        ("BEGIN", "BEGIN", None, 1),
        ("START TRANSACTION", "START TRANSACTION", None, 1),
        ("SELECT 1; SELECT 2;", "BATCH SELECT", None, 2),
        ("INSERT INTO a VALUES (1); UPDATE a SET x = 1", "BATCH", "a", 2),
        ("FROBNICATE everything", None, None, 1),
        ("", None, None, 0),
    ],
)  # fmt: skip
def test_operation_and_collection(sql: str, op: str | None, coll: str | None, n: int) -> None:
    info = describe(sql, "postgresql")
    assert (info.operation, info.collection, info.statements) == (op, coll, n)


def test_text_is_capped() -> None:
    sql = "SELECT " + ", ".join(f"col{i}" for i in range(2000)) + " FROM t"
    info = describe(sql, "mysql")
    assert len(info.text) == MAX_QUERY_TEXT
    assert info.operation == "SELECT"


@pytest.mark.parametrize(
    ("msg", "safe"),
    [
        ('invalid input syntax for type integer: "sekrit-42"', "invalid input syntax for type integer: ?"),
        ("Duplicate entry 'sekrit-42' for key 'name'", "Duplicate entry ?"),
        ("You have an error near ''sekrit-42')' at line 1", "You have an error near ? at line ?"),
        ("near 'sekrit-42 at line 1", "near ?"),  # an unmatched quote: redacted to the end
        ("value 12345 out of range", "value ? out of range"),
    ],
)
def test_error_messages_lose_their_values(msg: str, safe: str) -> None:
    assert redact_message(msg) == safe


@given(st.text(max_size=300), st.sampled_from(["postgresql", "mysql"]))
def test_any_text_never_raises(sql: str, dialect: str) -> None:
    info = describe(sql, dialect)  # type: ignore[arg-type]
    assert len(info.text) <= MAX_QUERY_TEXT
    redact_message(sql)


@given(
    st.text(alphabet=st.characters(blacklist_characters="'\\\x00", blacklist_categories=("Cs",)), max_size=40),
    st.sampled_from(["postgresql", "mysql"]),
    st.integers(min_value=0, max_value=80),
)
def test_a_string_literal_never_survives(body: str, dialect: str, cut: int) -> None:
    marker = "QZXJ" + body
    sql = f"SELECT * FROM t WHERE a = '{marker}' AND b = 7"
    for text in (sql, sql[: 26 + cut]):  # whole, and cut anywhere inside or after the literal
        assert "QZXJ" not in redact(text, dialect)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "name"),
    [(b"kspandb", "kspandb"), ("données".encode(), "données"), (b"", None), (b"db\x00x", None),
     (b"\x03SELECT", None), (b"x" * 65, None), (b"\xff\xfe", None)],
)
def test_database_names_off_the_wire(raw: bytes, name: str | None) -> None:
    assert identifier(raw) == name


def test_binary_misread_as_text_exports_nothing() -> None:
    # A COM_STMT_EXECUTE's parameters read as a COM_QUERY's text (a frame misread after a gap).
    assert describe("\x01\x00\x00\x00\x00\x01\x00\x00\x00\x00\x01\ufffd\x00\tsekrit-42", "mysql") is UNREADABLE
    assert describe("SELECT '\x00\x01' FROM t", "mysql").text == "SELECT ? FROM t"  # inside a literal: fine
    assert describe("SELECT * FROM données WHERE x = 1\ufffd", "postgresql").collection == "données"  # cut mid-char
