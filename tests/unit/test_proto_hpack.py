"""HPACK decoder (correlator/protocols/hpack.py): RFC 7541 Appendix C, round trips against an
independent encoder (the `hpack` package), and a table that does not know its history."""

from __future__ import annotations

import hpack as ref  # independent encoder, test-only
import pytest
from hpack.huffman_constants import REQUEST_CODES
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols import hpack

# RFC 7541 Appendix C: (block, decoded fields, table size after it). C.2 blocks each start from an
# empty table; C.3-C.4 run on one 4096-byte table, C.5-C.6 on one 256-byte table.
C2 = [
    ("400a637573746f6d2d6b65790d637573746f6d2d686561646572", [(b"custom-key", b"custom-header")], 55),
    ("040c2f73616d706c652f70617468", [(b":path", b"/sample/path")], 0),
    ("100870617373776f726406736563726574", [(b"password", b"secret")], 0),
    ("82", [(b":method", b"GET")], 0),
]
REQ1 = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")]
REQ2 = [*REQ1, (b"cache-control", b"no-cache")]
REQ3 = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
        (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]  # fmt: skip
C3 = [
    ("828684410f7777772e6578616d706c652e636f6d", REQ1, 57),
    ("828684be58086e6f2d6361636865", REQ2, 110),
    ("828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565", REQ3, 164),
]
C4 = [
    ("828684418cf1e3c2e5f23a6ba0ab90f4ff", REQ1, 57),
    ("828684be5886a8eb10649cbf", REQ2, 110),
    ("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf", REQ3, 164),
]
_DATE1 = b"Mon, 21 Oct 2013 20:13:21 GMT"
_LOC = b"https://www.example.com"
RESP1 = [(b":status", b"302"), (b"cache-control", b"private"), (b"date", _DATE1), (b"location", _LOC)]
RESP2 = [(b":status", b"307"), (b"cache-control", b"private"), (b"date", _DATE1), (b"location", _LOC)]
RESP3 = [(b":status", b"200"), (b"cache-control", b"private"), (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
         (b"location", _LOC), (b"content-encoding", b"gzip"),
         (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]  # fmt: skip
C5 = [
    ("4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e17"
     "68747470733a2f2f7777772e6578616d706c652e636f6d", RESP1, 222),
    ("4803333037c1c0bf", RESP2, 222),
    ("88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d41"
     "53444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b207665727369"
     "6f6e3d31", RESP3, 215),
]  # fmt: skip
C6 = [
    ("488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97"
     "c8e9ae82ae43d3", RESP1, 222),
    ("4883640effc1c0bf", RESP2, 222),
    ("88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b"
     "3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007", RESP3, 215),
]  # fmt: skip


def _pairs(d: hpack.Decoded) -> list[tuple[bytes, bytes]]:
    return [(f.name, f.value) for f in d.fields]


def test_huffman_codes_are_the_rfcs() -> None:
    # The canonical codes derived from the lengths equal Appendix B's codes (as the hpack package
    # spells them out).
    assert list(hpack.HUFFMAN_CODES) == REQUEST_CODES


@pytest.mark.parametrize("block,fields,size", C2)
def test_c2_literals(block: str, fields: list[tuple[bytes, bytes]], size: int) -> None:
    d = hpack.Decoder()
    out = d.decode(bytes.fromhex(block))
    assert _pairs(out) == fields and out.unknown == 0
    assert d.size == size
    # C.2.3 is the never-indexed literal: the flag survives, and nothing enters the table.
    assert out.fields[0].never_indexed == (block.startswith("10"))


@pytest.mark.parametrize("vectors,table", [(C3, 4096), (C4, 4096), (C5, 256), (C6, 256)], ids=["C3", "C4", "C5", "C6"])
def test_c3_to_c6_sequences(vectors: list[tuple[str, list[tuple[bytes, bytes]], int]], table: int) -> None:
    d = hpack.Decoder(max_table_size=table)
    for block, fields, size in vectors:
        out = d.decode(bytes.fromhex(block))
        assert _pairs(out) == fields
        assert d.size == size
    if vectors is C5 or vectors is C6:
        # C.5.3 / C.6.3 evicted two entries: exactly these three remain, newest first.
        assert d.entries() == [
            (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
            (b"content-encoding", b"gzip"),
            (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        ]


def test_integer_c1() -> None:
    assert hpack.decode_integer(bytes([0x0A]), 0, 5) == (10, 1)
    assert hpack.decode_integer(bytes([0x1F, 0x9A, 0x0A]), 0, 5) == (1337, 3)
    assert hpack.decode_integer(bytes([0x2A]), 0, 8) == (42, 1)
    with pytest.raises(hpack.HpackError):
        hpack.decode_integer(bytes([0x1F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), 0, 5)
    with pytest.raises(hpack.HpackError):
        hpack.decode_integer(bytes([0x1F, 0x9A]), 0, 5)


@pytest.mark.parametrize(
    "block",
    [
        "80",  # index 0
        "be",  # index 62 on an empty table
        "3fe21f",  # size update to 4097, above the allowed 4096
        "82" + "20",  # size update after a field
        "418cf1e3c2e5f23a6ba0ab90f4",  # string past the end
        "4181fe",  # Huffman padding of 7+ bits not all ones
        "0081ff",  # Huffman: 8 bits of padding
        "41" + "84" + "ffffffff",  # Huffman EOS (30 ones) inside the string
    ],
)
def test_malformed_blocks_raise_hpack_error(block: str) -> None:
    with pytest.raises(hpack.HpackError):
        hpack.Decoder().decode(bytes.fromhex(block))


def test_size_update_evicts_and_is_bounded_by_settings() -> None:
    d = hpack.Decoder()
    d.decode(bytes.fromhex(C3[0][0]) + b"")
    d.decode(bytes.fromhex(C3[1][0]))
    assert len(d) == 2
    d.decode(bytes([0x20]))  # size update to 0 empties the table
    assert len(d) == 0 and d.size == 0
    d.allow(8192)
    d.decode(bytes([0x3F, 0xE1, 0x3F]))  # 8192 is allowed now
    assert d.max_table_size == 8192


def test_table_above_the_cap_forgets_its_oldest_entries_as_unknown() -> None:
    d = hpack.Decoder()
    d.allow(1 << 20)
    enc = ref.Encoder()
    enc.header_table_size = 1 << 20
    fields = [(f"k{i}", "v" * 1000) for i in range(100)]  # ~100 KB of entries
    assert _pairs(d.decode(enc.encode(fields))) == [(n.encode(), v.encode()) for n, v in fields]
    assert d.max_table_size == hpack.TABLE_CAP and d.size <= hpack.TABLE_CAP and not d.complete
    out = d.decode(enc.encode(fields))  # all indexed now: the oldest are beyond what was kept
    assert out.unknown > 0 and len(out.fields) + out.unknown == 100
    assert (b"k99", b"v" * 1000) in _pairs(out)


def test_unknown_history_decodes_static_literals_and_new_entries_only() -> None:
    # The peer's table held C.3.1's :authority before we started listening: C.3.2's index 62 is
    # unknown (counted), static and literal fields decode, and C.3.3's new entry is known.
    d = hpack.Decoder(complete=False)
    out = d.decode(bytes.fromhex(C3[1][0]))
    assert _pairs(out) == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                           (b"cache-control", b"no-cache")]  # fmt: skip
    assert out.unknown == 0 + 0 + 1
    out = d.decode(bytes.fromhex(C3[2][0]))
    # bf (63) is :authority, beyond the one known entry: unknown; custom-key is new and known.
    assert out.unknown == 1
    assert (b"custom-key", b"custom-value") in _pairs(out)
    assert d.entries()[0] == (b"custom-key", b"custom-value")
    # Index 62 now is custom-key for certain: the newest entry.
    assert _pairs(d.decode(bytes([0xBE]))) == [(b"custom-key", b"custom-value")]


def test_literal_with_unknown_dynamic_name_inserts_a_placeholder() -> None:
    d = hpack.Decoder(complete=False)
    out = d.decode(bytes([0x7F, 0x00, 0x01, 0x78]))  # incremental, name index 63 (unknown), "x"
    assert out.unknown == 1 and out.fields == []
    assert d.entries() == [(None, b"x")]
    assert d.decode(bytes([0xBE])).unknown == 1  # the placeholder's name is still unknown


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
_STATICISH = st.sampled_from([(":method", "GET"), (":path", "/"), (":status", "200"),
                              ("content-type", "application/grpc"), ("user-agent", "x")])  # fmt: skip
_HEADER = st.one_of(st.tuples(_NAME, _VALUE), _STATICISH)
_BLOCK = st.tuples(
    st.lists(st.tuples(_HEADER, st.booleans()), max_size=12),
    st.booleans(),
    st.one_of(st.none(), st.sampled_from([0, 64, 256, 1024, 4096])),
)


@given(st.lists(_BLOCK, min_size=1, max_size=8))
def test_round_trip_against_the_hpack_encoder(blocks: list) -> None:
    enc = ref.Encoder()
    dec = hpack.Decoder()
    for headers, huffman, resize in blocks:
        if resize is not None:
            enc.header_table_size = resize  # the next block starts with a size update
        tuples = [ref.NeverIndexedHeaderTuple(n, v) if never else ref.HeaderTuple(n, v)
                  for (n, v), never in headers]  # fmt: skip
        block = enc.encode(tuples, huffman=huffman)
        out = dec.decode(block)
        assert out.unknown == 0
        assert [(f.name.decode(), f.value.decode()) for f in out.fields] == [h for h, _ in headers]
        # The encoder may send a never-indexed header as a static index; a literal keeps the flag.
        for f, (_, never) in zip(out.fields, headers, strict=True):
            if f.never_indexed:
                assert never
        # The two tables agree entry by entry (the encoder's is newest first too).
        assert dec.entries() == [(n, v) for n, v in enc.header_table.dynamic_entries]
        assert dec.size == enc.header_table._current_size


@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_blocks_raise_only_hpack_error(data: bytes, complete: bool) -> None:
    d = hpack.Decoder(complete=complete)
    try:
        out = d.decode(data)
    except hpack.HpackError:
        return
    assert out.unknown >= 0


@given(st.lists(_BLOCK, min_size=2, max_size=10), st.integers(1, 9), st.sampled_from([64, 256, 4096, 8192]))
def test_a_decoder_without_the_history_never_guesses(blocks: list, start: int, size: int) -> None:
    # Pick up an encoder's blocks from block `start` on (its table full of unknown entries):
    # every field decoded is the true field, in order; every other one is counted unknown.
    enc = ref.Encoder()
    enc.header_table_size = size
    dec = hpack.Decoder(complete=False)
    for i, (headers, huffman, resize) in enumerate(blocks):
        if resize is not None:
            enc.header_table_size = resize
        true = [(n.encode(), v.encode()) for (n, v), _ in headers]
        block = enc.encode([ref.HeaderTuple(n, v) for (n, v), _ in headers], huffman=huffman)
        if i < start % len(blocks):
            continue
        out = dec.decode(block)
        got = _pairs(out)
        assert len(got) + out.unknown == len(true)
        it = iter(true)
        assert all(any(g == t for t in it) for g in got), (got, true)
