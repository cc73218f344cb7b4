"""correlator/routes.py: the route heuristic on a corpus of realistic API paths, its properties,
the per-service cap, and its place in the correlator (after --route templates) and the metrics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics

from correlator.clock import WallClock
from correlator.correlator import Correlator, CorrelatorConfig
from correlator.routes import ID, MAX_SEGMENTS, OVERFLOW_ROUTE, RouteCap, is_identifier, route_template
from correlator.spans import ProcessInfo, Span, SpanKind
from exporters.metrics import MetricsAggregator
from tests.support.exchanges import make_exchange, request_bytes, response_bytes
from tests.support.otlp_receiver import flatten_metrics

CORPUS = [
    # plain REST, numeric ids, nesting, trailing slash, root
    ("/", "/"),
    ("/health", "/health"),
    ("/api/v1/users", "/api/v1/users"),
    ("/api/v1/users/12345", "/api/v1/users/{id}"),
    ("/api/v1/users/12345/orders/987", "/api/v1/users/{id}/orders/{id}"),
    ("/users/42/", "/users/{id}/"),
    ("/status/503", "/status/{id}"),
    # API versions stay literal
    ("/v2/orders", "/v2/orders"),
    ("/apis/apps/v1beta2/namespaces/default/deployments", "/apis/apps/v1beta2/namespaces/default/deployments"),
    ("/oauth2/token", "/oauth2/token"),
    # UUIDs, dashed or not, any case
    ("/users/550e8400-e29b-41d4-a716-446655440000", "/users/{id}"),
    ("/sessions/550E8400E29B41D4A716446655440000/refresh", "/sessions/{id}/refresh"),
    # hex: hashes, ObjectIds, git SHAs, 0x literals
    ("/repos/torvalds/linux/commits/1da177e4c3f41524e886b7f1b8a0c1fc7321cac2",
     "/repos/torvalds/linux/commits/{id}"),
    ("/items/507f1f77bcf86cd799439011", "/items/{id}"),
    ("/tx/0xdeadbeef", "/tx/{id}"),
    ("/blobs/sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
     "/blobs/{id}"),
    # ids with letters: order numbers, Stripe-like keys, tokens, ULIDs
    ("/orders/ORD-2024-000123", "/orders/{id}"),
    ("/invoices/INV2024001/pdf", "/invoices/{id}/pdf"),
    ("/v1/customers/cus_NffrFeUfNV2Hib", "/v1/customers/{id}"),
    ("/reset/eyJhbGciOiJIUzI1NiJ9", "/reset/{id}"),
    ("/events/01ARZ3NDEKTSV4RRFFQ69G5FAV", "/events/{id}"),
    # dates and version numbers in the path
    ("/reports/2024-01-15", "/reports/{id}"),
    ("/blog/2024/01/15/how-to-train-your-dragon", "/blog/{id}/{id}/{id}/how-to-train-your-dragon"),
    ("/packages/requests/2.31.0", "/packages/requests/{id}"),
    ("/schedule/10:30", "/schedule/{id}"),
    # slugs and words stay: the cap bounds them
    ("/products/blue-running-shoes", "/products/blue-running-shoes"),
    ("/docs/getting-started/install", "/docs/getting-started/install"),
    ("/api/getUserProfileSettings", "/api/getUserProfileSettings"),
    ("/tags/ipv6", "/tags/ipv6"),
    ("/algorithms/sha256", "/algorithms/sha256"),
    # file names keep their extension; fingerprinted assets keep their name
    ("/static/logo.png", "/static/logo.png"),
    ("/static/js/app.3f9a8b7c.js", "/static/js/app.{id}.js"),
    ("/static/jquery-3.6.0.min.js", "/static/jquery-3.6.0.min.js"),
    ("/images/9f86d081884c7d65.png", "/images/{id}.png"),
    ("/files/report-2024-01-15.pdf", "/files/{id}.pdf"),
    ("/uploads/photo.1700000000.jpg", "/uploads/photo.{id}.jpg"),
    ("/.well-known/openid-configuration", "/.well-known/openid-configuration"),
    ("/robots.txt", "/robots.txt"),
    # user data in the path
    ("/users/alice@example.com/settings", "/users/{id}/settings"),
    ("/@alice", "/{id}"),
    ("/search/John%20Smith", "/search/{id}"),
    ("/wiki/" + "a" * 60, "/wiki/{id}"),
]


@pytest.mark.parametrize(("path", "route"), CORPUS, ids=[p for p, _ in CORPUS])
def test_corpus(path: str, route: str) -> None:
    assert route_template(path) == route


def test_what_is_an_identifier() -> None:
    for word in ("users", "v1", "v2beta1", "oauth2", "html5", "deadbeefcafe", "camelCaseName", "{id}", ""):
        assert not is_identifier(word), word
    for value in ("0", "007", "1.2.3", "2024-01-15", "4f3c2a1b", "user-12345", "a1b2c3d4e5f6g7h8"):
        assert is_identifier(value), value


SEGMENT = st.one_of(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~%@:", max_size=50),
    st.integers(min_value=0, max_value=10**12).map(str),
    st.uuids().map(str),
    st.sampled_from(["users", "v1", "api", "orders", "static", "index.html", "app.min.js"]),
)
PATHS = st.lists(SEGMENT, max_size=12).map(lambda segs: "/" + "/".join(segs))


@given(PATHS)
def test_properties(path: str) -> None:
    route = route_template(path)
    # deterministic, and a route is its own route (so an exported route re-fed stays put)
    assert route_template(path) == route
    assert route_template(route) == route
    # the shape is kept: same segments, each either unchanged or holding {id}
    got, want = route.split("/"), path.split("/")
    assert len(got) == len(want)
    for r, p in zip(got, want, strict=True):
        assert r == p or ID in r
        if p.isdigit():
            assert r == ID
    # nothing long survives: a route's segment is a word, a file name or {id}
    assert all(len(r) <= 40 or "." in r for r in got)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50)), max_size=300), st.integers(1, 20))
def test_cap_property(requests: list[tuple[int, int]], cap_size: int) -> None:
    cap = RouteCap(max_routes=cap_size)
    seen: dict[int, list[str]] = {}
    for service, n in requests:
        route = f"/r{n}"
        got = cap.admit(service, route)
        assert got in (route, OVERFLOW_ROUTE)
        if got == route:
            seen.setdefault(service, [])
            if route not in seen[service]:
                seen[service].append(route)
    for service, routes in seen.items():
        assert len(routes) <= cap_size
        assert cap.routes_of(service) == frozenset(routes)
    # first come, first kept: the admitted ones are the first distinct routes each service asked for
    for service in seen:
        first: list[str] = []
        for s, n in requests:
            if s == service and f"/r{n}" not in first:
                first.append(f"/r{n}")
        assert seen[service] == first[:cap_size]


def test_cap_forgets_the_least_recent_service_beyond_its_room() -> None:
    cap = RouteCap(max_routes=1, max_services=2)
    assert cap.admit("a", "/x") == "/x" and cap.admit("b", "/y") == "/y"
    assert cap.admit("a", "/z") == OVERFLOW_ROUTE
    cap.admit("c", "/w")  # "b" is the least recently used: forgotten
    assert cap.services_forgotten == 1 and cap.routes_of("b") == frozenset()
    assert cap.routes_of("a") == {"/x"}
    with pytest.raises(ValueError):
        RouteCap(max_routes=0)


def _server(path: str, port: int = 8080, method: str = "GET", conn: int = 1) -> object:
    return make_exchange(request_bytes(method, path), response_bytes(200), local=("10.0.0.5", port),
                         conn_id=0xFFFF_8880_0000_0000 + conn, req_start_ns=1_000_000_000 + conn * 1000)


def _spans(paths: list[tuple[str, int]], **cfg: object) -> tuple[list[Span], Correlator]:
    c = Correlator(WallClock(0), CorrelatorConfig(**cfg))  # type: ignore[arg-type]
    out: list[Span] = []
    for i, (path, port) in enumerate(paths):
        out += c.feed(_server(path, port, conn=i))  # type: ignore[arg-type]
    out += c.flush()
    return sorted(out, key=lambda s: s.start_ns), c


def test_correlator_names_spans_templates_first_then_heuristic_then_overflow() -> None:
    paths = [("/users/1", 8080), ("/users/2", 8080), ("/carts/7", 8080), ("/a-slug", 8080), ("/another-slug", 8080),
             ("/users/3", 8080), ("/health", 9090), ("/teams/9/members", 8080)]
    spans, c = _spans(paths, routes=["/teams/{team}/members"], max_routes=3)
    names = [s.name for s in spans]
    assert names == [
        "GET /users/{id}", "GET /users/{id}", "GET /carts/{id}", "GET /a-slug",
        "GET /{overflow}",  # port 8080 has its three routes now
        "GET /users/{id}",  # an admitted route stays admitted
        "GET /health",  # another service (port 9090) has its own room
        "GET /teams/{team}/members",  # a --route template wins, and is not counted against the cap
    ]
    assert spans[4].attributes["http.route"] == OVERFLOW_ROUTE
    assert spans[4].attributes["url.path"] == "/another-slug"  # the concrete path is still there
    assert c.stats.routes_overflowed == 1
    again, _ = _spans(paths, routes=["/teams/{team}/members"], max_routes=3)
    assert [s.name for s in again] == names  # deterministic: a replay names them the same


def test_metrics_use_the_route() -> None:
    spans, _ = _spans([("/users/1", 8080), ("/users/22", 8080), ("/users/333", 8080)])
    agg = MetricsAggregator()
    agg.record_spans(spans, {1000: ProcessInfo(pid=1000, service_name="users-api", executable_name="users-api",
                                               command_line="./users-api")})
    points = [p for p in flatten_metrics(encode_metrics(agg.collect()), "local")
              if p["name"] == "http.server.request.duration"]
    assert len(points) == 1  # three paths, one series
    assert points[0]["attributes"]["http.route"] == "/users/{id}" and points[0]["count"] == 3
    assert all(s.kind == SpanKind.SERVER for s in spans)


def test_command_line() -> None:
    from tracer.agent import _correlator_config
    from tracer.cli import _options, build_parser

    opts = _options(build_parser().parse_args(["run", "--max-routes", "5", "--no-auto-routes"]))
    cfg = _correlator_config(opts, b"salt")
    assert (cfg.auto_routes, cfg.max_routes) == (False, 5)
    cfg = _correlator_config(_options(build_parser().parse_args(["replay", "f.kspan"])), b"salt")
    assert (cfg.auto_routes, cfg.max_routes) == (True, 100)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--max-routes", "0"])


# What the C implementation (correlator/_routes.c) handles beyond the corpus ---------------------

NON_ASCII = [
    ("/café/42", "/café/{id}"),  # a word stays, whatever its alphabet
    ("/搜索/結果", "/搜索/結果"),
    ("/users/١٢٣", "/users/١٢٣"),  # Arabic-Indic digits: not a decimal id in ASCII, but...
    ("/orders/ord-١٢٣٤", "/orders/{id}"),  # ...four digits (str.isdigit) among other characters are
    ("/x/²³⁴⁵", "/x/{id}"),  # superscripts are digits too
    ("/files/résumé.pdf", "/files/résumé.pdf"),
    ("/files/résumé-2024-01-15.pdf", "/files/{id}.pdf"),
    ("/bad/\ufffd\ufffd/7", "/bad/\ufffd\ufffd/{id}"),  # bytes that were not UTF-8, decoded with "replace"
    ("/𝟘𝟙𝟚𝟛/9f86d081884c7d65", "/{id}/{id}"),  # mathematical digits; the hex stays ASCII-only
    ("/ünïcödé-" + "ä" * 40, "/{id}"),  # longer than 40 characters (not bytes)
    ("/" + "ä" * 40, "/" + "ä" * 40),
]


@pytest.mark.parametrize(("path", "route"), NON_ASCII, ids=[p for p, _ in NON_ASCII])
def test_non_ascii_paths(path: str, route: str) -> None:
    assert route_template(path) == route
    assert route_template(route) == route


def test_deep_paths_keep_their_first_segments_and_end_in_one_id() -> None:
    from correlator.routes import MAX_SEGMENTS

    words = [f"w{i % 7}" for i in range(MAX_SEGMENTS * 3)]
    # path.split("/") of "/a/b" is ["", "a", "b"]: MAX_SEGMENTS segments after the leading one
    exactly = "/" + "/".join(words[:MAX_SEGMENTS])
    assert route_template(exactly) == exactly
    deeper = "/" + "/".join(words[: MAX_SEGMENTS + 1])
    assert route_template(deeper) == "/" + "/".join(words[:MAX_SEGMENTS]) + "/" + ID
    deepest = "/" + "/".join(words) + "/42"
    assert route_template(deepest) == "/" + "/".join(words[:MAX_SEGMENTS]) + "/" + ID
    assert route_template("/" * 1000) == "/" * (MAX_SEGMENTS + 1) + ID
    ids = "/" + "/".join(str(i) for i in range(MAX_SEGMENTS - 1)) + "/x/y"
    assert route_template(ids) == "/" + "/".join([ID] * (MAX_SEGMENTS - 1)) + "/x/" + ID


def test_very_long_paths() -> None:
    long_word = "a" * 100_000
    assert route_template("/" + long_word) == "/" + ID
    assert route_template("/static/" + long_word + ".js") == "/static/{id}.js"
    path = "/users/" + "9" * 100_000 + "/orders"
    assert route_template(path) == "/users/{id}/orders"


def test_segment_memo_starts_over_when_full() -> None:
    from correlator.routes import SEGMENT_MEMO, segment_template

    # More distinct segments than the memo holds (it clears, more than once), each still
    # templated right, and the ones memoised before the clears still right after them.
    first = [("/a/x" + "k" * (i % 5) + f"q{i}", "/a/x" + "k" * (i % 5) + f"q{i}") for i in range(50)]
    first += [(f"/t/t{i:04d}z", "/t/{id}") for i in range(50)]
    for path, route in first:
        assert route_template(path) == route
    for i in range(SEGMENT_MEMO * 2 + 100):
        seg = f"s{i}x"  # a word below 1000, an id (four digits) from there
        assert route_template("/p/" + seg) == "/p/" + segment_template(seg)
    assert segment_template("s999x") == "s999x" and segment_template("s1000x") == ID
    for path, route in first:
        assert route_template(path) == route


def test_cap_returns_the_route_it_was_given_and_refreshes_a_service_it_sees() -> None:
    cap = RouteCap(max_routes=1, max_services=2)
    route = "".join(["/r", "1"])  # built at run time: not an interned constant
    assert cap.admit("a", route) is route
    again = "".join(["/r", "1"])
    assert cap.admit("a", again) is again  # admitted before, by value
    assert cap.admit("a", "/r2") is OVERFLOW_ROUTE and cap.overflowed == 1
    cap.admit("b", "/y")
    cap.admit("a", "/r1")  # "a" is now the most recently used
    cap.admit("c", "/z")  # so "b" goes
    assert cap.routes_of("b") == frozenset() and cap.routes_of("a") == {"/r1"} and cap.services_forgotten == 1
    assert (cap.max_routes, cap.max_services) == (1, 2)
    with pytest.raises(ValueError):
        RouteCap(max_services=0)
    with pytest.raises(TypeError):
        cap.admit(["unhashable"], "/x")
    with pytest.raises(TypeError):
        route_template(b"/bytes")  # type: ignore[arg-type]


# The memo and the ASCII fast path against the unmemoised segment_template ---------------------


def _reference(path: str) -> str:
    """route_template by its definition: each segment's template, the decimal ones {id}."""
    from correlator.routes import MAX_SEGMENTS, segment_template

    segs = path.split("/")
    route = [ID if s.isascii() and s.isdecimal() else segment_template(s) for s in segs[: MAX_SEGMENTS + 1]]
    return "/".join(route + [ID] * (len(segs) > MAX_SEGMENTS + 1))


