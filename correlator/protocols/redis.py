"""Redis (RESP2 and RESP3) operations from a connection's segments, either end.

Follows the OpenTelemetry database semantic conventions v1.33 and their Redis page:
`db.system.name=redis`; `db.operation.name` is the command in upper case, and for the container
commands whose subcommand selects the operation (CLIENT, CONFIG, ACL, ...) the command and the
subcommand ("CLIENT SETNAME", "CONFIG GET"); a command name Redis does not define (typos, garbage)
is "_OTHER" so a name never carries user data, while the common modules' commands ("JSON.SET",
"FT.SEARCH") keep theirs;
`db.namespace` is the database index, set only when known reliably: after a SELECT seen on the
connection, or from the first command when it is a connection handshake (HELLO, AUTH, CLIENT
SETNAME/SETINFO) or the decoder was told it sees the connection from its start (index 0 then);
`db.response.status_code` is the error prefix (ERR, WRONGTYPE, ...) of an error reply, and the
operation's error.type. The span name is `db.operation.name`: the Redis page says the numeric
namespace SHOULD NOT be in it (the consumer may append `server.address:server.port` as target).

`db.query.text` is the command without its values: every argument after the operation name is
`?` ("SET ? ?", "CLIENT SETNAME ?"), keys included (keys often hold user ids or e-mails), at most
MAX_PLACEHOLDERS of them and then " ...". AUTH and HELLO (which may carry AUTH) have no query text.
Error texts are never exported either: Redis echoes arguments into them ("unknown command 'x',
with args beginning with: ..."), and a script chooses its own, so the status code must be one of
the prefixes Redis itself uses (else "_OTHER") and the message names only that prefix. No value,
key, password or channel name is kept past the message that carried it.

Framing. Each direction is a resumable RESP parser. A value longer than the kernel's copy is
stepped over by its bulk length ("bulk_bytes_skipped"), so big values cost nothing. Unknown bytes
where a header should be (a gap past a value, a cut pipelined write) or bytes that are not RESP
lose the position: the direction resynchronises at the start of a later transfer that begins like
a message (in the command direction an array of bulk strings or an inline command naming a known
command). Pairing is in order (Redis answers in order); commands lost to a gap leave a marker, and
replies that arrive before the next decoded command was sent are theirs: counted
("replies_unpaired"), not paired with the wrong command. When replies are lost, the commands
waiting for them end at that transfer ("replies_lost"). Push messages (RESP3 `>`, RESP2
pub/sub messages, MONITOR lines, client-tracking invalidations) are not replies ("pushes").
SUBSCRIBE-family commands end at their last confirmation; commands queued in MULTI end at EXEC's
reply with their own result (an error inside EXEC's array is that command's error).

Positions. A command's req_pos is the stream position of its first byte (the `*`, or an inline
command's first letter), taken from the segment that byte came in, so a command split over
transfers, behind a gap or pipelined with others is named alike on both ends. A command found where
decoding resumed after a loss, or the first of a connection not seen from its start, starts there
only by guess (it may be a value's tail that looks like one): its req_pos is None.

Which direction carries commands: the traced process's writes when it is the client (pass
`client=` when the kernel knows it). Without that hint, strong evidence decides: an array of bulk
strings naming a known command, or an inline command, is a command; another type decoded from a
direction's first bytes is a reply. Weak evidence (a message found by a resync, a lone bulk
string, an array of bulk strings naming nothing known) decides nothing and is counted.

Limits: replies to commands lost inside a pipelined flight are told apart only by time (those
that arrive before the next decoded command was sent); when several of a flight's transfers
were cut before any reply came, later decoded commands of that flight may be paired with their
lost predecessors' replies (each span keeps its own command's name; its end and status may be another's).
"""

from __future__ import annotations

import re
from collections import deque

from correlator.segments import Operation, Segment, stream_pos
from correlator.semconv import ERR_CLOSED
from correlator.spans import AttrValue

PROTOCOL = "redis"
MAX_PLACEHOLDERS = 16
MAX_PENDING = 4096  # commands awaiting replies on one connection; beyond, the oldest are dropped (counted)
_LINE_MAX = 64 * 1024  # Redis's own inline and header limit
_BULK_MAX = 512 * 1024 * 1024  # proto-max-bulk-len's default and ceiling
_AGG_MAX = 1 << 31
_TEXT_CAP = 64  # bytes of an element kept for classification (command names, pub/sub kinds)
_KEEP_CHILDREN = 3

COUNTERS = (
    "commands",  # commands decoded
    "replies",  # replies paired with their command
    "pushes",  # push messages, pub/sub messages, MONITOR lines: decoded, not replies
    "replies_unpaired",  # replies with no command to pair (picked up mid-stream, commands lost)
    "commands_lost",  # losses in the command direction (each hides one or more commands)
    "replies_lost",  # commands ended without a decoded reply (the reply's bytes were not copied)
    "commands_unanswered",  # commands still waiting at close
    "commands_evicted",  # commands dropped because MAX_PENDING were waiting
    "unknown_commands",  # commands exported as _OTHER
    "bulk_bytes_skipped",  # value bytes beyond the copy, stepped over by their length (no loss)
    "bytes_undecoded",  # bytes not decoded: unknown gap bytes, bytes skipped until a resync
    "protocol_errors",  # bytes that are not RESP where a message should start or continue
    "resyncs",  # decoding resumed at a transfer start after a loss
    "messages_cut",  # a message still incomplete when the connection closed
    "decoder_errors",  # a bug caught: the decoder resynchronises
)

