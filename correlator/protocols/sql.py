"""SQL text as the PostgreSQL and MySQL decoders export it: literals replaced by `?`, the
operation keyword and, where the statement names exactly one table, that table.

Follows the OpenTelemetry database semantic conventions v1.33 (stable for PostgreSQL, MySQL and
MariaDB): `db.query.text` is sanitized (every string, number, hex/bit/binary literal and
dollar-quoted body becomes `?`; comments are dropped because they often carry values, e.g.
sqlcommenter tags; runs of whitespace become one space; `IN (?, ?, ...)` collapses to `IN (?)`
so one query shape is one text). `db.collection.name` is set only when the statement names a
single table: the conventions advise against extracting it from text naming several.

A literal cut by a truncated capture (an unterminated quote or dollar quote) is redacted to the
end of the text, so the 512-byte copy never leaves half a secret. The scanner is linear, never
raises, and the redacted text is capped at MAX_QUERY_TEXT characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Dialect = Literal["postgresql", "mysql"]

MAX_QUERY_TEXT = 2048
_MAX_SCAN = 64 * 1024  # characters scanned at most; the rest cannot be shown under the cap anyway

# First keywords exported as db.operation.name; anything else is not named (bounded cardinality).
OPERATIONS = frozenset(
    (
        "SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "UPSERT", "CREATE", "DROP",
        "ALTER", "TRUNCATE", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SET",
        "SHOW", "EXPLAIN", "ANALYZE", "VACUUM", "COPY", "CALL", "EXECUTE", "PREPARE", "DEALLOCATE",
        "GRANT", "REVOKE", "LOCK", "UNLOCK", "USE", "DESCRIBE", "DESC", "DO", "LISTEN", "NOTIFY",
        "UNLISTEN", "FETCH", "DECLARE", "CLOSE", "MOVE", "DISCARD", "RESET", "REFRESH", "CLUSTER",
        "REINDEX", "COMMENT", "CHECKPOINT", "LOAD", "HANDLER", "FLUSH", "KILL", "OPTIMIZE",
        "REPAIR", "CHECK", "VALUES", "TABLE", "END", "ABORT", "RENAME", "SECURITY", "IMPORT",
    )
)  # fmt: skip
_DDL = frozenset(("CREATE", "DROP", "ALTER", "TRUNCATE"))
_DDL_MODIFIERS = frozenset(
    ("OR", "REPLACE", "TEMP", "TEMPORARY", "UNIQUE", "UNLOGGED", "GLOBAL", "LOCAL", "IF", "NOT",
     "EXISTS", "CONCURRENTLY", "MATERIALIZED", "RECURSIVE", "DEFINER", "ALGORITHM", "ONLINE")
)  # fmt: skip
_DDL_OBJECTS = frozenset(
    ("TABLE", "INDEX", "VIEW", "SEQUENCE", "SCHEMA", "DATABASE", "FUNCTION", "PROCEDURE", "TRIGGER",
     "TYPE", "EXTENSION", "ROLE", "USER", "EVENT", "DOMAIN", "POLICY", "PUBLICATION", "SUBSCRIPTION")
)  # fmt: skip
_MAIN_VERBS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "VALUES", "TABLE"))
_TABLE_MODIFIERS = frozenset(("ONLY", "LOW_PRIORITY", "IGNORE", "QUICK", "DELAYED", "INTO"))
_CLAUSES = frozenset(
    ("WHERE", "GROUP", "ORDER", "LIMIT", "SET", "VALUES", "RETURNING", "HAVING", "WINDOW", "UNION", "FOR", "ON",
     "SELECT")
)  # fmt: skip
_JOINS = frozenset(("JOIN", "NATURAL", "CROSS", "INNER", "LEFT", "RIGHT", "FULL", "STRAIGHT_JOIN"))

# Token kinds.
_WORD, _QIDENT, _LIT, _PUNCT, _PARAM = range(5)
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")
_IN_LIST = re.compile(r"\bIN \( ?\?(?: ?, ?\?)+ ?\)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Token:
    kind: int
    text: str  # "?" for literals; upper-cased for words (identifiers keep their case in .raw)
    raw: str


def _is_word_char(c: str) -> bool:
    return c in _WORD_CHARS or c >= "\x80"


def _skip_quoted(s: str, i: int, quote: str, backslash: bool) -> int:
    """Index just past the closing quote of a literal opened at s[i] (len(s) if unterminated)."""
    n = len(s)
    j = i + 1
    while j < n:
        c = s[j]
        if backslash and c == "\\":
            j += 2
            continue
        if c == quote:
            if j + 1 < n and s[j + 1] == quote:  # doubled quote: an escaped one
                j += 2
                continue
            return j + 1
        j += 1
    return n


def tokenize(sql: str, dialect: Dialect) -> list[Token]:
    """The statement's tokens without whitespace and comments; every literal is one `?` token."""
    s = sql[:_MAX_SCAN]
    n = len(s)
    out: list[Token] = []
    i = 0
    mysql = dialect == "mysql"
    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
            continue
        nxt = s[i + 1] if i + 1 < n else ""
        # Comments: dropped (an unterminated one runs to the end).
        if c == "-" and nxt == "-" and (not mysql or i + 2 >= n or s[i + 2].isspace()):
            j = s.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "#" and mysql:
            j = s.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if s.startswith("*/", j):
                    depth -= 1
                    j += 2
                elif not mysql and s.startswith("/*", j):
                    depth += 1  # PostgreSQL nests block comments
                    j += 2
                else:
                    j += 1
            i = j
            continue
        if c == "'" or (c == '"' and mysql):
            # MySQL: backslash escapes by default and "..." is a string; PostgreSQL: standard
            # strings (E'...' is handled with its prefix below).
            i = _skip_quoted(s, i, c, backslash=mysql)
            out.append(Token(_LIT, "?", "?"))
            continue
        if c == '"' or c == "`":
            j = _skip_quoted(s, i, c, backslash=False)
            raw = s[i:j]
            if j >= n and not raw.endswith(c) or len(raw) < 2:
                out.append(Token(_LIT, "?", "?"))  # a cut identifier is redacted: the safe error
            else:
                out.append(Token(_QIDENT, raw, raw))
            i = j
            continue
        if c == "$" and not mysql:
            if nxt.isdigit():  # $1 positional parameter
                j = i + 1
                while j < n and s[j].isdigit():
                    j += 1
                out.append(Token(_PARAM, s[i:j], s[i:j]))
                i = j
                continue
            m = _DOLLAR_TAG.match(s, i)
            if m:
                end = s.find(m.group(0), m.end())
                i = n if end < 0 else end + len(m.group(0))
                out.append(Token(_LIT, "?", "?"))
                continue
        if c.isdigit() or (c == "." and nxt.isdigit()):
            j = i + 1
            while j < n:
                d = s[j]
                if _is_word_char(d) or d == ".":
                    j += 1
                elif d in "+-" and s[j - 1] in "eE" and not s[i:j].lower().startswith(("0x", "0b")):
                    j += 1
                else:
                    break
            out.append(Token(_LIT, "?", "?"))
            i = j
            continue
        if _is_word_char(c):
            j = i + 1
            while j < n and _is_word_char(s[j]):
                j += 1
            word = s[i:j]
            up = word.upper()
            # Prefixed literals: E'..' (backslash escapes), B'..', X'..', N'..', U&'..', and
            # MySQL's _charset'..' introducers; the prefix goes with the literal.
            if j < n and s[j] == "'" and (up in ("E", "B", "X", "N") or (mysql and up.startswith("_"))):
                i = _skip_quoted(s, j, "'", backslash=mysql or up == "E")
                out.append(Token(_LIT, "?", "?"))
                continue
            if up == "U" and s.startswith("&'", j):
                i = _skip_quoted(s, j + 1, "'", backslash=False)
                out.append(Token(_LIT, "?", "?"))
                continue
            out.append(Token(_WORD, up, word))
            i = j
            continue
        if c == "?" or (c == ":" and nxt.isalpha() and (not out or out[-1].text != ":")):
            out.append(Token(_PARAM, c, c))
            i += 1
            continue
        out.append(Token(_PUNCT, c, c))
        i += 1
    return out


