"""HPACK (RFC 7541) header block decoding for the HTTP/2 decoder: static and dynamic tables, size
updates and eviction, integer and string literals, Huffman-coded strings.

A decoder may not know its dynamic table's whole history: a connection picked up mid-stream, or a
header block that was cut short (its insertions are lost, so every older entry's index shifts by an
unknown amount). It then keeps only the entries inserted since (`complete` is False): the table
always holds the newest entries in insertion order, so a reference to an index among those is
certain, and any other dynamic reference is reported unknown. Nothing is ever guessed. A table
larger than TABLE_CAP is mirrored up to the cap only, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 7541 Appendix A.
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"), (b":status", b"200"),
    (b":status", b"204"), (b":status", b"206"), (b":status", b"304"), (b":status", b"400"),
    (b":status", b"404"), (b":status", b"500"), (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"), (b"accept-language", b""), (b"accept-ranges", b""),
    (b"accept", b""), (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""), (b"cookie", b""),
    (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""), (b"from", b""), (b"host", b""),
    (b"if-match", b""), (b"if-modified-since", b""), (b"if-none-match", b""), (b"if-range", b""),
    (b"if-unmodified-since", b""), (b"last-modified", b""), (b"link", b""), (b"location", b""),
    (b"max-forwards", b""), (b"proxy-authenticate", b""), (b"proxy-authorization", b""),
    (b"range", b""), (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
)  # fmt: skip
_STATIC_LEN = len(STATIC_TABLE)  # 61
ENTRY_OVERHEAD = 32  # RFC 7541 4.1
DEFAULT_TABLE_SIZE = 4096  # SETTINGS_HEADER_TABLE_SIZE's initial value (RFC 9113 6.5.2)
# The largest table this decoder mirrors (bounded memory). Beyond it the oldest entries are
# forgotten and the table counts as incomplete: a reference to one is unknown, never wrong.
TABLE_CAP = 65536
_MAX_INT_BYTES = 5  # continuation bytes of an integer: 2**35, far beyond any legal size or length

# RFC 7541 Appendix B, as code lengths per symbol (0..255, 256 = EOS). The code is canonical
# (codes of one length are consecutive in symbol order), so the lengths determine every code.
_HUFFMAN_LENGTHS: tuple[int, ...] = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28,
    28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15,
    6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20,
    20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23,
    24, 22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22,
    22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27,
    24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26,
    26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
)  # fmt: skip
EOS = 256


def _canonical_codes(lengths: tuple[int, ...]) -> list[int]:
    codes = [0] * len(lengths)
    code = 0
    prev = 0
    for i, sym in enumerate(sorted(range(len(lengths)), key=lambda s: (lengths[s], s))):
        if i:
            code = (code + 1) << (lengths[sym] - prev)
        prev = lengths[sym]
        codes[sym] = code
    return codes


HUFFMAN_CODES: tuple[int, ...] = tuple(_canonical_codes(_HUFFMAN_LENGTHS))


def _decoding_tables() -> tuple[dict[int, int], dict[int, int], dict[int, list[int]]]:
    # Canonical decoding: a code of length n is first[n] + k for the k-th symbol of that length.
    first: dict[int, int] = {}
    count: dict[int, int] = {}
    symbols: dict[int, list[int]] = {}
    for sym in sorted(range(len(_HUFFMAN_LENGTHS)), key=lambda s: (_HUFFMAN_LENGTHS[s], s)):
        n = _HUFFMAN_LENGTHS[sym]
        first.setdefault(n, HUFFMAN_CODES[sym])
        count[n] = count.get(n, 0) + 1
        symbols.setdefault(n, []).append(sym)
    return first, count, symbols


_H_FIRST, _H_COUNT, _H_SYMBOLS = _decoding_tables()
_H_MIN = min(_H_FIRST)
_H_MAX = max(_H_FIRST)


class HpackError(Exception):
    """The block violates RFC 7541 (a COMPRESSION_ERROR): the dynamic table is no longer known."""


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = 0
    n = 0
    first = _H_FIRST
    for byte in data:
        for shift in (7, 6, 5, 4, 3, 2, 1, 0):
            code = (code << 1) | ((byte >> shift) & 1)
            n += 1
            if n < _H_MIN:
                continue
            f = first.get(n)
            if f is not None and 0 <= code - f < _H_COUNT[n]:
                sym = _H_SYMBOLS[n][code - f]
                if sym == EOS:
                    raise HpackError("EOS in a Huffman string")
                out.append(sym)
                code = 0
                n = 0
            elif n > _H_MAX:
                raise HpackError("invalid Huffman code")
    # Padding: the most significant bits of EOS (all ones), strictly shorter than 8 bits.
    if n > 7 or code != (1 << n) - 1:
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def decode_integer(data: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """(value, next position) of an integer with an N-bit prefix at data[pos]."""
    if pos >= len(data):
        raise HpackError("integer past the block's end")
    mask = (1 << prefix) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(_MAX_INT_BYTES):
        if pos >= len(data):
            raise HpackError("integer past the block's end")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos
    raise HpackError("integer too long")


def decode_string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HpackError("string past the block's end")
    huffman = bool(data[pos] & 0x80)
    length, pos = decode_integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HpackError("string past the block's end")
    raw = data[pos:end]
    return (huffman_decode(raw) if huffman else raw), end


@dataclass(frozen=True, slots=True)
class Field:
    name: bytes
    value: bytes
    never_indexed: bool = False


@dataclass(slots=True)
class Decoded:
    fields: list[Field]
    unknown: int  # fields whose name or value referred to a dynamic entry this decoder does not know


class Decoder:
    """One direction's HPACK decoder (the peer's encoder state, mirrored).

    `max_allowed` is the receiving end's SETTINGS_HEADER_TABLE_SIZE bound on size updates (None:
    not known, any size is accepted)."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE, complete: bool = True) -> None:
        # Newest first; name None: an entry whose name came from an unknown entry.
        self._entries: list[tuple[bytes | None, bytes, int]] = []
        self._size = 0
        self.max_table_size = max_table_size
        self.max_allowed: int | None = max_table_size if complete else None
        self.complete = complete

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[tuple[bytes | None, bytes]]:
        return [(n, v) for n, v, _ in self._entries]

    def lose(self) -> None:
        """The history is no longer known (a block was lost or cut): forget every entry."""
        self._entries.clear()
        self._size = 0
        self.complete = False

    def allow(self, settings_size: int) -> None:
        """The receiver advertised SETTINGS_HEADER_TABLE_SIZE: the encoder may size up to it.
        Until the peer applies it both the old and the new bound are legal, so keep the larger."""
        if self.max_allowed is None or settings_size > self.max_allowed:
            self.max_allowed = settings_size

    def _evict(self) -> None:
        while self._size > self.max_table_size and self._entries:
            self._size -= self._entries.pop()[2]

    def _add(self, name: bytes | None, value: bytes) -> None:
        # An entry with an unknown name counts its value only: a lower bound of its size, so this
        # table evicts it no earlier than the peer's (keeping an evicted entry is harmless: the
        # encoder never refers to it).
        size = (len(name) if name is not None else 0) + len(value) + ENTRY_OVERHEAD
        self._entries.insert(0, (name, value, size))
        self._size += size
        self._evict()

    def _lookup(self, index: int) -> tuple[bytes | None, bytes | None]:
        """(name, value) of an index; (None, None) for a dynamic entry this decoder does not know."""
        if index == 0:
            raise HpackError("index 0")
        if index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        i = index - _STATIC_LEN - 1
        if i < len(self._entries):
            n, v, _ = self._entries[i]
            return n, v
        if self.complete:
            raise HpackError(f"index {index} beyond the dynamic table")
        return None, None

    def decode(self, block: bytes) -> Decoded:
        fields: list[Field] = []
        unknown = 0
        pos = 0
        end = len(block)
        seen_field = False
        while pos < end:
            b = block[pos]
            if b & 0x80:  # indexed field
                index, pos = decode_integer(block, pos, 7)
                name, value = self._lookup(index)
                if name is None or value is None:
                    unknown += 1
                else:
                    fields.append(Field(name, value))
                seen_field = True
                continue
            if b & 0xE0 == 0x20:  # dynamic table size update
                if seen_field:
                    raise HpackError("table size update after a field")
                size, pos = decode_integer(block, pos, 5)
                if self.max_allowed is not None and size > self.max_allowed:
                    raise HpackError(f"table size {size} above the allowed {self.max_allowed}")
                if size > TABLE_CAP:
                    size = TABLE_CAP
                    self.complete = False
                self.max_table_size = size
                self._evict()
                continue
            if b & 0xC0 == 0x40:  # literal with incremental indexing
                index, pos = decode_integer(block, pos, 6)
                indexing, never = True, False
            else:  # 0000xxxx without indexing, 0001xxxx never indexed
                never = bool(b & 0x10)
                index, pos = decode_integer(block, pos, 4)
                indexing = False
            name_known: bytes | None
            if index:
                name_known = self._lookup(index)[0]
            else:
                name_known, pos = decode_string(block, pos)
            value, pos = decode_string(block, pos)
            if indexing:
                self._add(name_known, value)
            if name_known is None:
                unknown += 1
            else:
                fields.append(Field(name_known, value, never))
            seen_field = True
        return Decoded(fields, unknown)