_COMMANDS = frozenset(
    """acl append asking auth bgrewriteaof bgsave bitcount bitfield bitfield_ro bitop bitpos blmove blmpop
blpop brpop brpoplpush bzmpop bzpopmax bzpopmin client cluster command config copy dbsize debug decr
decrby del discard dump echo eval eval_ro evalsha evalsha_ro exec exists expire expireat expiretime
failover fcall fcall_ro flushall flushdb function geoadd geodist geohash geopos georadius
georadius_ro georadiusbymember georadiusbymember_ro geosearch geosearchstore get getbit getdel getex
getrange getset hdel hello hexists hexpire hexpireat hexpiretime hget hgetall hgetdel hgetex hincrby
hincrbyfloat hkeys hlen hmget hmset hpersist hpexpire hpexpireat hpexpiretime hpttl hrandfield hscan
hset hsetex hsetnx hstrlen httl hvals incr incrby incrbyfloat info keys lastsave latency lcs lindex
linsert llen lmove lmpop lolwut lpop lpos lpush lpushx lrange lrem lset ltrim memory mget migrate
module monitor move mset msetnx multi object persist pexpire pexpireat pexpiretime pfadd pfcount
pfdebug pfmerge pfselftest ping psetex psubscribe psync pttl publish pubsub punsubscribe quit
randomkey readonly readwrite rename renamenx replconf replicaof reset restore restore-asking role
rpop rpoplpush rpush rpushx sadd save scan scard script sdiff sdiffstore select set setbit setex
setnx setrange shutdown sinter sintercard sinterstore sismember slaveof slowlog smembers smismember
smove sort sort_ro spop spublish srandmember srem sscan ssubscribe strlen subscribe substr sunion
sunionstore sunsubscribe swapdb sync time touch ttl type unlink unsubscribe unwatch wait waitaof
watch xack xadd xautoclaim xclaim xdel xgroup xinfo xlen xpending xrange xread xreadgroup xrevrange
xsetid xtrim zadd zcard zcount zdiff zdiffstore zincrby zinter zintercard zinterstore zlexcount
zmpop zmscore zpopmax zpopmin zrandmember zrange zrangebylex zrangebyscore zrangestore zrank zrem
zremrangebylex zremrangebyrank zremrangebyscore zrevrange zrevrangebylex zrevrangebyscore zrevrank
zscan zscore zunion zunionstore""".upper().split()
)
# Redis 7's container commands and their subcommands (COMMAND LIST), plus later releases' few.
_SUBCOMMANDS: dict[str, frozenset[str]] = {}
for _pair in """acl|cat acl|deluser acl|dryrun acl|genpass acl|getuser acl|help acl|list acl|load acl|log acl|save
acl|setuser acl|users acl|whoami client|caching client|getname client|getredir client|help client|id
client|info client|kill client|list client|no-evict client|no-touch client|pause client|reply
client|setinfo client|setname client|tracking client|trackinginfo client|unblock client|unpause
cluster|addslots cluster|addslotsrange cluster|bumpepoch cluster|count-failure-reports
cluster|countkeysinslot cluster|delslots cluster|delslotsrange cluster|failover cluster|flushslots
cluster|forget cluster|getkeysinslot cluster|help cluster|info cluster|keyslot cluster|links
cluster|meet cluster|myid cluster|myshardid cluster|nodes cluster|replicas cluster|replicate
cluster|reset cluster|saveconfig cluster|set-config-epoch cluster|setslot cluster|shards
cluster|slaves cluster|slots command|count command|docs command|getkeys command|getkeysandflags
command|help command|info command|list config|get config|help config|resetstat config|rewrite
config|set function|delete function|dump function|flush function|help function|kill function|list
function|load function|restore function|stats latency|doctor latency|graph latency|help
latency|histogram latency|history latency|latest latency|reset memory|doctor memory|help
memory|malloc-stats memory|purge memory|stats memory|usage module|help module|list module|load
module|loadex module|unload object|encoding object|freq object|help object|idletime object|refcount
pubsub|channels pubsub|help pubsub|numpat pubsub|numsub pubsub|shardchannels pubsub|shardnumsub
script|debug script|exists script|flush script|help script|kill script|load slowlog|get slowlog|help
slowlog|len slowlog|reset xgroup|create xgroup|createconsumer xgroup|delconsumer xgroup|destroy
xgroup|help xgroup|setid xinfo|consumers xinfo|groups xinfo|help xinfo|stream""".upper().split():
    _c, _s = _pair.split("|")
    _SUBCOMMANDS[_c] = _SUBCOMMANDS.get(_c, frozenset()) | {_s}
# The error prefixes Redis itself sends; any other prefix came from a script and may be anything.
ERROR_CODES = frozenset(
    ("ERR", "WRONGTYPE", "NOAUTH", "WRONGPASS", "NOPERM", "NOPROTO", "EXECABORT", "BUSY", "BUSYKEY",
     "BUSYGROUP", "NOSCRIPT", "LOADING", "READONLY", "MASTERDOWN", "MISCONF", "NOREPLICAS", "OOM",
     "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "CROSSSLOT", "NOGROUP", "UNBLOCKED", "NOTBUSY",
     "UNKILLABLE", "NOQUORUM", "INVALIDOBJ", "DENIED")
)  # fmt: skip
_NO_TEXT = frozenset(("AUTH", "HELLO"))
_HANDSHAKE = frozenset(("HELLO", "AUTH", "CLIENT SETNAME", "CLIENT SETINFO"))
# Commands of the common modules (RedisJSON, RediSearch, RedisBloom, RedisTimeSeries, ...): a
# known prefix, so an arbitrary dotted word (which could be anything a client sent) is not a name.
_MODULE_NAME = re.compile(rb"(?i:JSON|FT|BF|CF|CMS|TOPK|TDIGEST|TS|GRAPH|RG|AI|SEARCH)\.[A-Za-z_]{1,32}")
_INT = re.compile(rb"-?[0-9]{1,20}")
_BIG = re.compile(rb"[-+]?[0-9]{1,4096}")
_DOUBLE = re.compile(rb"[-+]?(?:inf|nan|[0-9][0-9.eE+-]{0,400})")
_DB_INDEX = re.compile(rb"[0-9]{1,5}")

_T_SIMPLE, _T_ERROR, _T_INT, _T_BULK, _T_ARRAY = 0x2B, 0x2D, 0x3A, 0x24, 0x2A  # + - : $ *
_T_NULL, _T_DOUBLE, _T_BOOL, _T_BLOBERR, _T_VERB = 0x5F, 0x2C, 0x23, 0x21, 0x3D  # _ , # ! =
_T_BIG, _T_MAP, _T_SET, _T_ATTR, _T_PUSH = 0x28, 0x25, 0x7E, 0x7C, 0x3E  # ( % ~ | >
_T_END, _T_CHUNK = 0x2E, 0x3B  # . ;  (RESP3 streamed aggregates and strings)
_REPLY_STARTS = frozenset(b"+-:$*_,#!=(%~|>")
_AGGS = frozenset(b"*%~|>")
_BLOBS = frozenset(b"$=!")
_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

# Pub/sub confirmation kind -> (subscription class, True when it subscribes).
_CONFIRM: dict[bytes, tuple[str, bool]] = {
    b"subscribe": ("", True), b"psubscribe": ("p", True), b"ssubscribe": ("s", True),
    b"unsubscribe": ("", False), b"punsubscribe": ("p", False), b"sunsubscribe": ("s", False),
}  # fmt: skip
_CONFIRM_OF = {k.decode().upper(): k for k in _CONFIRM}
_PUSH_DATA = frozenset((b"message", b"pmessage", b"smessage"))


class _Msg:
    """One complete RESP message: what the decoder needs of it, no values beyond _TEXT_CAP bytes
    of the first few elements (for classification only; they never reach an Operation)."""

    __slots__ = ("kind", "start_ns", "end_ns", "seg", "pid", "tid", "count", "texts", "ints", "errs",
                 "err", "inline", "all_bulk", "null", "pos")  # fmt: skip

    def __init__(self, seg: Segment, idx: int, pos: int | None) -> None:
        self.kind = -1  # the type byte of the message (after any attributes)
        self.pos = pos  # the stream position of its first byte; None: not known to start there
        self.start_ns = seg.start_ns
        self.end_ns = seg.end_ns
        self.seg = idx  # feed index of the segment the message started in
        self.pid = seg.pid
        self.tid = seg.tid
        self.count = 0  # elements announced by a top-level aggregate
        self.texts: list[bytes | None] = []  # the first _KEEP_CHILDREN elements' text (scalar: its own)
        self.ints: list[int | None] = []
        self.errs: dict[int, str] = {}  # top-level element index -> error prefix
        self.err: str | None = None  # the message is an error reply: its prefix
        self.inline = False
        self.all_bulk = True  # every top-level element is a bulk string (a command's shape)
        self.null = False


class _Frame:
    __slots__ = ("kind", "left", "idx")

    def __init__(self, kind: int, left: int) -> None:
        self.kind = kind
        self.left = left  # elements still expected; -1: streamed, ends at "."
        self.idx = 0


def _error_code(text: bytes) -> str:
    word = text.split(b" ", 1)[0].decode("latin-1")
    return word if word in ERROR_CODES else "_OTHER"