def _render(tokens: list[Token]) -> str:
    parts: list[str] = []
    prev: Token | None = None
    for t in tokens:
        if prev is not None and _needs_space(prev, t):
            parts.append(" ")
        parts.append(t.raw if t.kind != _LIT else "?")
        prev = t
    return "".join(parts)


def _needs_space(a: Token, b: Token) -> bool:
    if a.kind == _PUNCT and a.text in "(.[" or b.kind == _PUNCT and b.text in "),.;[]":
        return False
    if b.kind == _PUNCT and b.text == "(":
        return a.kind != _WORD or a.text in ("IN", "VALUES", "AS", "FROM", "JOIN", "EXISTS", "ANY")
    # No space around ':' so PostgreSQL's x::int cast stays one piece.
    return not (a.kind == _PUNCT and a.text == ":" or b.kind == _PUNCT and b.text == ":")


def redact(sql: str, dialect: Dialect) -> str:
    """The statement with every literal replaced by `?`, comments dropped, capped in length."""
    text = _IN_LIST.sub("IN (?)", _render(tokenize(sql, dialect)))
    return text[:MAX_QUERY_TEXT]


def split(tokens: list[Token]) -> list[list[Token]]:
    """Top-level statements (`;`-separated); empty ones dropped."""
    out: list[list[Token]] = []
    cur: list[Token] = []
    for t in tokens:
        if t.kind == _PUNCT and t.text == ";":
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(cur)
    return out


