"""The Prometheus scrape endpoint: kspan's metrics in the Prometheus text format, served on request.

It serves the same cumulative snapshot the OTLP metrics path exports (MetricsAggregator.collect()),
translated by the OpenTelemetry -> Prometheus compatibility rules, so a dashboard written against
either backend sees the same numbers under the names each one expects:

- names: every run of characters outside [a-zA-Z0-9] becomes one "_"; the unit is appended as a word
  ("s" -> "_seconds", "By" -> "_bytes", "By/s" -> "_bytes_per_second") unless the name already holds
  it; annotations in braces ("{request}") are dropped; monotonic sums end in "_total"; gauges of
  unit "1" end in "_ratio". So http.server.request.duration is http_server_request_duration_seconds
  (_bucket, _sum, _count) and kspan.records.lost is kspan_records_lost_total.
- labels: attribute keys with "." and other characters outside [a-zA-Z0-9_] replaced by "_"; keys
  that collide after that have their values joined with ";". Each series also carries its
  resource's service_name (and service_namespace where set); a target_info series per resource
  carries all its resource attributes, to join on when more are wanted.

Series that become identical once translated (two pods of one service on one node, told apart only
by attributes Prometheus labels leave out) are summed, as Prometheus requires one sample per label
set. What cannot be expressed (one name with two types, histograms with different buckets) is
counted in kspan_prometheus_conflicts_total, never served twice.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricsData, Sum
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric as PromMetric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporters.config import ConfigError

log = logging.getLogger("kspan.exporters")

DEFAULT_ADDRESS = "127.0.0.1"
# The resource attributes every series carries as labels: enough to tell services apart without a
# join; the rest is on target_info.
PROMOTED_RESOURCE_ATTRIBUTES = ("service.name", "service.namespace")

# The OpenTelemetry collector's Prometheus translator tables (UCUM unit -> Prometheus word).
_UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius",
    "Hz": "hertz", "%": "percent", "1": "",
}
_PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
_NON_ALNUM = re.compile(r"[^a-zA-Z0-9]+")
_BAD_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_BRACES = re.compile(r"\{[^}]*\}")


def _unit_words(unit: str) -> list[str]:
    """["seconds"] for "s", ["bytes", "per", "second"] for "By/s", [] for "{request}" or "1"."""
    unit = _BRACES.sub("", unit).strip()
    if not unit:
        return []
    main, _, per = unit.partition("/")
    words: list[str] = []
    main = main.strip()
    if main:
        word = _UNIT_WORDS.get(main, main)
        words += [w for w in _NON_ALNUM.split(word) if w]
    per = per.strip()
    if per:
        word = _PER_UNIT_WORDS.get(per, per)
        words += ["per"] + [w for w in _NON_ALNUM.split(word) if w]
    return words


def metric_name(name: str, unit: str, kind: str) -> str:
    """The Prometheus family name of an OpenTelemetry metric. kind is "counter" (a monotonic sum),
    "gauge" or "histogram". Counters come back with their "_total" (the sample name)."""
    tokens = [t for t in _NON_ALNUM.split(name) if t]
    if kind == "counter":
        # "total" belongs at the end only, once.
        tokens = [t for t in tokens if t != "total"]
    unit_tokens = _unit_words(unit)
    if unit_tokens and not _contains(tokens, unit_tokens):
        tokens += unit_tokens
    if kind == "gauge" and unit.strip() == "1" and "ratio" not in tokens:
        tokens.append("ratio")
    if kind == "counter":
        tokens.append("total")
    out = "_".join(tokens) or "unnamed"
    return "_" + out if out[0].isdigit() else out


def _contains(tokens: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(tokens[i:i + n] == sub for i in range(len(tokens) - n + 1))


def label_name(key: str) -> str:
    out = _BAD_LABEL_CHARS.sub("_", key) or "key"
    if out[0].isdigit():
        out = "key_" + out
    elif out.startswith("__"):
        out = "key" + out  # "__" names are Prometheus's own
    return out


def label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value), separators=(",", ":"))
    return str(value)


def _labels(attrs: Mapping[str, Any], base: Mapping[str, str] | None = None) -> dict[str, str]:
    out: dict[str, str] = dict(base or {})
    own: dict[str, list[str]] = {}
    for k, v in sorted(attrs.items()):
        own.setdefault(label_name(k), []).append(label_value(v))
    for name, values in own.items():
        if base and name in base:
            # A point attribute never hides the resource's label: Prometheus's own convention.
            name = "exported_" + name
        out[name] = ";".join(values)
    return out


@dataclass
class _Family:
    name: str  # for counters without "_total", as prometheus_client wants it
    kind: str
    help: str
    unit_word: str
    bounds: tuple[float, ...] = ()
    # label set -> [value] for counters/gauges, [count, sum, bucket counts...] for histograms
    series: dict[tuple[tuple[str, str], ...], list[float]] = field(default_factory=dict)


class Translation:
    """One snapshot (MetricsData) translated to Prometheus families."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}
        self.conflicts = 0
        self._targets: dict[tuple[tuple[str, str], ...], None] = {}

    def add(self, data: MetricsData) -> None:
        for rm in data.resource_metrics:
            rattrs = dict(rm.resource.attributes)
            base = {label_name(k): label_value(rattrs[k]) for k in PROMOTED_RESOURCE_ATTRIBUTES if k in rattrs}
            self._targets[tuple(sorted(_labels(rattrs).items()))] = None
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    self._metric(m, base)

    def _family(self, name: str, unit: str, kind: str, help_text: str,
                bounds: tuple[float, ...] = ()) -> _Family | None:
        full = metric_name(name, unit, kind)
        key = full[: -len("_total")] if kind == "counter" else full
        fam = self.families.get(key)
        if fam is None:
            words = _unit_words(unit)
            word = "_".join(words) if words and key.endswith("_" + "_".join(words)) else ""
            fam = self.families[key] = _Family(key, kind, help_text or name, word, bounds)
        elif fam.kind != kind or fam.bounds != bounds:
            return None
        return fam

    def _metric(self, m: Any, base: Mapping[str, str]) -> None:
        d = m.data
        if isinstance(d, Histogram):
            for p in d.data_points:
                bounds = tuple(float(b) for b in p.explicit_bounds)
                fam = self._family(m.name, m.unit, "histogram", m.description, bounds)
                if fam is None or len(p.bucket_counts) != len(bounds) + 1:
                    self.conflicts += 1
                    continue
                key = tuple(sorted(_labels(p.attributes, base).items()))
                row = fam.series.get(key)
                new = [float(p.count), float(p.sum), *(float(c) for c in p.bucket_counts)]
                fam.series[key] = new if row is None else [a + b for a, b in zip(row, new, strict=True)]
            return
        if isinstance(d, Sum):
            kind = "counter" if d.is_monotonic else "gauge"
        elif isinstance(d, Gauge):
            kind = "gauge"
        else:
            self.conflicts += len(getattr(d, "data_points", ()))
            return
        for p in d.data_points:
            fam = self._family(m.name, m.unit, kind, m.description)
            if fam is None:
                self.conflicts += 1
                continue
            key = tuple(sorted(_labels(p.attributes, base).items()))
            row = fam.series.get(key)
            if row is None:
                fam.series[key] = [float(p.value)]
            elif kind == "counter":
                row[0] += float(p.value)
            else:
                self.conflicts += 1  # two gauges on one label set: a sum would mean nothing

    def metrics(self) -> list[PromMetric]:
        out: list[PromMetric] = []
        for fam in self.families.values():
            pm = PromMetric(fam.name, fam.help, fam.kind, fam.unit_word)
            for key, row in fam.series.items():
                labels = dict(key)
                if fam.kind == "histogram":
                    cumulative = 0.0
                    for bound, count in zip((*fam.bounds, float("inf")), row[2:], strict=True):
                        cumulative += count
                        pm.add_sample(fam.name + "_bucket", {**labels, "le": floatToGoString(bound)}, cumulative)
                    pm.add_sample(fam.name + "_count", labels, row[0])
                    pm.add_sample(fam.name + "_sum", labels, row[1])
                elif fam.kind == "counter":
                    pm.add_sample(fam.name + "_total", labels, row[0])
                else:
                    pm.add_sample(fam.name, labels, row[0])
            out.append(pm)
        info = PromMetric("target", "Resource attributes of the services (and of kspan) these metrics describe.",
                          "info")
        for key in self._targets:
            info.add_sample("target_info", dict(key), 1.0)
        if info.samples:
            out.append(info)
        return out