class _Stream:
    """One direction's resumable RESP parser. Never raises on bad input: it reports a loss to the
    decoder and waits for a transfer that starts like a message."""

    def __init__(self, dec: RedisDecoder, egress: bool, from_start: bool) -> None:
        self.dec = dec
        self.egress = egress
        self.synced = True
        self.clean = True  # nothing lost yet in this direction
        # A message was decoded since the last loss, or the stream is seen from its first byte: the
        # position is known. Until then a message's start is where a transfer began, a guess.
        self.trusted = from_start
        self.messages = 0
        self._reset()

    def _reset(self) -> None:
        self.stack: list[_Frame] = []
        self.line = bytearray()
        self.line_seg: Segment | None = None  # the segment the current line began in
        self.line_at = -1  # its offset there (0: it began a transfer, as inline commands must)
        self.body = 0  # bytes of the current blob's content still to come
        self.crlf = 0  # bytes of its terminating CRLF still to come
        self.blob_kind = -1
        self.cap: bytearray | None = None  # captured start of the current blob (when recorded)
        self.cut = False  # part of the current blob fell in a gap: its capture is incomplete
        self.chunked = False  # inside a RESP3 streamed string
        self.msg: _Msg | None = None

    def busy(self) -> bool:
        return bool(self.msg is not None or self.stack or self.line or self.body or self.crlf)

    def _is_cmd(self) -> bool | None:
        c = self.dec._cmd_egress
        return None if c is None else c == self.egress

    def _can_start(self, b: int) -> bool:
        is_cmd = self._is_cmd()
        if is_cmd is None:
            return b in _REPLY_STARTS or b in _LETTERS
        if is_cmd:
            return b == _T_ARRAY or b in _LETTERS
        return b in _REPLY_STARTS

    def feed(self, data: bytes, seg: Segment, idx: int) -> None:
        c = self.dec.counters
        if not data:
            return
        if not self.synced:
            if not self._can_start(data[0]):
                c["bytes_undecoded"] += len(data)
                return
            self.synced = True
            c["resyncs"] += 1
        self._parse(data, seg, idx)

    def gap(self, n: int, seg: Segment) -> None:
        c = self.dec.counters
        if not self.synced:
            c["bytes_undecoded"] += n
            return
        if self.body or self.crlf:
            take = min(n, self.body)
            self.body -= take
            n -= take
            take2 = min(n, self.crlf)
            self.crlf -= take2
            n -= take2
            c["bulk_bytes_skipped"] += take + take2
            if take:
                self.cut = True
            if not self.body and not self.crlf:
                self._blob_done(seg)
        if n > 0:
            c["bytes_undecoded"] += n
            self._lose(seg)

    def close(self) -> None:
        if self.synced and self.busy():
            self.dec.counters["messages_cut"] += 1
        self._reset()

    def _lose(self, seg: Segment) -> None:
        """The position is lost: what was in progress, and whatever the unknown bytes held."""
        self._reset()
        self.synced = False
        self.clean = False
        self.trusted = False
        self.dec._on_loss(self.egress, seg)

    def _protocol_error(self, rest: int, seg: Segment) -> None:
        c = self.dec.counters
        c["protocol_errors"] += 1
        c["bytes_undecoded"] += rest
        self._lose(seg)

    def _parse(self, data: bytes, seg: Segment, idx: int) -> None:
        i = 0
        n = len(data)
        while i < n:
            if self.body:
                take = min(self.body, n - i)
                cap = self.cap
                if cap is not None and len(cap) < _TEXT_CAP:
                    cap += data[i : i + min(take, _TEXT_CAP - len(cap))]
                i += take
                self.body -= take
                continue
            if self.crlf:
                if self.crlf == 2 and i + 2 <= n:
                    if data[i : i + 2] != b"\r\n":
                        self._protocol_error(n - i, seg)
                        return
                    i += 2
                    self.crlf = 0
                    self._blob_done(seg)
                    continue
                while self.crlf and i < n:
                    if data[i] != (0x0D if self.crlf == 2 else 0x0A):
                        self._protocol_error(n - i, seg)
                        return
                    i += 1
                    self.crlf -= 1
                if not self.crlf:
                    self._blob_done(seg)
                continue
            if not self.line:
                self.line_seg, self.line_at = seg, i
            j = data.find(b"\n", i)
            if j < 0:
                if len(self.line) + n - i > _LINE_MAX:
                    self._protocol_error(len(self.line) + n - i, seg)
                    return
                self.line += data[i:]
                return
            if len(self.line) + j - i > _LINE_MAX:
                self._protocol_error(n - i, seg)
                return
            self.line += data[i:j]
            i = j + 1
            line = bytes(self.line)
            self.line.clear()
            if line.endswith(b"\r"):
                line = line[:-1]
            if not self._header(line, seg, idx):
                self._protocol_error(n - i + len(line) + 1, seg)
                return

    def _recording(self) -> bool:
        """The element starting now is kept (a scalar message, or one of the first top-level
        elements of an aggregate; never inside an attribute)."""
        st = self.stack
        if not st:
            return True
        return len(st) == 1 and st[0].kind != _T_ATTR and st[0].idx < _KEEP_CHILDREN

    def _header(self, line: bytes, seg: Segment, idx: int) -> bool:
        if not line:
            # Redis skips empty inline lines between commands; elsewhere an empty line is not RESP.
            return not self.stack and self.msg is None and self._is_cmd() is True
        t = line[0]
        rest = line[1:]
        is_cmd = self._is_cmd()
        if self.chunked:
            if t != _T_CHUNK or _INT.fullmatch(rest) is None:
                return False
            size = int(rest)
            if size < 0 or size > _BULK_MAX:
                return False
            if size == 0:
                self.chunked = False
                self._element(_T_BULK, self._take_cap(), None, None, seg)
            else:
                self.body, self.crlf = size, 2
            return True
        if t not in _REPLY_STARTS:
            if t == _T_END:
                if not self.stack or self.stack[-1].left != -1 or rest:
                    return False
                f = self.stack.pop()
                self._finish_frame(f, seg)
                return True
            return self._inline(line, seg, idx)
        if self.msg is None:
            if is_cmd and t != _T_ARRAY:
                return False
            self.msg = _Msg(seg, idx, self._start_pos(is_cmd))
        elif is_cmd and (len(self.stack) != 1 or t != _T_BULK):
            return False  # commands are flat arrays of bulk strings
        msg = self.msg
        if not self.stack and t != _T_ATTR:
            msg.kind = t
        if t in _AGGS:
            if rest == b"?":
                left = -1
            elif _INT.fullmatch(rest) is None:
                return False
            else:
                left = int(rest)
                if left < -1 or left >= _AGG_MAX:
                    return False
                if t in (_T_MAP, _T_ATTR) and left > 0:
                    left *= 2
            if not self.stack and t != _T_ATTR:
                msg.count = max(left, 0)
            if left == -1 and rest != b"?":
                msg.null = not self.stack
                self._element(_T_NULL, None, None, None, seg)
            elif left == 0:
                if t != _T_ATTR:
                    self._element(t, None, None, None, seg)
            else:
                self.stack.append(_Frame(t, left))
            return True
        if t in _BLOBS:
            if rest == b"?" and t == _T_BULK:
                self.chunked = True
                self.blob_kind = t
                self.cap = bytearray() if self._recording() else None
                return True
            if _INT.fullmatch(rest) is None:
                return False
            size = int(rest)
            if size == -1 and t != _T_VERB:
                if not self.stack:
                    msg.null = True
                self._element(_T_NULL, None, None, None, seg)
                return True
            if size < 0 or size > _BULK_MAX:
                return False
            self.blob_kind = t
            self.cap = bytearray() if (self._recording() or (t == _T_BLOBERR and len(self.stack) <= 1)) else None
            self.cut = False
            self.body, self.crlf = size, 2
            return True
        if t == _T_SIMPLE:
            self._element(t, rest[:_TEXT_CAP], None, None, seg)
        elif t == _T_ERROR:
            self._element(t, None, None, _error_code(rest[:_TEXT_CAP]), seg)
        elif t == _T_INT:
            if _INT.fullmatch(rest) is None:
                return False
            self._element(t, None, int(rest), None, seg)
        elif t == _T_NULL:
            if rest:
                return False
            if not self.stack:
                msg.null = True
            self._element(_T_NULL, None, None, None, seg)
        elif t == _T_BOOL:
            if rest not in (b"t", b"f"):
                return False
            self._element(t, None, None, None, seg)
        elif t == _T_DOUBLE:
            if _DOUBLE.fullmatch(rest) is None:
                return False
            self._element(t, None, None, None, seg)
        elif t == _T_BIG:
            if _BIG.fullmatch(rest) is None:
                return False
            self._element(t, None, None, None, seg)
        return True

    def _inline(self, line: bytes, seg: Segment, idx: int) -> bool:
        # Redis reads a line that does not start with "*" as an inline command (telnet style). Such
        # a client writes whole lines, so one must begin a transfer or follow a decoded message: a
        # line found anywhere else is far more likely the tail of a message picked up mid-stream.
        if self.stack or self.msg is not None or self._is_cmd() is False or not (self.line_at == 0 or self.trusted):
            return False
        words = line.split()
        if not words or len(words[0]) > _TEXT_CAP:
            return False
        name = words[0].upper()
        if name.decode("latin-1") not in _COMMANDS and _MODULE_NAME.fullmatch(words[0]) is None:
            return False
        msg = _Msg(seg, idx, self._start_pos(True))
        msg.kind = _T_ARRAY
        msg.inline = True
        msg.count = len(words)
        msg.texts = [w[:_TEXT_CAP] for w in words[:_KEEP_CHILDREN]]
        self._deliver(msg, seg)
        return True

    def _start_pos(self, is_cmd: bool | None) -> int | None:
        """The stream position of the line that starts a message, from the segment it began in
        (never counted across segments: a gap between them is skipped, not copied)."""
        if is_cmd is False or not self.trusted or self.line_seg is None:
            return None  # a reply (never named), or a start found by a resync (a guess)
        return stream_pos(self.line_seg, self.line_at)

    def _take_cap(self) -> bytes | None:
        cap, self.cap = self.cap, None
        if cap is None or self.cut:
            return None
        return bytes(cap)

    def _blob_done(self, seg: Segment) -> None:
        if self.chunked:
            return  # a chunk of a streamed string: the string ends at ";0"
        text = self._take_cap()
        if self.blob_kind == _T_BLOBERR:
            self._element(_T_BLOBERR, None, None, _error_code(text) if text is not None else "_OTHER", seg)
        else:
            self._element(self.blob_kind, text, None, None, seg)

    def _element(self, t: int, text: bytes | None, ival: int | None, err: str | None, seg: Segment) -> None:
        msg = self.msg
        if msg is None:
            return
        while True:
            st = self.stack
            if not st:
                msg.end_ns = seg.end_ns
                if t in (_T_ERROR, _T_BLOBERR):
                    msg.err = err
                if msg.kind not in _AGGS:
                    msg.texts = [text]
                self._deliver(msg, seg)
                return
            top = st[-1]
            if len(st) == 1 and top.kind != _T_ATTR:
                i = top.idx
                if t != _T_BULK:
                    msg.all_bulk = False
                if i < _KEEP_CHILDREN:
                    msg.texts.append(text)
                    msg.ints.append(ival)
                if err is not None:
                    msg.errs[i] = err
            top.idx += 1
            if top.left > 0:
                top.left -= 1
                if top.left == 0:
                    st.pop()
                    if top.kind == _T_ATTR:
                        return  # an attribute is not an element: the value it annotates follows
                    t, text, ival, err = top.kind, None, None, None
                    continue
            return

    def _finish_frame(self, f: _Frame, seg: Segment) -> None:
        if f.kind != _T_ATTR:
            self._element(f.kind, None, None, None, seg)

    def _deliver(self, msg: _Msg, seg: Segment) -> None:
        self.msg = None
        self.messages += 1
        self.trusted = True
        self.dec._on_message(self.egress, msg, self)


