"""PromQL as the deploy/ files use it: the queries of the Grafana dashboard and the rules file, the
metric names they read, and kspan's real /metrics exposition to check those names against."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "kspan-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "kspan-rules.yaml"

# Grafana's variables in the dashboard, and a value that keeps a query valid PromQL.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__range": "1h", "__interval": "1m", "service": ".*", "job": ".*"}

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                       "bool", "offset", "inf", "nan", "atan2"})


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and every query variable (label_values(METRIC, ...))."""
    doc = json.loads(path.read_text())
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(doc["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in doc.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*\w+\s*\)\s*", q)
            assert m, f"variable {v['name']}: not a label_values(METRIC, LABEL) query: {q!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def rule_queries(path: Path = RULES) -> list[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text())
    return [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for g in doc["groups"] for r in g["rules"]]


def recorded_names(path: Path = RULES) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r}


def substitute_variables(expr: str) -> str:
    """The query as Prometheus receives it from Grafana; an unknown $variable is an error."""
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES.get(m.group(1), m.group(0)), expr)
    left = re.findall(r"\$\{?([A-Za-z_]\w*)", out)  # "$1" in label_replace is not a variable
    assert not left, f"unknown Grafana variables {left} in {expr!r}"
    return out


def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names, durations and
    numbers left out)."""
    s = _strip_strings(expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    s = re.sub(r"(?<![\w:.])\d[\w.]*", " ", s)  # numbers, 1e-3, 5m
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0) in _KEYWORDS:
            continue  # a function or aggregation, or an operator word
        names.add(m.group(0))
    return names


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def sample_names(exposition: str) -> set[str]:
    """Every sample name in a /metrics body (histograms as their _bucket, _sum and _count)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for fam in text_string_to_metric_families(exposition) for s in fam.samples}