# few characters, so that segments repeat (memo hits) and collide in the memo's table
ASCII_SEGMENT = st.one_of(
    SEGMENT,
    st.text(alphabet="ab1.-", max_size=12),
    st.text(alphabet="0123456789", min_size=1, max_size=20),
    st.sampled_from(["x.png", "a.3f9a8b7c.js", "photo.1700000000.jpg", "r-2024-01-15.pdf", "{id}", "{id}.js"]),
)

WIDE_SEGMENT = st.one_of(ASCII_SEGMENT, st.text(alphabet="aé1.-搜\U0001d7d8\x00", max_size=12))


@given(st.lists(st.one_of(ASCII_SEGMENT, st.just("")), max_size=70).map("/".join))
def test_ascii_paths_match_the_definition(path: str) -> None:
    assert route_template(path) == _reference(path)


@given(st.lists(WIDE_SEGMENT, max_size=70).map("/".join))
def test_any_paths_match_the_definition(path: str) -> None:
    route = route_template(path)
    assert route == _reference(path)
    assert route_template(route) == route


@given(st.lists(ASCII_SEGMENT, max_size=MAX_SEGMENTS - 2).map(lambda segs: "/" + "/".join(segs)),
       st.sampled_from(["é", "搜", "\U0001f600"]))
def test_a_non_ascii_segment_changes_only_itself(path: str, word: str) -> None:
    # the same path through the general (non-ASCII) path: a word stays, whatever its alphabet
    route = route_template(path)
    assert route_template(path + "/" + word) == route + "/" + word
    assert route_template(word + path) == word + route


def test_the_memo_can_start_over_within_one_path() -> None:
    from correlator.routes import SEGMENT_MEMO

    # 63 new segments a path (not a divisor of SEGMENT_MEMO): the memo fills up in the middle of
    # most paths, after templates held only by the memo were taken for the path's route.
    for i in range(SEGMENT_MEMO // 63 + 3):
        segs = [f"r{i}-{k:05d}.png" for k in range(63)]
        want = "/" + "/".join(["{id}.png"] * 63)
        assert route_template("/" + "/".join(segs)) == want
        assert route_template("/" + "/".join(segs[::-1]) + "/é") == want + "/é"