class _Pending:
    """A command waiting for its reply. Holds its name and shape only, never its arguments."""

    __slots__ = ("name", "text", "ns", "start_ns", "end_ns", "seg", "pid", "tid", "sub", "expect", "got",
                 "queued", "select", "hello3", "lost", "noreply", "pos")  # fmt: skip

    def __init__(self) -> None:
        self.name = ""
        self.text: str | None = None
        self.ns: str | None = None
        self.start_ns = 0
        self.end_ns = 0
        self.seg = 0
        self.pid = 0
        self.tid = 0
        self.sub: bytes | None = None  # a pub/sub command: the confirmation kind it awaits
        self.expect: int | None = 1  # replies it takes (None: one per current subscription)
        self.got = 0
        self.queued = False  # sent inside MULTI: answered QUEUED, executed at EXEC
        self.select: str | None = None  # SELECT's index
        self.hello3 = False
        self.lost = False  # a marker: commands lost here
        self.noreply = False  # CLIENT REPLY OFF/SKIP: the server sends nothing
        self.pos: int | None = None  # the command's first byte in the command stream (Operation.req_pos)


class RedisDecoder:
    """A connection's Redis decoder (correlator.segments.StreamDecoder). `client`: the traced
    process is the connection's client end, when the caller knows it; `from_start`: the
    connection is seen from its first byte (its database is 0 until a SELECT)."""

    def __init__(self, client: bool | None = None, from_start: bool = False) -> None:
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._cmd_egress: bool | None = client
        self._streams = {True: _Stream(self, True, from_start), False: _Stream(self, False, from_start)}
        self._pending: deque[_Pending] = deque()
        self._db: str | None = "0" if from_start else None  # the index the next command runs in
        self._resp3 = False
        self._in_multi = False  # MULTI sent, EXEC/DISCARD not yet
        self._txn: list[_Pending] = []  # commands answered QUEUED, awaiting EXEC's reply
        self._nsubs = {"": 0, "p": 0, "s": 0}
        self._sub_total = 0
        self._monitor = False
        self._reply_off = False
        self._skip_next = False
        self._seg = 0
        self._replies_seen = False
        self._absorb = 0  # replies still due to evicted commands
        self._out: list[Operation] = []

    # -- StreamDecoder ---------------------------------------------------------------------

    def feed(self, seg: Segment) -> list[Operation]:
        self._out = out = []
        self._seg += 1
        try:
            st = self._streams[seg.egress]
            st.feed(seg.data, seg, self._seg)
            if seg.length > len(seg.data):
                st.gap(seg.length - len(seg.data), seg)
        except Exception:  # noqa: BLE001 - a decoder bug must cost one connection's position, not the agent
            self._recover(seg)
        self._out = []
        return out

    def close(self, now_ns: int) -> list[Operation]:
        self._out = out = []
        try:
            for st in self._streams.values():
                st.close()
            for p in self._pending:
                if p.lost:
                    continue
                self.counters["commands_unanswered"] += 1
                out.append(self._op(p, max(now_ns, p.end_ns), ERR_CLOSED, "connection closed before the reply"))
            for p in self._txn:
                self.counters["commands_unanswered"] += 1
                out.append(self._op(p, max(now_ns, p.end_ns), ERR_CLOSED, "connection closed before EXEC's reply"))
        except Exception:  # noqa: BLE001 - see feed
            self.counters["decoder_errors"] += 1
        self._pending.clear()
        self._txn = []
        self._out = []
        return out

    def _recover(self, seg: Segment) -> None:
        self.counters["decoder_errors"] += 1
        self.counters["commands_evicted"] += sum(1 for p in self._pending if not p.lost) + len(self._txn)
        for st in self._streams.values():
            st._reset()
            st.synced = False
            st.trusted = False
        self._pending.clear()
        self._txn = []

    # -- messages --------------------------------------------------------------------------

    def _on_message(self, egress: bool, msg: _Msg, st: _Stream) -> None:
        if self._cmd_egress is None:
            if self._command_shaped(msg):
                self._cmd_egress = egress
            elif (not st.clean or msg.kind == _T_BULK
                  or (msg.kind == _T_ARRAY and msg.all_bulk and msg.count and not msg.null)):  # fmt: skip
                # Weak evidence decides nothing: a message found by a resync (it may be a tail that
                # looks like a reply), a lone bulk string (perhaps a command's tail), an array of
                # bulk strings not naming a known command (cut, or newer than this table). With no
                # command known it is counted as a reply without one.
                self.counters["replies_unpaired"] += 1
                return
            else:
                self._cmd_egress = not egress
        if egress == self._cmd_egress:
            self._on_command(msg, st)
        else:
            self._replies_seen = True
            self._on_reply(msg)

    @staticmethod
    def _command_shaped(msg: _Msg) -> bool:
        if msg.inline:
            return True
        if msg.kind != _T_ARRAY or not msg.all_bulk or msg.count == 0 or not msg.texts:
            return False
        name = msg.texts[0]
        return name is not None and (
            name.upper().decode("latin-1") in _COMMANDS or _MODULE_NAME.fullmatch(name) is not None
        )

    def _on_loss(self, egress: bool, seg: Segment) -> None:
        if self._cmd_egress is None:
            return
        if egress == self._cmd_egress:
            self.counters["commands_lost"] += 1
            if not (self._pending and self._pending[-1].lost):
                m = _Pending()
                m.lost = True
                m.seg = self._seg
                self._pending.append(m)
            return
        # The reply bytes were not copied: commands sent before this transfer were answered in it
        # (or in what follows, undecodable until a resync); end them here rather than mispair.
        self._absorb = 0
        kept: deque[_Pending] = deque()
        for p in self._pending:
            if p.lost or p.seg >= self._seg:
                if not p.lost:
                    kept.append(p)
                continue
            self.counters["replies_lost"] += 1
            self._out.append(self._op(p, seg.end_ns, None, None))
        self._pending = kept

    def _names(self, msg: _Msg) -> tuple[str, int]:
        """(operation name, arguments after it)."""
        texts = msg.texts
        raw = texts[0] if texts else None
        if raw is None:
            self.counters["unknown_commands"] += 1
            return "_OTHER", max(msg.count - 1, 0)
        cmd = raw.upper().decode("latin-1")
        if cmd not in _COMMANDS:
            if _MODULE_NAME.fullmatch(raw) is None:
                self.counters["unknown_commands"] += 1
                return "_OTHER", max(msg.count - 1, 0)
            return cmd, max(msg.count - 1, 0)
        subs = _SUBCOMMANDS.get(cmd)
        if subs is not None and len(texts) > 1 and texts[1] is not None:
            sub = texts[1].upper().decode("latin-1")
            if sub in subs:
                return cmd + " " + sub, max(msg.count - 2, 0)
        return cmd, max(msg.count - 1, 0)

    def _on_command(self, msg: _Msg, st: _Stream) -> None:
        c = self.counters
        c["commands"] += 1
        name, nargs = self._names(msg)
        p = _Pending()
        p.name = name
        if name not in _NO_TEXT:
            shown = min(nargs, MAX_PLACEHOLDERS)
            p.text = name + " ?" * shown + (" ..." if nargs > shown else "")
        p.start_ns, p.end_ns, p.seg, p.pid, p.tid, p.pos = msg.start_ns, msg.end_ns, msg.seg, msg.pid, msg.tid, msg.pos
        first = st.messages == 1 and st.clean and not self._replies_seen
        if first and self._db is None and name in _HANDSHAKE:
            self._db = "0"
        p.ns = self._db
        arg1 = msg.texts[1] if len(msg.texts) > 1 else None
        if name == "SELECT" and arg1 is not None and _DB_INDEX.fullmatch(arg1):
            p.select = str(int(arg1))
            if not self._in_multi:
                self._db = p.select
        elif name == "HELLO" and arg1 == b"3":
            p.hello3 = True
        elif name in _CONFIRM_OF:
            p.sub = _CONFIRM_OF[name]
            p.expect = nargs if nargs else (None if not _CONFIRM[p.sub][1] else 1)
        elif name == "MULTI":
            self._in_multi = True
        elif name in ("EXEC", "DISCARD", "RESET"):
            self._in_multi = False
        elif self._in_multi and name not in ("WATCH", "QUIT"):
            p.queued = True
        if name == "CLIENT REPLY" and arg1 is not None:
            mode = msg.texts[2].upper() if len(msg.texts) > 2 and msg.texts[2] is not None else b""
            if mode == b"OFF":
                self._reply_off = True
                p.noreply = True
            elif mode == b"SKIP":
                p.noreply = True
                self._skip_next = True
                self._out.append(self._op(p, p.end_ns, None, None))
                return
            elif mode == b"ON":
                self._reply_off = False
        if self._reply_off or self._skip_next or p.noreply:
            self._skip_next = False
            self._out.append(self._op(p, p.end_ns, None, None))
            return
        if len(self._pending) >= MAX_PENDING:
            old = self._pending.popleft()
            if not old.lost:
                c["commands_evicted"] += 1
                self._absorb += 1  # its reply is still to come: it must not pair with the next
        self._pending.append(p)

    def _head(self, msg: _Msg) -> _Pending | None:
        """The command a reply answers, after markers of lost commands whose replies these are."""
        q = self._pending
        while q and q[0].lost:
            nxt = next((p for p in q if not p.lost), None)
            if nxt is None or msg.seg < nxt.seg:
                return None  # sent before the next decoded command: a lost command's reply
            q.popleft()
        return q[0] if q else None

    def _on_reply(self, msg: _Msg) -> None:
        c = self.counters
        first = msg.texts[0] if msg.texts else None
        kind = first.lower() if first is not None and msg.kind in (_T_ARRAY, _T_PUSH) else None
        confirm = kind in _CONFIRM and msg.count == 3 and len(msg.ints) > 2 and msg.ints[2] is not None
        if msg.kind == _T_PUSH and not confirm:
            c["pushes"] += 1
            return
        if (not self._resp3 and msg.kind == _T_ARRAY and kind in _PUSH_DATA and msg.count in (3, 4)
                and (not self._pending or any(self._nsubs.values()) or any(p.sub for p in self._pending))):  # fmt: skip
            c["pushes"] += 1
            return
        if self._monitor and msg.kind == _T_SIMPLE and first is not None and first[:1].isdigit():
            c["pushes"] += 1
            return
        if self._absorb:
            self._absorb -= 1
            c["replies_unpaired"] += 1
            return
        p = self._head(msg)
        while p is not None and p.sub is not None and p.got and not (confirm and p.sub == kind):
            # A pub/sub command that took fewer confirmations than announced is over once
            # something else arrives (subscriptions the decoder did not see, picked up mid-stream).
            self._pending.popleft()
            self._out.append(self._op(p, p.end_ns, None, None))
            p = self._head(msg)
        if confirm:
            assert kind is not None
            if p is None or p.sub != kind:
                c["pushes"] += 1  # the server's own (un)subscribe notice, e.g. a slot moved
                self._track_subs(kind, msg)
                return
            if p.expect is None:
                cls = _CONFIRM[kind][0]
                p.expect = max(1, self._nsubs[cls])
            self._track_subs(kind, msg)
            p.got += 1
            c["replies"] += 1
            if p.got < p.expect and not (msg.ints[2] == 0 and not _CONFIRM[kind][1]):
                p.end_ns = msg.end_ns
                return
            self._pending.popleft()
            self._out.append(self._op(p, msg.end_ns, None, None))
            return
        if p is None:
            c["replies_unpaired"] += 1
            return
        self._pending.popleft()
        c["replies"] += 1
        self._complete(p, msg, msg.end_ns)

    def _track_subs(self, kind: bytes, msg: _Msg) -> None:
        total = msg.ints[2] if len(msg.ints) > 2 else None
        if total is None:
            return
        cls, adds = _CONFIRM[kind]
        if cls == "s":
            self._nsubs["s"] = max(total, 0)
            return
        if adds and total > self._sub_total:
            self._nsubs[cls] += 1
        elif not adds and total < self._sub_total:
            self._nsubs[cls] = max(0, self._nsubs[cls] - 1)
        self._sub_total = max(total, 0)
        if total == 0:
            self._nsubs[""] = self._nsubs["p"] = 0

    def _complete(self, p: _Pending, msg: _Msg, end_ns: int) -> None:
        err = msg.err
        name = p.name
        if p.queued and err is None and msg.kind == _T_SIMPLE and msg.texts[:1] == [b"QUEUED"]:
            p.end_ns = end_ns
            self._txn.append(p)
            return
        if name in ("EXEC", "DISCARD", "RESET"):
            # The queued commands ran (or not) at this reply; they go out before it, in order.
            txn, self._txn = self._txn, []
            for i, q in enumerate(txn):
                qerr = msg.errs.get(i) if name == "EXEC" and msg.kind == _T_ARRAY else None
                if name == "EXEC" and err is not None:
                    qerr = err  # EXECABORT: nothing ran
                if qerr is not None:
                    self._out.append(self._op(q, end_ns, qerr, f"Redis error reply {qerr}"))
                else:
                    self._out.append(self._op(q, end_ns, None, None))
                    if name == "EXEC" and q.select is not None:
                        self._db = q.select
        if err is not None:
            if name == "SELECT" and p.select is not None and self._db == p.select:
                self._db = p.ns
            self._out.append(self._op(p, end_ns, err, f"Redis error reply {err}"))
        else:
            self._out.append(self._op(p, end_ns, None, None))
            if name == "SELECT" and p.select is not None:
                self._db = p.select
            elif p.hello3:
                self._resp3 = True
            elif name == "MONITOR":
                self._monitor = True
            elif name == "RESET":
                self._reset_state()

    def _reset_state(self) -> None:
        self._db = "0"
        self._resp3 = False
        self._in_multi = False
        self._nsubs = {"": 0, "p": 0, "s": 0}
        self._sub_total = 0
        self._monitor = False
        self._reply_off = False

    def _op(self, p: _Pending, end_ns: int, err: str | None, message: str | None) -> Operation:
        attrs: dict[str, AttrValue] = {"db.system.name": "redis", "db.operation.name": p.name}
        if p.text is not None:
            attrs["db.query.text"] = p.text
        if p.ns is not None:
            attrs["db.namespace"] = p.ns
        if err is not None:
            attrs["db.response.status_code"] = err
        return Operation(
            protocol=PROTOCOL, client=bool(self._cmd_egress), start_ns=p.start_ns, end_ns=max(end_ns, p.end_ns),
            name=p.name, attributes=attrs, error=err, error_message=message, pid=p.pid, tid=p.tid, req_pos=p.pos,
        )
