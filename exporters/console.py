"""The embedded default's live view: each trace as a compact indented tree on stdout."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from correlator.spans import ProcessInfo, Span, SpanKind, StatusCode

_KIND = {SpanKind.SERVER: "SERVER", SpanKind.CLIENT: "CLIENT"}


class _Style:
    def __init__(self, colour: bool) -> None:
        on = colour
        self.dim = "\x1b[2m" if on else ""
        self.bold = "\x1b[1m" if on else ""
        self.red = "\x1b[31m" if on else ""
        self.green = "\x1b[32m" if on else ""
        self.yellow = "\x1b[33m" if on else ""
        self.cyan = "\x1b[36m" if on else ""
        self.reset = "\x1b[0m" if on else ""


def _target(span: Span) -> str:
    """What the span was about, if its name does not already say it: the URL for clients, the path for
    servers (the name holds the low-cardinality route, the tree wants the concrete request)."""
    a = span.attributes
    if span.kind == SpanKind.CLIENT:
        full = a.get("url.full")
        if full:
            return str(full)
        host = a.get("server.address")
        if host:
            port = a.get("server.port")
            path = a.get("url.path", "")
            return f"{host}:{port}{path}" if port else f"{host}{path}"
        return ""
    path = a.get("url.path")
    if not path:
        return ""
    q = a.get("url.query")
    target = f"{path}?{q}" if q else str(path)
    return "" if span.name.endswith(" " + target) else target


def _duration_ms(span: Span) -> str:
    ms = max(0, span.end_ns - span.start_ns) / 1e6
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


class ConsoleSpanExporter:
    """Renders every batch as trace trees. Spans of one trace arrive together from the correlator;
    a span whose parent is not in the batch (it came earlier, or from an untraced process) is shown at
    the top level with a marker rather than hidden."""

    def __init__(self, stream: TextIO | None = None, colour: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        if colour is None:
            # NO_COLOR (no-color.org) is the user's explicit wish; otherwise colour only for a terminal.
            isatty = getattr(self._stream, "isatty", None)
            colour = bool(isatty and isatty()) and "NO_COLOR" not in os.environ
        self._s = _Style(colour)
        self.last_error = ""
        self.last_failure_permanent = False

    def describe(self) -> str:
        return "console"

    def _line(self, span: Span, processes: Mapping[int, ProcessInfo], prefix: str, orphan: bool) -> str:
        s = self._s
        info = processes.get(span.pid)
        service = info.service_name if info else f"pid {span.pid}"
        code = span.attributes.get("http.response.status_code")
        err = span.status == StatusCode.ERROR
        parts = [f"{prefix}{s.cyan}{service}{s.reset}", f"{s.dim}{_KIND.get(span.kind, str(span.kind))}{s.reset}",
                 f"{s.bold}{span.name}{s.reset}"]
        target = _target(span)
        if target:
            parts.append(target)
        if code is not None:
            colour = s.red if err else (s.yellow if isinstance(code, int) and code >= 400 else s.green)
            parts.append(f"{colour}{code}{s.reset}")
        elif span.attributes.get("error.type"):
            parts.append(f"{s.red}{span.attributes['error.type']}{s.reset}")
        parts.append(f"{s.dim}{_duration_ms(span)}{s.reset}")
        if err:
            why = span.status_message or span.attributes.get("error.type") or ""
            parts.append(f"{s.red}✗{' ' + str(why) if why else ''}{s.reset}")
        if orphan:
            parts.append(f"{s.dim}(parent {span.parent_span_id.hex() if span.parent_span_id else '?'} "
                         f"not in this batch){s.reset}")
        return " ".join(parts)

    def render(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> str:
        traces: dict[bytes, list[Span]] = {}
        for sp in spans:
            traces.setdefault(sp.trace_id, []).append(sp)
        out: list[str] = []
        for trace_id, group in traces.items():
            self._render_trace(trace_id, group, processes, out)
        return "\n".join(out) + ("\n" if out else "")

    def _render_trace(
        self, trace_id: bytes, group: list[Span], processes: Mapping[int, ProcessInfo], out: list[str]
    ) -> None:
        s = self._s
        ids = {sp.span_id for sp in group}
        children: dict[bytes, list[Span]] = {}
        tops: list[Span] = []
        for sp in group:
            if sp.parent_span_id and sp.parent_span_id in ids and sp.parent_span_id != sp.span_id:
                children.setdefault(sp.parent_span_id, []).append(sp)
            else:
                tops.append(sp)
        tops.sort(key=lambda x: x.start_ns)
        errors = sum(1 for sp in group if sp.status == StatusCode.ERROR)
        head = f"{s.dim}trace {trace_id.hex()} · {len(group)} span{'s' if len(group) != 1 else ''}"
        if errors:
            head += f"{s.reset} {s.red}· {errors} error{'s' if errors != 1 else ''}"
        out.append(head + s.reset)
        seen: set[bytes] = set()

        def walk(sp: Span, prefix: str, child_prefix: str, orphan: bool) -> None:
            if sp.span_id in seen:  # a malformed parent cycle must not recurse forever
                return
            seen.add(sp.span_id)
            out.append(self._line(sp, processes, prefix, orphan))
            kids = sorted(children.get(sp.span_id, ()), key=lambda x: x.start_ns)
            for i, kid in enumerate(kids):
                last = i == len(kids) - 1
                walk(kid, child_prefix + ("└─ " if last else "├─ "), child_prefix + ("   " if last else "│  "), False)

        for top in tops:
            walk(top, "  ", "  ", bool(top.parent_span_id))
        # Anything unreached sits on a parent cycle: still show it.
        for sp in group:
            if sp.span_id not in seen:
                walk(sp, "  ", "  ", True)

    def export(self, spans: Sequence[Span], processes: Mapping[int, ProcessInfo]) -> bool:
        if not spans:
            return True
        try:
            self._stream.write(self.render(spans, processes))
            self._stream.flush()
        except (OSError, ValueError) as e:  # closed stdout or a broken pipe (`kspan | head`)
            self.last_error = f"cannot write to the console: {e}"
            self.last_failure_permanent = True
            return False
        return True

    def shutdown(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass
