"""HTTP/2 and gRPC decoding (correlator/protocols/http2.py) on real traffic recorded by
tests/support/relay.py: a grpcio server and client over h2c, curl --http2-prior-knowledge against
nginx, Go's net/http client and server (unencrypted HTTP/2, concurrent streams), curl's
`Upgrade: h2c` against an h2 (hyper-h2) server; both ends' views, cut to 512 bytes per transfer
like the kernel's copy. Plus frames from h2 for GOAWAY, CONTINUATION and push, bad input, and
property tests. Each operation's req_pos: the exact stream position of its stream's first HEADERS
frame, from either end, however the bytes were cut."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from correlator.protocols.http2 import PREFACE, Http2Decoder
from correlator.segments import Operation, Segment
from tests.support import h2c_upgrade, nginx_h2
from tests.support.agent import free_port
from tests.support.relay import Relay, relaying
from tests.support.segment_cuts import M32, merge_runs, recut, true_positions, with_pos

SECRET = "sekrit-42"
SERVICE = "kspan.test.Echo"


def decode(segs: list[Segment]) -> tuple[list[Operation], dict[str, int]]:
    d = Http2Decoder()
    ops: list[Operation] = []
    for s in segs:
        ops += d.feed(s)
    ops += d.close(segs[-1].end_ns if segs else 0)
    return ops, d.counters


def assert_no_secret(ops: list[Operation]) -> None:
    for op in ops:
        text = repr((op.name, op.attributes, op.error, op.error_message))
        assert SECRET not in text, text


REQ_BASE = 0xFFFFFF80  # the client's first sequence number: positions wrap past 2**32 early on
RESP_BASE = 0x2000
ISN = (REQ_BASE, RESP_BASE)


def request_positions(stream: bytes, base: int = REQ_BASE) -> list[int]:
    """Where each stream's request starts in the client's whole byte stream, found by walking its
    frames apart from the decoder: a client stream's first HEADERS frame (stream 1 after an
    `Upgrade: h2c`: the upgrade request, which carries no body in these tests)."""
    seen: set[int] = set()
    out: list[int] = []
    i = 0
    if not stream.startswith(PREFACE):
        seen.add(1)
        out.append(base)
        i = stream.index(b"\r\n\r\n") + 4
    assert stream.startswith(PREFACE, i)
    i += len(PREFACE)
    while i + 9 <= len(stream):
        sid = int.from_bytes(stream[i + 5 : i + 9], "big") & 0x7FFFFFFF
        if stream[i + 3] == 1 and sid % 2 and sid not in seen:
            seen.add(sid)
            out.append((base + i) & M32)
        i += 9 + int.from_bytes(stream[i : i + 3], "big")
    return out


def assert_request_positions(r: Relay) -> None:
    """Every recorded connection from either end, cut to 512 bytes and whole: each operation's
    req_pos is where its stream's request starts, no two alike; where the request direction was
    never lost (always in whole copies) every operation has one and every stream is named."""
    for idx, segs in r.client_segments(full=True).items():
        truth = set(request_positions(b"".join(s.data for s in segs if s.egress)))
        assert truth
        for client_view in (True, False):
            for full in (False, True):
                view = (r.client_segments if client_view else r.server_segments)(full)[idx]
                ops, counters = decode(with_pos(view, client_view, ISN))
                got = [o.req_pos for o in ops if o.req_pos is not None]
                where = (idx, client_view, full, got, truth, counters)
                assert len(set(got)) == len(got) and set(got) <= truth, where
                if full or not {"sync_lost", "midstream_pickups"} & counters.keys():
                    assert len(got) == len(ops) and set(got) == truth, where


def views(r: Relay, full: bool = False) -> dict[str, list[list[Segment]]]:
    time.sleep(0.2)  # the relay's last chunks
    return {
        "client": [s for _, s in sorted(r.client_segments(full).items())],
        "server": [s for _, s in sorted(r.server_segments(full).items())],
    }


# -- gRPC -------------------------------------------------------------------------------------

def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"missing":
        context.abort(grpc.StatusCode.NOT_FOUND, f"no record for {SECRET}")
    return b"pong:" + request


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    count, _, size = request.partition(b":")  # b"count[:message size]"
    n = int(count or b"3")
    for i in range(n):
        if i:
            time.sleep(0.02)  # one write per message, mostly one read too (see the status check)
        yield bytes([65 + i % 26]) * int(size or b"3000")


@pytest.fixture(scope="module")
def grpc_port() -> Iterator[int]:
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    })  # fmt: skip
    server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    assert port, "the grpcio server could not bind a loopback port"
    server.start()
    yield port
    server.stop(0)


METADATA = (("authorization", f"Bearer {SECRET}"), ("x-api-key", SECRET), ("cookie", f"sid={SECRET}"))


def _channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])


def test_grpc_unary_streaming_and_errors_both_views(grpc_port: int) -> None:
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            stream = ch.unary_stream(f"/{SERVICE}/Stream")
            nope = ch.unary_unary(f"/{SERVICE}/Nope")
            assert unary(b"ping", metadata=METADATA, timeout=10) == b"pong:ping"
            assert len(list(stream(b"3", metadata=METADATA, timeout=10))) == 3
            with pytest.raises(grpc.RpcError) as e1:
                unary(b"missing", metadata=METADATA, timeout=10)
            assert e1.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as e2:
                nope(b"x", metadata=METADATA, timeout=10)
            assert e2.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert unary(b"again", metadata=METADATA, timeout=10) == b"pong:again"
        v = views(r)
        assert_request_positions(r)
    for view, conns in v.items():
        assert len(conns) == 1
        ops, counters = decode(conns[0])
        # In call order: an operation is emitted when its end is seen, and where a read gathered
        # two messages over a frame header (below) the streaming call's end is found only at
        # close, after the later calls; the reads' sizes depend on the machine's load.
        ops.sort(key=lambda op: op.start_ns)
        assert [op.name for op in ops] == [f"{SERVICE}/Unary", f"{SERVICE}/Stream", f"{SERVICE}/Unary",
                                           f"{SERVICE}/Nope", f"{SERVICE}/Unary"], (view, ops)  # fmt: skip
        assert all(op.protocol == "grpc" and op.client == (view == "client") for op in ops)
        # A read that gathered two of the 3000-byte messages has a gap over a frame header: that
        # direction's framing and HPACK table are lost until a verified boundary, and a trailer
        # decoded after it may refer to an entry the table lost. Such a status is missing, never
        # wrong, and each one is counted.
        statuses = [op.attributes.get("rpc.grpc.status_code") for op in ops]
        want = [0, 0, 5, 12, 0]
        for got, exp in zip(statuses, want, strict=True):
            assert got in (exp, None)
        missing = statuses.count(None)
        assert missing == counters.get("grpc_status_unknown", 0), (view, statuses, counters)
        if missing:
            assert counters["sync_lost"] >= 1 and counters["hpack_table_lost"] >= 1
        errors = [None, None, "NOT_FOUND", "UNIMPLEMENTED", None]
        want_errors = [e if got is not None else None for e, got in zip(errors, statuses, strict=True)]
        assert [op.error for op in ops] == want_errors
        for op in ops:
            assert op.attributes["rpc.system"] == "grpc" and op.attributes["rpc.service"] == SERVICE
            assert op.start_ns <= op.end_ns
        assert ops[1].attributes["rpc.method"] == "Stream"
        assert ops[0].end_ns <= ops[1].start_ns  # sequential calls, in order
        assert_no_secret(ops)
        # The 3000-byte messages were cut at 512 bytes and stepped over by their frames' lengths.
        assert counters.get("gap_bytes_stepped", 0) > 3 * 2000, counters
        for bad in ("hpack_errors", "decoder_errors", "requests_undecoded", "responses_without_request"):
            assert bad not in counters, (view, counters)
        if "sync_lost" not in counters:
            assert "bytes_unsynced" not in counters and "header_fields_unknown" not in counters


def test_grpc_cancel_is_rst_stream(grpc_port: int) -> None:
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            # Small messages: no gap in this test, so every status is decodable.
            it = ch.unary_stream(f"/{SERVICE}/Stream")(b"1000:100", timeout=10)
            next(it)
            it.cancel()
            assert ch.unary_unary(f"/{SERVICE}/Unary")(b"after", timeout=10) == b"pong:after"
        v = views(r)
        assert_request_positions(r)
    for view, conns in v.items():
        ops, counters = decode(conns[0])
        assert [op.name for op in ops] == [f"{SERVICE}/Stream", f"{SERVICE}/Unary"], (view, ops, counters)
        assert ops[0].error == "CANCEL" and "RST_STREAM CANCEL from the client" == ops[0].error_message
        assert "rpc.grpc.status_code" not in ops[0].attributes
        assert ops[1].error is None and ops[1].attributes["rpc.grpc.status_code"] == 0


def test_grpc_concurrent_calls_are_all_accounted_for(grpc_port: int) -> None:
    # Concurrent calls interleave their streams; a transfer that gathered several frames beyond
    # the 512-byte copy may lose some, but each call is an operation or a counted loss.
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"warm", timeout=10) == b"pong:warm"
            futures = [unary.future(b"c%d" % i, metadata=METADATA, timeout=10) for i in range(8)]
            assert sorted(f.result() for f in futures) == sorted(b"pong:c%d" % i for i in range(8))
        v = views(r)
        assert_request_positions(r)
    for view, conns in v.items():
        ops, counters = decode(conns[0])
        lost = counters.get("responses_without_request", 0) + counters.get("headers_unknown_role", 0)
        # (A call whose request and response were both in lost bytes is in bytes_unsynced.)
        assert len(ops) + lost == 9 or (len(ops) + lost < 9 and counters["bytes_unsynced"] > 0), (view, counters)
        assert ops[0].name == f"{SERVICE}/Unary" and ops[0].attributes["rpc.grpc.status_code"] == 0
        for op in ops:
            assert op.error is None and op.client == (view == "client")
            assert op.attributes.get("rpc.grpc.status_code") in (0, None)
        assert_no_secret(ops)
        assert "decoder_errors" not in counters


def test_grpc_big_metadata_cut_short_loses_the_table_counted(grpc_port: int) -> None:
    # A 2 KB metadata value makes the request's HEADERS frame longer than the kernel's 512-byte
    # copy: that block's fields and its table insertions are lost. Later blocks decode what is
    # certain (static and literal fields), and nothing of the values leaks.
    big = (("x-blob", SECRET * 250),)
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"one", timeout=10) == b"pong:one"
            assert unary(b"two", metadata=big, timeout=10) == b"pong:two"
            with pytest.raises(grpc.RpcError):
                ch.unary_unary(f"/{SERVICE}/Other")(b"three", timeout=10)
        v = views(r)
        assert_request_positions(r)
        full = views(r, full=True)
    client_ops, counters = decode(v["client"][0])
    assert len(client_ops) == 3
    assert client_ops[0].name == f"{SERVICE}/Unary" and client_ops[0].error is None
    # The cut request: an operation with what is known, its response's (gRPC, status 0).
    assert client_ops[1].name == "grpc" and client_ops[1].error is None
    assert client_ops[1].attributes == {"rpc.system": "grpc", "rpc.grpc.status_code": 0}
    assert counters["header_blocks_truncated"] == 1 and counters["hpack_table_lost"] == 1
    assert counters["requests_undecoded"] == 1
    # The third call's new :path is a literal: decoded; its indexed fields are counted unknown.
    assert "/Other" in repr(client_ops[2].attributes) or client_ops[2].name.endswith("/Other")
    assert counters["header_fields_unknown"] > 0
    assert_no_secret(client_ops)
    # The same traffic uncut decodes completely.
    ops_full, counters_full = decode(full["client"][0])
    assert [op.name for op in ops_full] == [f"{SERVICE}/Unary", f"{SERVICE}/Unary", f"{SERVICE}/Other"]
    assert "header_blocks_truncated" not in counters_full
    assert_no_secret(ops_full)


def test_grpc_connection_picked_up_mid_stream(grpc_port: int) -> None:
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"before", timeout=10) == b"pong:before"
            time.sleep(0.2)
            mark = len(r.chunks)
            assert len(list(ch.unary_stream(f"/{SERVICE}/Stream")(b"2:100", timeout=10))) == 2
            assert unary(b"after", timeout=10) == b"pong:after"
        v = views(r)
    truth = request_positions(b"".join(s.data for s in r.client_segments(full=True)[0] if s.egress))
    for view, conns in v.items():
        segs = conns[0]
        ops, counters = decode(segs[mark:])
        # Each later request's HEADERS carries :method: it opens its stream, placed exactly.
        picked, _ = decode(with_pos(segs, view == "client", ISN)[mark:])
        assert [o.req_pos for o in picked] == truth[-2:]  # sequential calls, in order
        assert counters["midstream_pickups"] == 1
        assert counters.get("resyncs", 0) >= 1
        assert not segs[mark].data.startswith(PREFACE[:8])
        # Both later calls come out; the Stream call's :path was a new literal, so it is known.
        assert len(ops) == 2, (view, ops, counters)
        # The Stream call's :path was a new literal: known. Its content-type and :authority were
        # indexed before the pick-up, so it is not known to be gRPC: an HTTP POST, on the server
        # with its url.path; nothing guessed.
        assert all(op.name == "POST" and op.attributes["http.response.status_code"] == 200 for op in ops), ops
        if view == "server":
            assert [op.attributes.get("url.path") for op in ops].count(f"/{SERVICE}/Stream") == 1
        assert all(op.client == (view == "client") for op in ops)
        assert counters.get("header_fields_unknown", 0) > 0  # indexed before the pick-up: counted
        assert "decoder_errors" not in counters


# -- curl against nginx (h2c with prior knowledge) --------------------------------------------



@pytest.fixture(scope="module")
def nginx_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx), "nginx is not installed (scripts/bootstrap.sh installs nginx-light)"
    d = tmp_path_factory.mktemp("nginx_h2")
    port = free_port()
    conf = nginx_h2.write_conf(d, port)
    (d / "www" / "big.bin").write_bytes(bytes(range(256)) * 800)  # 200 KB: many DATA frames
    with nginx_h2.running(d, conf, [port]):
        yield port


def _curl(*args: str) -> str:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
         "-H", f"Authorization: Bearer {SECRET}", "-H", f"Cookie: s={SECRET}", "-H", f"X-Secret: {SECRET}",
         *args],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    return out.stdout


def test_curl_prior_knowledge_against_nginx(nginx_port: int) -> None:
    with relaying(("127.0.0.1", nginx_port)) as r:
        base = f"http://127.0.0.1:{r.port}"
        # This curl (7.88) cannot reuse a prior-knowledge connection: one connection per request.
        codes = [
            _curl("--http2-prior-knowledge", f"{base}/"),
            _curl("--http2-prior-knowledge", f"{base}/missing?token={SECRET}&page=2"),
            _curl("--http2-prior-knowledge", "-d", f"pw={SECRET}", f"{base}/"),
            _curl("--http2-prior-knowledge", f"{base}/boom"),
            _curl("--http2-prior-knowledge", f"{base}/big.bin"),
        ]
        assert codes == ["200", "404", "200", "503", "200"]
        v = views(r)
        assert_request_positions(r)
    expect = [("GET", "/", 200), ("GET", "/missing", 404), ("POST", "/", 200), ("GET", "/boom", 503),
              ("GET", "/big.bin", 200)]  # fmt: skip
    for view, conns in v.items():
        assert len(conns) == 5
        for segs, (method, path, status) in zip(conns, expect, strict=True):
            ops, counters = decode(segs)
            assert len(ops) == 1, (view, path, ops, counters)
            op = ops[0]
            a = op.attributes
            assert op.protocol == "http2" and op.name == method and op.client == (view == "client")
            assert a["http.request.method"] == method and a["http.response.status_code"] == status
            assert a["network.protocol.version"] == "2" and a["user_agent.original"].startswith("curl/")
            if view == "server":
                assert a["url.path"] == path and a["url.scheme"] == "http"
                assert op.error == ("503" if status == 503 else None)
            else:
                assert a["url.full"].startswith(f"http://127.0.0.1:{r.port}{path}")
                assert op.error == (str(status) if status >= 400 else None)
            if path == "/missing":
                assert a["url.query" if view == "server" else "url.full"].endswith("token=REDACTED&page=2")
            assert_no_secret(ops)
            assert "decoder_errors" not in counters and "hpack_errors" not in counters
    # The 200 KB body: its DATA frames were stepped over (or, where a gap swallowed a frame
    # header, counted as unsynced bytes); the operation is there either way.
    _, counters = decode(v["client"][4])
    assert counters.get("gap_bytes_stepped", 0) + counters.get("bytes_unsynced", 0) > 150_000, counters


# -- Go's net/http on both ends (unencrypted HTTP/2, prior knowledge) ------------------------

GO_H2C = """package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
)