def _operation(stmt: list[Token]) -> str | None:
    words = [t for t in stmt if not (t.kind == _PUNCT and t.text == "(")]
    if not words or words[0].kind != _WORD:
        return None
    first = words[0].text
    if first == "WITH":  # the verb after the common table expressions, at depth 0
        depth = 0
        for t in stmt[1:]:
            if t.kind == _PUNCT:
                depth += (t.text == "(") - (t.text == ")")
            elif depth == 0 and t.kind == _WORD and t.text in _MAIN_VERBS:
                return t.text
        return None
    if first not in OPERATIONS:
        return None
    if first in _DDL:
        for t in words[1:6]:
            if t.kind != _WORD:
                break
            if t.text in _DDL_OBJECTS:
                return f"{first} {t.text}"
            if t.text not in _DDL_MODIFIERS:
                break
    if first == "START" and len(words) > 1 and words[1].text == "TRANSACTION":
        return "START TRANSACTION"
    return first


def _name_at(stmt: list[Token], i: int, columns: bool = False) -> tuple[str | None, int]:
    """A possibly qualified table name starting at stmt[i]: (name, index after it). `columns`: a
    parenthesis after it is a column list (INSERT INTO t (a, b)), not a function call's."""
    parts: list[str] = []
    while i < len(stmt) and stmt[i].kind in (_WORD, _QIDENT):
        t = stmt[i]
        parts.append(t.raw[1:-1] if t.kind == _QIDENT else t.raw)
        i += 1
        if i < len(stmt) and stmt[i].kind == _PUNCT and stmt[i].text == ".":
            i += 1
            continue
        break
    if not parts:
        return None, i
    if not columns and i < len(stmt) and stmt[i].kind == _PUNCT and stmt[i].text == "(":
        return None, i  # a function call (FROM generate_series(...)), not a table
    return ".".join(parts), i


def _single_table_after(stmt: list[Token], keyword: str) -> str | None:
    depth = 0
    for i, t in enumerate(stmt):
        if t.kind == _PUNCT:
            depth += (t.text == "(") - (t.text == ")")
            continue
        if depth == 0 and t.kind == _WORD and t.text == keyword:
            j = i + 1
            while j < len(stmt) and stmt[j].kind == _WORD and stmt[j].text in _TABLE_MODIFIERS:
                j += 1
            name, k = _name_at(stmt, j, columns=keyword in ("INTO", "INSERT", "REPLACE"))
            if name is None:
                return None
            # Anything naming a second table at depth 0 (a comma list or a join) means several.
            d = 0
            for u in stmt[k:]:
                if u.kind == _PUNCT:
                    d += (u.text == "(") - (u.text == ")")
                    if d == 0 and u.text == ",":
                        if keyword == "FROM":
                            return None
                elif d == 0 and u.kind == _WORD and (u.text in _JOINS or u.text == "USING" and keyword == "FROM"):
                    return None
                elif d == 0 and u.kind == _WORD and u.text in _CLAUSES:
                    if u.text == "UNION" or keyword != "FROM" and u.text == "SELECT":
                        return None  # a second query, maybe naming other tables
                    break
            if _has_subquery_table(stmt):
                return None
            return name
    return None


def _has_subquery_table(stmt: list[Token]) -> bool:
    depth = 0
    for t in stmt:
        if t.kind == _PUNCT:
            depth += (t.text == "(") - (t.text == ")")
        elif depth > 0 and t.kind == _WORD and t.text in ("FROM", "JOIN"):
            return True
    return False


