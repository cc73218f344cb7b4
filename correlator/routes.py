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

Both are C (correlator/_routes.c), the one implementation: every server request without a
--route template comes through route_template, on the span path (correlator/_spans.c) and the
metric-record path (correlator/_red.c) alike. A segment's template is memoised (SEGMENT_MEMO
distinct segments, cleared when full); a path deeper than MAX_SEGMENTS keeps its first
segments and ends in /{id}.
"""

from correlator._routes import (
    DEFAULT_MAX_ROUTES,
    DEFAULT_MAX_SERVICES,
    ID,
    MAX_SEGMENTS,
    OVERFLOW_ROUTE,
    SEGMENT_MEMO,
    RouteCap,
    is_identifier,
    route_template,
    segment_template,
)

__all__ = [
    "DEFAULT_MAX_ROUTES", "DEFAULT_MAX_SERVICES", "ID", "MAX_SEGMENTS", "OVERFLOW_ROUTE", "SEGMENT_MEMO", "RouteCap",
    "is_identifier", "route_template", "segment_template",
]