func protocols() *http.Protocols {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &p
}

func main() {
	if os.Args[1] == "serve" {
		ln, err := net.Listen("tcp", "127.0.0.1:"+os.Args[2])
		if err != nil {
			panic(err)
		}
		fmt.Println("listening")
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case r.URL.Path == "/fail":
				w.WriteHeader(500)
			case r.URL.Path == "/big":
				w.Write([]byte(strings.Repeat("0123456789", 10000)))
			default:
				w.Header().Set("X-Echo", r.Header.Get("Authorization"))
				io.WriteString(w, "hello\\n")
			}
		})
		(&http.Server{Handler: h, Protocols: protocols()}).Serve(ln)
		return
	}
	c := &http.Client{Transport: &http.Transport{Protocols: protocols()}}
	get := func(u string) string {
		req, _ := http.NewRequest("GET", u, nil)
		req.Header.Set("Authorization", "Bearer SECRET")
		req.Header.Set("X-Custom", "SECRET")
		resp, err := c.Do(req)
		if err != nil {
			return "error"
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return fmt.Sprint(resp.StatusCode, " ", resp.Proto)
	}
	fmt.Println(get(os.Args[2] + "/warm"))
	out := make([]string, len(os.Args)-3)
	var wg sync.WaitGroup
	for i, p := range os.Args[3:] {
		wg.Add(1)
		go func(i int, p string) { defer wg.Done(); out[i] = get(os.Args[2] + p) }(i, p)
	}
	wg.Wait()
	fmt.Println(strings.Join(out, ","))
}
"""


@pytest.fixture(scope="module")
def go_h2c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.agent import go_binary

    d = tmp_path_factory.mktemp("go_h2c")
    (d / "main.go").write_text(GO_H2C.replace("SECRET", SECRET))
    return go_binary(d, d / "h2c")


def test_go_client_and_server_concurrent_streams(go_h2c: Path) -> None:
    from tests.support.agent import service

    port = free_port()
    with service([str(go_h2c), "serve", str(port)]), relaying(("127.0.0.1", port)) as r:
        paths = ["/a", "/fail", "/b", "/big", "/c"]
        out = subprocess.run([str(go_h2c), "get", f"http://127.0.0.1:{r.port}", *paths],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        assert out.stdout.split("\n")[:2] == ["200 HTTP/2.0", "200 HTTP/2.0,500 HTTP/2.0,200 HTTP/2.0,200 HTTP/2.0,"
                                                "200 HTTP/2.0"], out  # fmt: skip
        uncut, cut = views(r, full=True), views(r)
        assert_request_positions(r)
    want = {"/warm": 200, "/a": 200, "/fail": 500, "/b": 200, "/big": 200, "/c": 200}
    # Whole copies decode exactly. Copies cut at 512 bytes depend on how the transfers merged (a
    # status sent as an index into a header table the cut lost is left out and counted), so for
    # them only what must always hold: every stream, and never a wrong status.
    for exact, v in ((True, uncut), (False, cut)):
        for view, conns in v.items():
            assert len(conns) == 1, "one connection, six streams"
            ops, counters = decode(conns[0])
            assert len(ops) == 6, (view, ops, counters)
            by_path: dict[str, Operation] = {}
            for op in ops:
                a = op.attributes
                assert op.name == "GET"
                if exact:
                    assert a["user_agent.original"].startswith("Go-http-client/")
                key = a.get("url.path") if view == "server" else str(a.get("url.full", "")).rsplit("/", 1)[-1]
                if key is not None:
                    by_path["/" + str(key).lstrip("/")] = op
            if exact:
                assert sorted(by_path) == sorted(want)
            for path, op in by_path.items():
                status = op.attributes.get("http.response.status_code")
                assert status == want[path] if exact else status in (None, want[path]), (view, path, status)
            if exact:
                assert by_path["/fail"].error == "500"
            assert_no_secret(ops)
            assert "decoder_errors" not in counters and "hpack_errors" not in counters


# -- curl's Upgrade: h2c against an h2 (hyper-h2) server --------------------------------------

def test_curl_upgrade_h2c() -> None:
    with h2c_upgrade.serving(SECRET) as port, relaying(("127.0.0.1", port)) as r:
        assert _curl("--http2", f"http://127.0.0.1:{r.port}/up?token={SECRET}") == "200"
        v = views(r)
        assert_request_positions(r)
    for view, conns in v.items():
        assert conns[0][0].data.startswith(b"GET /up?")  # HTTP/1.1 first: the upgrade request
        ops, counters = decode(conns[0])
        assert len(ops) == 1, (view, ops, counters)
        op = ops[0]
        # Stream 1 is the upgrade request itself; its response came as HTTP/2 HEADERS.
        assert op.name == "GET" and op.attributes["http.response.status_code"] == 200
        assert op.client == (view == "client") and op.error is None
        if view == "server":
            assert op.attributes["url.path"] == "/up" and op.attributes["url.query"] == "token=REDACTED"
        assert_no_secret(ops)
        assert counters.get("frames", 0) >= 3 and "bytes_unsynced" not in counters


# -- frames built with an independent HTTP/2 implementation (h2) ------------------------------

def _seg(data: bytes, egress: bool, t: int, length: int | None = None, cut: bool = True) -> Segment:
    n = len(data) if length is None else length
    return Segment(conn_id=1, pid=7, tid=7, egress=egress, start_ns=t, end_ns=t, length=n,
                   data=data[:512] if cut else data)  # fmt: skip


def _client_server() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    return c, s


def _pump(src: h2.connection.H2Connection, dst: h2.connection.H2Connection, egress: bool,
          segs: list[Segment]) -> list[h2.events.Event]:  # fmt: skip
    data = src.data_to_send()
    if not data:
        return []
    segs.append(_seg(data, egress, len(segs) + 1, cut=False))  # uncut: as if the copy were unbounded
    return dst.receive_data(data)


REQ = [(":method", "GET"), (":scheme", "https"), (":authority", "api.example"), (":path", "/v1/items?id=7")]


def test_goaway_fails_unprocessed_streams_and_large_headers_use_continuation() -> None:
    c, s = _client_server()
    segs: list[Segment] = []  # the client's view: its writes are egress
    _pump(c, s, True, segs)
    _pump(s, c, False, segs)
    c.send_headers(1, REQ, end_stream=True)
    # 25 KB of header values (Huffman-coded): one HEADERS and a CONTINUATION (max frame size 16 KB).
    big = [(f"x-h{i}", SECRET * 100) for i in range(40)]
    c.send_headers(3, [(":method", "POST"), (":scheme", "https"), (":authority", "api.example"),
                       (":path", "/v1/big"), *big], end_stream=True)  # fmt: skip
    c.send_headers(5, [*REQ[:3], (":path", "/v1/late")], end_stream=True)
    events = _pump(c, s, True, segs)
    assert sum(isinstance(e, h2.events.RequestReceived) for e in events) == 3
    s.send_headers(1, [(":status", "200"), ("content-type", "application/json")])
    s.send_data(1, b"{}", end_stream=True)
    s.send_headers(3, [(":status", "201")], end_stream=True)
    s.close_connection(last_stream_id=3)  # GOAWAY NO_ERROR: stream 5 was not processed
    _pump(s, c, False, segs)
    # Uncut: all three, the CONTINUATION block decoded.
    assert any(len(x.data) > 16384 for x in segs)
    d = Http2Decoder()
    ops: list[Operation] = []
    for seg in segs:
        ops += d.feed(seg)
    assert [(o.name, o.attributes.get("http.response.status_code"), o.error) for o in ops] == [
        ("GET", 200, None), ("POST", 201, None), ("GET", None, "REFUSED_STREAM")]
    assert ops[0].attributes["url.full"] == "https://api.example/v1/items?id=7"
    assert d.close(99) == []
    assert_no_secret(ops)


def test_server_push_and_a_smaller_header_table() -> None:
    from h2.settings import SettingCodes

    c, s = _client_server()
    segs: list[Segment] = []  # the server's view this time: its writes are egress
    _pump(c, s, False, segs)
    _pump(s, c, True, segs)
    # The client shrinks the server's encoder table to 64 bytes: the server's next block opens
    # with a size update, and entries beyond 64 bytes are evicted (or never enter).
    c.update_settings({SettingCodes.HEADER_TABLE_SIZE: 64})
    c.send_headers(1, REQ, end_stream=True)
    _pump(c, s, False, segs)
    s.push_stream(1, 2, [(":method", "GET"), (":scheme", "https"), (":authority", "api.example"),
                         (":path", "/style.css")])  # fmt: skip
    s.send_headers(1, [(":status", "200"), ("x-long-header-name-for-eviction", SECRET * 3)])
    s.send_headers(2, [(":status", "200"), ("content-type", "text/css")], end_stream=True)
    s.send_data(1, b"<html>", end_stream=True)
    _pump(s, c, True, segs)
    _pump(c, s, False, segs)
    d = Http2Decoder()
    ops: list[Operation] = []
    for seg in segs:
        ops += d.feed(seg)
    assert [(o.name, o.attributes.get("url.path"), o.attributes.get("http.response.status_code")) for o in ops] == [
        ("GET", "/style.css", 200), ("GET", "/v1/items", 200)]
    assert all(not o.client for o in ops)
    assert ops[1].attributes["url.query"] == "id=7"
    assert d._sides[True].hpack.max_table_size == 64  # the size update reached the decoder
    assert "hpack_errors" not in d.counters and "header_fields_unknown" not in d.counters
    assert_no_secret(ops)
    # The pushed stream's request is the server's promise, no byte of the request direction: none.
    positions, _ = decode(with_pos(segs, False, ISN))
    assert [o.req_pos for o in positions] == [None, *request_positions(b"".join(x.data for x in segs if not x.egress))]


def test_truncated_copy_of_a_continued_header_block() -> None:
    c, s = _client_server()
    segs: list[Segment] = []
    _pump(c, s, True, segs)
    _pump(s, c, False, segs)
    big = [(f"x-h{i}", SECRET * 100) for i in range(40)]
    c.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/big"), *big],
                   end_stream=True)  # fmt: skip
    c.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/next")],
                   end_stream=True)  # fmt: skip
    raw = c.data_to_send()
    s.receive_data(raw)
    s.send_headers(1, [(":status", "200")], end_stream=True)
    s.send_headers(3, [(":status", "204")], end_stream=True)
    resp = s.data_to_send()
    # One write of ~20 KB: the copy keeps 512 bytes; the gap swallows the CONTINUATION's header.
    cut = [*segs, _seg(raw, True, 10, len(raw)), _seg(resp, False, 11)]
    ops, counters = decode(cut)
    assert counters["sync_lost"] == 1 and counters["header_blocks_truncated"] >= 1
    assert counters["bytes_unsynced"] > 0 and counters["hpack_table_lost"] == 1
    # Stream 1's HEADERS frame header was copied: the stream is known, its fields are not. Stream
    # 3's HEADERS were in the lost bytes: its response is counted.
    assert counters["requests_undecoded"] == 1 and counters["responses_without_request"] == 1
    assert [(o.name, o.attributes) for o in ops] == [
        ("HTTP", {"network.protocol.version": "2", "http.response.status_code": 200})]
    assert "decoder_errors" not in counters
    # Stream 1's HEADERS was framed before the loss: it opens its stream, placed exactly.
    first = request_positions(b"".join(x.data for x in segs if x.egress) + raw)[0]
    assert [o.req_pos for o in decode(with_pos(cut, True, ISN))[0]] == [first]


# -- bad input ----------------------------------------------------------------------------------

def test_garbage_is_counted_not_decoded() -> None:
    junk = bytes((i * 7 + 3) % 256 for i in range(3000))
    segs = [_seg(junk[i : i + 700], i % 1400 == 0, i) for i in range(0, 3000, 700)]
    ops, counters = decode(segs)
    assert ops == []
    assert counters["midstream_pickups"] == 1
    assert counters["bytes_unsynced"] == 3000


def test_http1_without_upgrade_is_not_http2() -> None:
    ops, counters = decode([_seg(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True, 1),
                            _seg(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False, 2)])  # fmt: skip
    assert ops == [] and counters["not_http2"] == 1 and counters["bytes_not_http2"] > 0


def test_bad_preface_and_cut_frames() -> None:
    ops, counters = decode([_seg(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + b"\x00" * 9, True, 1)])
    assert ops == [] and counters["bad_preface"] == 1
    # A stream whose response is cut mid-frame by the connection's end: failed, not lost.
    c, s = _client_server()
    segs: list[Segment] = []
    _pump(c, s, True, segs)
    _pump(s, c, False, segs)
    c.send_headers(1, REQ, end_stream=True)
    _pump(c, s, True, segs)
    s.send_headers(1, [(":status", "200")])
    s.send_data(1, b"x" * 100, end_stream=True)
    resp = s.data_to_send()
    segs.append(_seg(resp[:-40], False, 50))
    ops, counters = decode(segs)
    assert len(ops) == 1 and ops[0].error == "response_incomplete"
    assert ops[0].attributes["http.response.status_code"] == 200


def test_oversized_frame_loses_sync_counted() -> None:
    frame = (20000).to_bytes(3, "big") + bytes([0, 0, 0, 0, 0, 1])  # DATA above the 16 KB default
    ops, counters = decode([_seg(PREFACE + frame, True, 1)])
    assert counters["frames_oversize"] == 1 and counters["sync_lost"] == 1 and ops == []


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


_GET = bytes([0x82, 0x86, 0x84, 0x41, 0x01, 0x61])  # GET http / :authority "a" (static and literal)


def test_a_stream_whose_end_was_lost_is_not_called_failed() -> None:
    request = PREFACE + _frame(4, 0, 0, b"") + _frame(1, 0x05, 1, _GET)
    # HEADERS :status 200, a 1000-byte DATA and a last DATA with END_STREAM in one 1040-byte
    # write: the copy's 512 bytes end inside the first DATA, the second's header is in the gap.
    response = _frame(1, 0x04, 1, b"\x88") + _frame(0, 0, 1, b"x" * 1000) + _frame(0, 1, 1, b"end")
    ops, counters = decode([_seg(request, True, 1), _seg(_frame(4, 0, 0, b""), False, 2),
                            _seg(response, False, 3)])  # fmt: skip
    assert counters["sync_lost"] == 1 and counters["streams_end_unknown"] == 1
    assert counters["bytes_unsynced"] == 12
    assert len(ops) == 1 and ops[0].error is None and ops[0].attributes["http.response.status_code"] == 200


def test_upgrade_settings_bound_the_servers_table() -> None:
    # HTTP2-Settings (base64url) raises the server's header table to 64 KiB: its first response
    # block may open with a size update to that, which must not be taken for a COMPRESSION_ERROR.
    upgrade = (b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAEAAQAA\r\n\r\n")  # fmt: skip
    response = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                + _frame(4, 0, 0, b"") + _frame(1, 0x05, 1, bytes([0x3F, 0xE1, 0xFF, 0x03, 0x88])))  # fmt: skip
    preface = PREFACE + _frame(4, 0, 0, b"")
    segs = [_seg(upgrade, True, 1), _seg(response, False, 2), _seg(preface, True, 3)]
    ops, counters = decode(segs)
    assert [(o.name, o.attributes["http.response.status_code"], o.attributes["url.full"]) for o in ops] == [
        ("GET", 200, "http://a/x")]
    assert "hpack_errors" not in counters
    # Stream 1's request is the upgrade request: named by its first byte, from either end.
    for client_view in (True, False):
        flipped = [replace(x, egress=x.egress == client_view) for x in segs]
        assert [o.req_pos for o in decode(with_pos(flipped, client_view, (77, RESP_BASE)))[0]] == [77]


def test_open_streams_are_bounded() -> None:
    from correlator.protocols.http2 import MAX_STREAMS

    segs = [_seg(PREFACE + _frame(4, 0, 0, b""), True, 0)]
    segs += [_seg(_frame(1, 0x05, 2 * i + 1, _GET), True, i + 1) for i in range(MAX_STREAMS + 2)]
    d = Http2Decoder()
    early: list[Operation] = []
    for seg in segs:
        early += d.feed(seg)
    # No response ever came: the two oldest made room for the newest, failed as evicted.
    assert [(o.error, o.start_ns) for o in early] == [("evicted", 1), ("evicted", 2)]
    assert d.counters["streams_evicted"] == 2
    rest = d.close(10_000)
    assert len(rest) == MAX_STREAMS and {o.error for o in rest} == {"connection_closed"}


# -- properties ---------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.binary(max_size=600), st.booleans(), st.integers(0, 5000)), max_size=12),
       st.booleans())  # fmt: skip
def test_arbitrary_bytes_never_raise(chunks: list[tuple[bytes, bool, int]], preface: bool) -> None:
    d = Http2Decoder()
    if preface:
        d.feed(_seg(PREFACE, True, 0))
    for i, (data, egress, extra) in enumerate(chunks):
        if not data:
            continue
        ops = d.feed(_seg(data, egress, i + 1, len(data[:512]) + extra))
        assert all(isinstance(o, Operation) for o in ops)
    d.close(100)
    assert "decoder_errors" not in d.counters, d.counters


_RUNS: list[Segment] = []
_TRUTH: set[int] = set()


@given(st.data())
def _recut_keeps_the_positions(data: st.DataObject) -> None:
    segs = with_pos(recut(_RUNS, data), True, ISN)
    ops, counters = decode(segs)
    assert "decoder_errors" not in counters
    got = true_positions(ops, _TRUTH)
    # Nothing cut and the start seen: every stream, each named. (A first transfer too short to tell
    # the server's SETTINGS from a mid-stream pick-up leaves both directions to resynchronise.)
    if not any(x.truncated for x in segs) and "midstream_pickups" not in counters:
        assert len(got) == len(ops) and set(got) == _TRUTH


def test_recorded_streams_recut_anywhere_keep_their_positions(grpc_port: int) -> None:
    """Real gRPC traffic (sequential calls, a server stream, concurrent calls) written in transfers
    of any size, each copied up to 512 bytes, each with its true position."""
    with relaying(("127.0.0.1", grpc_port)) as r:
        with _channel(r.port) as ch:
            unary = ch.unary_unary(f"/{SERVICE}/Unary")
            assert unary(b"one", metadata=METADATA, timeout=10) == b"pong:one"
            assert len(list(ch.unary_stream(f"/{SERVICE}/Stream")(b"2:100", timeout=10))) == 2
            futures = [unary.future(b"c%d" % i, timeout=10) for i in range(4)]
            assert sorted(f.result() for f in futures) == sorted(b"pong:c%d" % i for i in range(4))
        segs = views(r, full=True)["client"][0]
    _RUNS[:] = merge_runs(segs)
    _TRUTH.clear()
    _TRUTH.update(request_positions(b"".join(x.data for x in segs if x.egress)))
    assert len(_TRUTH) == 6
    _recut_keeps_the_positions()


# -- req_pos on built frames: one transfer each, concurrent streams, byte by byte, gaps, loss ----

SETTINGS_FRAME = _frame(4, 0, 0, b"")
NO_METHOD = b"\x40\x01x\x01y"  # one literal field "x: y": no pseudo-header (as in trailers)


def _get(sid: int, flags: int = 0x05) -> bytes:
    return _frame(1, flags, sid, _GET)


def _ok(sid: int) -> bytes:
    return _frame(1, 0x05, sid, b"\x88")  # :status 200, END_STREAM


def _decode_views(flights: list[tuple[bool, bytes, int]], length: dict[int, int] | None = None,
                  ) -> dict[bool, tuple[list[Operation], dict[str, int]]]:  # fmt: skip
    """Both ends' decodes of transfers (client to server?, bytes, position); length: the true
    length of the transfers (by index) whose copy was cut at 512 bytes."""
    out: dict[bool, tuple[list[Operation], dict[str, int]]] = {}
    for client_view in (True, False):
        segs = [Segment(1, 1, 1, c2s == client_view, t, t, (length or {}).get(t, len(data)), data[:512], pos=pos)
                for t, (c2s, data, pos) in enumerate(flights)]  # fmt: skip
        ops, counters = decode(segs)
        assert all(o.client is client_view for o in ops)
        assert "decoder_errors" not in counters
        out[client_view] = ops, counters
    return out


def test_req_pos_one_request_per_transfer() -> None:
    r, s = 5_000_000, 77
    open_ = PREFACE + SETTINGS_FRAME
    a, b = r + len(open_), r + len(open_) + len(_get(1))
    flights = [(True, open_, r), (False, SETTINGS_FRAME, s), (True, _get(1), a), (False, _ok(1), s + 9),
               (True, _get(3), b), (False, _ok(3), s + 19)]  # fmt: skip
    for ops, _ in _decode_views(flights).values():
        assert [(o.name, o.req_pos) for o in ops] == [("GET", a), ("GET", b)]


def _concurrent(r: int) -> tuple[list[tuple[bool, bytes, int]], list[int]]:
    """The preface and four streams in one write (stream 3 with a body and trailers, stream 7's
    block continued), answered out of order: the flights and the req_pos of each operation."""
    requests = [_get(1), _get(3, 0x04) + _frame(0, 0, 3, b"body") + _frame(1, 0x05, 3, NO_METHOD), _get(5),
                _frame(1, 0x01, 7, _GET[:2]) + _frame(9, 0x04, 7, _GET[2:])]  # fmt: skip
    data = PREFACE + SETTINGS_FRAME + b"".join(requests)
    at = {1: len(PREFACE) + 9}
    for sid, prev in ((3, 1), (5, 3), (7, 5)):
        at[sid] = at[prev] + len(requests[prev // 2])
    flights = [(True, data, r), (False, SETTINGS_FRAME + _ok(5) + _ok(7) + _ok(1) + _ok(3), 0)]
    return flights, [(r + at[sid]) & M32 for sid in (5, 7, 1, 3)]


def test_req_pos_of_concurrent_streams_in_one_transfer() -> None:
    flights, want = _concurrent(1000)
    assert len(set(want)) == 4
    for ops, _ in _decode_views(flights).values():
        assert [o.req_pos for o in ops] == want


def test_req_pos_byte_by_byte_and_across_the_wrap_is_the_whole_transfers() -> None:
    r = 2**32 - 10  # the preface straddles the wrap, every frame is after it
    flights, want = _concurrent(r)
    assert max(want) < 200
    split = [(c2s, data[i : i + 1], (pos + i) & M32) for c2s, data, pos in flights for i in range(len(data))]
    for f in (flights, split):
        for ops, _ in _decode_views(f).values():
            assert [o.req_pos for o in ops] == want


def test_req_pos_after_gaps_and_a_loss() -> None:
    r = 2**32 - 700
    one = _get(1, 0x04) + _frame(0, 0x01, 1, b"x" * 1000)  # the gap ends inside the DATA payload
    # The gap swallows the second DATA frame's header: that direction's framing is lost.
    five = _get(5, 0x04) + _frame(0, 0, 5, b"x" * 1000) + _frame(0, 0x01, 5, b"end")
    at = [r]
    for n in (len(one), len(_get(3)), len(five), len(_get(7))):
        at.append((at[-1] + n) & M32)
    client = [one, _get(3), five, _get(7), _frame(1, 0x05, 9, NO_METHOD)]
    flights = [(True, PREFACE + SETTINGS_FRAME, (r - len(PREFACE) - 9) & M32), (False, SETTINGS_FRAME, 0)]
    for i, data in enumerate(client):
        flights += [(True, data, at[i]), (False, _ok(2 * i + 1), 9 + 10 * i)]
    for ops, counters in _decode_views(flights, {2: len(one), 6: len(five)}).values():
        assert counters["sync_lost"] == 1 and counters["resyncs"] == 1
        # Stream 7's block carries :method: it opens its stream, placed. Stream 9's carries none:
        # after the loss it could be trailers of a stream whose HEADERS was lost, so it is not.
        assert [o.req_pos for o in ops] == [*at[:4], None]
        assert ops[-1].name == "HTTP"


_RECORDED: list[bytes] = []


def _recorded_stream() -> bytes:
    # A real exchange (h2 client and server) to mutate: valid framing with HPACK state.
    if not _RECORDED:
        c, s = _client_server()
        out = bytearray(c.data_to_send())
        s.receive_data(bytes(out))
        for sid in (1, 3, 5):
            c.send_headers(sid, [*REQ[:3], (":path", f"/p{sid}"), ("x-k", SECRET)], end_stream=True)
        out += c.data_to_send()
        _RECORDED.append(bytes(out))
    return _RECORDED[0]


@given(st.lists(st.integers(1, 200), min_size=1, max_size=20), st.integers(0, 400), st.binary(max_size=8))
def test_real_stream_arbitrary_splits_and_corruption_never_raise(cuts: list[int], at: int, junk: bytes) -> None:
    data = bytearray(_recorded_stream())
    at = at % len(data)
    data[at : at + len(junk)] = junk
    d = Http2Decoder()
    pos = 0
    i = 0
    for n in cuts:
        if pos >= len(data):
            break
        d.feed(_seg(bytes(data[pos : pos + n]), True, i))
        pos += n
        i += 1
    ops = d.close(1000)
    assert "decoder_errors" not in d.counters, d.counters
    assert_no_secret(ops)
