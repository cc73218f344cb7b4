"""Stable OpenTelemetry HTTP semantic conventions: span names, attributes, status, query policy.

Only the Host and User-Agent header values are ever exported; the method, target, version and
status come from the request and status lines. Bodies never leave the agent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import unquote

KNOWN_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}
OTHER_METHOD = "_OTHER"
QUERY_MODES = ("keep", "redact", "drop")
REDACTED = "REDACTED"

# Query keys whose values are credentials. Exact names (case-insensitive, after percent-decoding)
# plus substrings that only occur in credential-like names. Redacting too much is the safe error.
SENSITIVE_QUERY_KEYS = frozenset(
    (
        "sig", "signature", "key", "code", "auth", "pwd", "pass", "passwd", "password", "otp", "jwt",
        "token", "secret", "apikey", "api_key", "api-key", "awsaccesskeyid", "x-goog-signature",
        "x-amz-signature", "x-amz-credential", "x-amz-security-token", "sessionid", "session_id",
        "sid", "ticket", "assertion", "samlresponse", "client_secret", "access_token", "id_token",
        "refresh_token", "authorization", "private_token", "credential", "credentials",
    )
)  # fmt: skip
_SENSITIVE_PARTS = ("token", "secret", "passw", "signature", "apikey", "api_key", "api-key", "credential",
                    "session", "oauth", "auth_", "_auth", "auth-", "-auth")  # fmt: skip
# Cheap pre-check: a query whose lower-cased text matches none of these has no sensitive key.
# Without IGNORECASE the regex engine skips positions by the alternatives' first characters.
_INDICATORS = re.compile(
    "sig|key|code|auth|pwd|pass|otp|jwt|token|secret|sid|ticket|assertion|saml|credential|session|%"
)
_SENSITIVE_PART_RE = re.compile("|".join(re.escape(p) for p in _SENSITIVE_PARTS))


def normalize_method(raw: bytes) -> tuple[str, str | None]:
    """(http.request.method, http.request.method_original or None)."""
    m = KNOWN_METHODS.get(raw)
    if m is not None:
        return m, None
    return OTHER_METHOD, raw.decode("latin-1")


def is_sensitive_query_key(key: str) -> bool:
    k = key.lower()
    if "%" in k or "+" in k:
        k = unquote(k.replace("+", " "))
    return k in SENSITIVE_QUERY_KEYS or _SENSITIVE_PART_RE.search(k) is not None


def redact_query(query: str) -> str:
    """Keep every key, replace the values of credential-like keys with REDACTED."""
    if _INDICATORS.search(query.lower()) is None:
        return query
    parts = query.split("&")
    changed = False
    for i, part in enumerate(parts):
        k, eq, v = part.partition("=")
        if eq and v and is_sensitive_query_key(k):
            parts[i] = k + "=" + REDACTED
            changed = True
    return "&".join(parts) if changed else query


class RouteTable:
    """Configured route templates ("/users/{id}") matched segment by segment against a path.

    `{name}` matches one non-empty segment; a final `{name...}` or `*` matches the rest (one or
    more segments). Literal templates are tried first, then the others in configured order."""

    def __init__(self, templates: Sequence[str]) -> None:
        self._literal: dict[str, str] = {}
        self._by_count: dict[int, list[tuple[tuple[str | None, ...], str]]] = {}
        self._tails: list[tuple[tuple[str | None, ...], str]] = []
        for t in templates:
            if not isinstance(t, str) or not t.startswith("/"):
                raise ValueError(f"route template {t!r} must be a string starting with '/'")
            segs = _segments(t)
            pattern: list[str | None] = []
            tail = False
            for i, s in enumerate(segs):
                if s == "*" or (s.startswith("{") and s.endswith("...}")):
                    if i != len(segs) - 1:
                        raise ValueError(f"route template {t!r}: a catch-all must be the last segment")
                    tail = True
                elif s.startswith("{") and s.endswith("}") and len(s) > 2:
                    pattern.append(None)
                elif "{" in s or "}" in s:
                    raise ValueError(f"route template {t!r}: segment {s!r} is neither literal nor {{name}}")
                else:
                    pattern.append(s)
            if tail:
                self._tails.append((tuple(pattern), t))
            elif all(p is not None for p in pattern):
                self._literal.setdefault("/" + "/".join(pattern), t)  # type: ignore[arg-type]
            else:
                self._by_count.setdefault(len(pattern), []).append((tuple(pattern), t))
        self.empty = not templates

    def match(self, path: str) -> str | None:
        if self.empty:
            return None
        segs = _segments(path)
        lit = self._literal.get("/" + "/".join(segs))
        if lit is not None:
            return lit
        for pattern, t in self._by_count.get(len(segs), ()):
            if _match(pattern, segs):
                return t
        for pattern, t in self._tails:
            if len(segs) > len(pattern) and _match(pattern, segs[: len(pattern)]):
                return t
        return None


def _segments(path: str) -> list[str]:
    p = path.strip("/")
    return p.split("/") if p else []


def _match(pattern: tuple[str | None, ...], segs: Sequence[str]) -> bool:
    for p, s in zip(pattern, segs, strict=True):
        if p is None:
            if not s:
                return False
        elif p != s:
            return False
    return True


def split_host_port(value: str) -> tuple[str, int | None] | None:
    """Host header or authority -> (host, port or None); None if it is not a plausible host."""
    if not value or len(value) > 300 or not value.isprintable() or " " in value or "@" in value:
        return None
    if value[0] == "[":
        close = value.find("]")
        if close < 0:
            return None
        host, rest = value[1:close], value[close + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_s = rest[1:] if rest else ""
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            host, port_s = value, ""
        elif ":" in host:
            return None  # bare IPv6 without brackets is not a valid Host
    if not host:
        return None
    if port_s:
        if not port_s.isdigit() or len(port_s) > 5 or int(port_s) > 65535:
            return None
        return host, int(port_s)
    return host, None


# url.full (the scheme's default port left out, an IPv6 host in brackets) is built with the span,
# in correlator/_spans.c.

# error.type values for transport failures (low cardinality, stable).
ERR_CLOSED = "connection_closed"  # closed before any response byte
ERR_INCOMPLETE = "response_incomplete"  # closed before the response's framing was satisfied
ERR_TIMEOUT = "timeout"  # no (complete) response within the kernel's response timeout
ERR_EVICTED = "evicted"  # kspan lost the exchange's state (table full, process exited) before it ended

STATUS_MESSAGES = {
    ERR_CLOSED: "connection closed before a response",
    ERR_INCOMPLETE: "connection closed before the response was complete",
    ERR_TIMEOUT: "no complete response before the timeout",
    ERR_EVICTED: "exchange state evicted before the response completed",
}