def _collection(stmt: list[Token], op: str | None) -> str | None:
    if op is None:
        return None
    if any(t.kind == _WORD and t.text in ("UNION", "INTERSECT", "EXCEPT") for t in stmt):
        return None  # several queries, maybe several tables
    if op == "SELECT" or op == "DELETE":
        return _single_table_after(stmt, "FROM")
    if op in ("INSERT", "REPLACE"):
        return _single_table_after(stmt, "INTO") or _single_table_after(stmt, op)
    if op == "UPDATE":
        return _single_table_after(stmt, "UPDATE")
    if op in ("TRUNCATE", "TRUNCATE TABLE"):
        return _single_table_after(stmt, "TABLE") or _single_table_after(stmt, "TRUNCATE")
    if op in ("CREATE TABLE", "DROP TABLE", "ALTER TABLE", "COPY", "TABLE", "LOCK"):
        kw = stmt[0].text if op in ("COPY", "TABLE", "LOCK") else "TABLE"
        if kw == "LOCK":
            return _single_table_after(stmt, "TABLE") or _single_table_after(stmt, "LOCK")
        idx = next((i for i, t in enumerate(stmt) if t.kind == _WORD and t.text == kw), -1)
        j = idx + 1
        while j < len(stmt) and stmt[j].kind == _WORD and stmt[j].text in ("IF", "NOT", "EXISTS", "ONLY"):
            j += 1
        name, _ = _name_at(stmt, j, columns=True)
        return name
    return None


@dataclass(frozen=True, slots=True)
class QueryInfo:
    text: str  # redacted, capped
    operation: str | None  # db.operation.name
    collection: str | None  # db.collection.name (one table only)
    statements: int  # top-level statements; > 1 is a batch


# Not SQL: control bytes or undecodable bytes outside literals (a binary payload misread as text,
# e.g. after a gap). Nothing of it is exported, since its words may be values.
UNREADABLE = QueryInfo("", None, None, 0)


def _unreadable(t: Token) -> bool:
    if t.kind == _LIT:
        return False
    return any((c < " " and c not in "\t\n\r\f\v") or c == "\x7f" or c == "\ufffd" for c in t.raw)


def describe(sql: str, dialect: Dialect) -> QueryInfo:
    """Everything the decoders export from one query's text. Never raises."""
    try:
        # A copy cut inside a multi-byte character decodes to a trailing U+FFFD: not the text's.
        tokens = tokenize(sql.rstrip("\ufffd"), dialect)
        if any(_unreadable(t) for t in tokens):
            return UNREADABLE
        text = _IN_LIST.sub("IN (?)", _render(tokens))[:MAX_QUERY_TEXT]
        stmts = split(tokens)
        if not stmts:
            return QueryInfo(text, None, None, 0)
        ops = [_operation(s) for s in stmts]
        if len(stmts) == 1:
            return QueryInfo(text, ops[0], _collection(stmts[0], ops[0]), 1)
        # A batch: "BATCH <op>" when every statement is the same operation (the conventions').
        op = f"BATCH {ops[0]}" if ops[0] is not None and all(o == ops[0] for o in ops) else "BATCH"
        colls = {_collection(s, o) for s, o in zip(stmts, ops, strict=True)}
        coll = colls.pop() if len(colls) == 1 else None
        return QueryInfo(text, op, coll, len(stmts))
    except Exception:  # noqa: BLE001 - never out of a decoder; the text is then not exported
        return QueryInfo("", None, None, 0)


_QUOTES = "'\"`"
_DIGITS = re.compile(r"\d+(?:\.\d+)?")
MAX_ERROR_MESSAGE = 256


def redact_message(msg: str) -> str:
    """A server's error message made safe to export: everything from its first quote to its last
    (servers quote the values, and a quoted query fragment may hold quotes of its own) and every
    number becomes `?`; capped."""
    first = min((p for p in (msg.find(q) for q in _QUOTES) if p >= 0), default=-1)
    if first >= 0:
        last = max(msg.rfind(q) for q in _QUOTES)
        msg = msg[:first] + "?" + (msg[last + 1 :] if last > first else "")
    return _DIGITS.sub("?", msg)[:MAX_ERROR_MESSAGE]


_NAME_MAX = 64  # MySQL's identifier limit; PostgreSQL's is 63 bytes


def identifier(raw: bytes) -> str | None:
    """A database name read off the wire, or None when it cannot be one (control bytes, too
    long): a frame misread after a gap must not export whatever bytes followed as a name."""
    if not raw or len(raw) > _NAME_MAX * 4 or any(b < 0x20 or b == 0x7F for b in raw):
        return None
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= _NAME_MAX and "\ufffd" not in text else None
