"""Routes without configuration: a low-cardinality `http.route` made from the concrete path.

When no --route template matches a server request, `route_template` rewrites each path segment
that names one thing among many to `{id}`, so `/users/42/orders/9f1c...` becomes
`/users/{id}/orders/{id}` and its span is named `GET /users/{id}/orders/{id}`. A segment becomes
`{id}` when it is (in this order):
- a number, or digits with separators: `42`, `2024-01-15`, `1.2.3`, `10:30`;
- a UUID (with or without dashes), or hex of 8 characters or more with a digit in it
  (`0x` prefix allowed): content hashes, Mongo ObjectIds, git SHAs;
- made of four or more digits among other characters: `order-12345`, `INV2024001`;
- long and random-looking: 16+ characters of a token alphabet with two or more digits, or with
  upper and lower case mixed beyond camelCase (`cus_NffrFeUfNV2Hib`, base64url tokens);
- an e-mail address, percent-encoded text (user data), or longer than 40 characters.
What stays: words and slugs (`/blog/how-to-train-your-dragon`), API versions (`v1`, `v2beta1`),
short alphanumerics (`oauth2`, `sha256`, `ipv6`). A file name keeps its extension and is judged
by its stem (`{id}.png`), or part by part for fingerprinted assets (`app.{id}.js`).

Slugs and other free-form words are what the heuristic cannot tell from a route, so RouteCap
bounds what is left: each service (one listening address and port) gets at most `max_routes`
distinct routes, first come first kept, and every later one is OVERFLOW_ROUTE. Pure and
deterministic: the same requests in the same order give the same routes.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Hashable

ID = "{id}"
OVERFLOW_ROUTE = "/{overflow}"
DEFAULT_MAX_ROUTES = 100
DEFAULT_MAX_SERVICES = 1024  # listening addresses remembered (~10 MB at most); least recently used go first

_NUMERIC = re.compile(r"[0-9][0-9._:,+-]*\Z")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]{8,}\Z")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\Z")
_EXTENSION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,4}\Z")
_RANDOM_MIN_LEN = 16
_LONGEST_LITERAL = 40  # longer is text (a long slug, a search term, a head the capture cut)
_MAX_SEGMENTS = 64  # deeper paths keep their first segments and end in /{id}...: still bounded


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _random_looking(s: str) -> bool:
    if len(s) < _RANDOM_MIN_LEN or not _TOKEN.match(s):
        return False
    if _digits(s) >= 2:
        return True
    letters = [c for c in s if c.isalpha()]
    upper = sum(c.isupper() for c in letters)
    # camelCase words have one capital per word (~15% of letters); random mixed case, about half.
    return 0 < upper < len(letters) and upper / len(letters) >= 0.25


def _hex_id(s: str) -> bool:
    return bool(_HEX.match(s)) and (s[:2] in ("0x", "0X") or _digits(s) > 0)


def is_identifier(segment: str) -> bool:
    """Whether one path segment names one thing among many (an id), not a route's literal."""
    if not segment:
        return False
    if _NUMERIC.match(segment) or _UUID.match(segment) or _hex_id(segment):
        return True
    if "@" in segment or "%" in segment or len(segment) > _LONGEST_LITERAL:
        return True
    return _digits(segment) >= 4 or _random_looking(segment)


def _fingerprint(part: str) -> bool:
    """A dotted file-name part that is a hash or token (`app.3f9a8b7c.js`), not a version number."""
    return bool(_UUID.match(part)) or _hex_id(part) or _random_looking(part)


def segment_template(segment: str) -> str:
    if not segment:
        return segment
    if _NUMERIC.match(segment) or _UUID.match(segment) or "@" in segment or "%" in segment:
        return ID
    stem, dot, ext = segment.rpartition(".")
    if dot and stem and _EXTENSION.match(ext):
        # A file name: keep the extension (it says what kind of thing is served), judge the stem.
        parts = stem.split(".")
        if len(parts) > 1 and any(_fingerprint(p) for p in parts):
            return ".".join(ID if _fingerprint(p) else p for p in parts) + "." + ext
        return f"{ID}.{ext}" if is_identifier(stem) else segment
    return ID if is_identifier(segment) else segment


_SEGMENT_MEMO = 8192  # distinct segments remembered; cleared when full
_segments: dict[str, str] = {}


def route_template(path: str) -> str:
    """`/users/42/orders` -> `/users/{id}/orders`. `path` starts with "/" (no query)."""
    segments = path.split("/")
    if len(segments) > _MAX_SEGMENTS + 1:
        segments = segments[: _MAX_SEGMENTS + 1] + [ID]
    # Every server request of every service comes here and a path's literals repeat (an id is
    # what changes): a segment's template is memoised, and a decimal number, the most common id,
    # never reaches the memo or the patterns.
    memo = _segments
    out = []
    for seg in segments:
        if seg.isdecimal() and seg.isascii():
            out.append(ID)
            continue
        t = memo.get(seg)
        if t is None:
            t = segment_template(seg)
            if len(memo) >= _SEGMENT_MEMO:
                memo.clear()
            memo[seg] = t
        out.append(t)
    return "/".join(out)


class RouteCap:
    """At most `max_routes` distinct routes per service; the rest become OVERFLOW_ROUTE."""

    def __init__(self, max_routes: int = DEFAULT_MAX_ROUTES, max_services: int = DEFAULT_MAX_SERVICES) -> None:
        if max_routes < 1 or max_services < 1:
            raise ValueError("max_routes and max_services must be >= 1")
        self.max_routes = max_routes
        self.max_services = max_services
        self._by_service: OrderedDict[Hashable, set[str]] = OrderedDict()
        self.overflowed = 0  # requests named OVERFLOW_ROUTE
        self.services_forgotten = 0  # services evicted beyond max_services (their routes start over)

    def admit(self, service: Hashable, route: str) -> str:
        routes = self._by_service.get(service)
        if routes is None:
            routes = self._by_service[service] = set()
            if len(self._by_service) > self.max_services:
                self._by_service.popitem(last=False)
                self.services_forgotten += 1
        else:
            self._by_service.move_to_end(service)
        if route in routes:
            return route
        if len(routes) < self.max_routes:
            routes.add(route)
            return route
        self.overflowed += 1
        return OVERFLOW_ROUTE

    def routes_of(self, service: Hashable) -> frozenset[str]:
        return frozenset(self._by_service.get(service, ()))
