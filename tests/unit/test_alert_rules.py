"""deploy/prometheus/kspan-rules.yaml through Prometheus's own promtool: it parses, its unit tests on
synthetic series pass, every alert has one, and the thresholds are the one place to change them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.ebpf import fail_or_skip

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "kspan-rules.yaml"
RULE_TESTS = RULES_DIR / "kspan-rules.test.yaml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        msg = "promtool is missing: `make setup` installs Debian's prometheus package"
        fail_or_skip(msg)
    return path


def _run(*args: str, cwd: Path = RULES_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    r = _run("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    r = _run("test", "rules", RULE_TESTS.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_expects_it_to_fire() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert {"KspanServiceHighErrorRate", "KspanServiceHighLatency"} <= alerts
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a["exp_alerts"]}
    tested = {a["alertname"] for t in tests for a in t.get("alert_rule_test", [])}
    assert alerts - firing <= {"KspanDroppingSpans"}, f"alerts never shown firing: {alerts - firing}"
    assert alerts <= tested, f"alerts without a test: {alerts - tested}"


def test_thresholds_are_the_documented_constants() -> None:
    records = {r["record"]: r["expr"].strip() for r in _rules() if "record" in r}
    assert records["kspan:alert_threshold:error_ratio"] == "vector(0.10)"
    assert records["kspan:alert_threshold:latency_seconds"] == "vector(0.5)"
    for r in _rules():
        if r.get("alert", "").endswith(("ErrorRate", "Latency")):
            assert "kspan:alert_threshold:" in r["expr"], f"{r['alert']} has its own threshold: {r['expr']}"


def test_editing_one_threshold_changes_what_fires(tmp_path: Path) -> None:
    # checkout fails 20% of its requests: with the threshold raised to 25% the test expecting its
    # alert must fail, on that alert. (Also shows the unit tests can fail.)
    text = RULES.read_text()
    rule = "expr: vector(0.10)"
    assert text.count(rule) == 1
    (tmp_path / RULES.name).write_text(text.replace(rule, "expr: vector(0.25)"))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    r = _run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "alertname: KspanServiceHighErrorRate" in out
    assert "alertname: KspanServiceHighLatency" not in out  # the other threshold did not move