class KspanCollector(Collector):
    """A prometheus_client collector over a snapshot source (MetricsAggregator.collect)."""

    def __init__(self, source: Callable[[], MetricsData]) -> None:
        self._source = source
        self._lock = threading.Lock()
        self.conflicts = 0
        self.scrapes = 0

    def collect(self) -> Iterable[PromMetric]:
        t = Translation()
        t.add(self._source())
        with self._lock:
            self.scrapes += 1
            # Each scrape sees the whole snapshot again: keep the worst count, not a running sum.
            self.conflicts = max(self.conflicts, t.conflicts)
            conflicts = self.conflicts
        fams = t.metrics()
        c = PromMetric("kspan_prometheus_conflicts", "Points left out of /metrics because Prometheus cannot "
                       "express them (one name with two types, or histograms with different buckets).", "counter")
        c.add_sample("kspan_prometheus_conflicts_total", {}, float(conflicts))
        fams.append(c)
        return fams


def registry_for(source: Callable[[], MetricsData], process: bool = True) -> CollectorRegistry:
    """kspan's metrics plus, when process is True, the agent's own process_* metrics (CPU, memory, fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KspanCollector(source))
    if process:
        ProcessCollector(registry=registry)
    return registry


def exposition(source: Callable[[], MetricsData], process: bool = False) -> str:
    """The /metrics body for a snapshot source (the Prometheus text format, version 0.0.4)."""
    return generate_latest(registry_for(source, process)).decode()


class PrometheusEndpoint:
    """An HTTP server answering GET /metrics on its own threads, until close()."""

    def __init__(self, source: Callable[[], MetricsData], address: str = DEFAULT_ADDRESS, port: int = 9464) -> None:
        self.address = address
        self.registry = registry_for(source)
        try:
            self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"--prometheus-port {port} on {address}: cannot listen ({e.strerror or e}); "
                              f"choose a free port (or another --prometheus-address)") from None
        self.port = int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
