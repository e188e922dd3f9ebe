"""The operations kit in deploy/: the PrometheusRule's alerts fire under `promtool test rules`,
each has a test, and the monitoring manifests are what the overlay ships. That every metric
they (and the dashboard and KEDA) query is really exported: tests/integration/test_metrics_live.py.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path
from typing import Any

from tests.support.tools import require_tool

yaml: Any = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "k8s" / "monitoring"
RULE = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests" / "alerts.test.yaml"


def rule_spec() -> dict[str, Any]:
    doc = yaml.safe_load(RULE.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    spec: dict[str, Any] = doc["spec"]
    return spec


def alerts() -> dict[str, dict[str, Any]]:
    return {
        rule["alert"]: rule
        for group in rule_spec()["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def prepared_tests(folder: Path) -> Path:
    """rules.yaml (the PrometheusRule's spec) and the test file beside it, with exp_annotations
    taken from the rule where the test gives none and the rule's text has no template."""
    (folder / "rules.yaml").write_text(yaml.safe_dump(rule_spec()), encoding="utf-8")
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    assert tests["rule_files"] == ["rules.yaml"]
    rules = alerts()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            annotations = rules[check["alertname"]].get("annotations", {})
            for expected in check.get("exp_alerts", []):
                if "exp_annotations" not in expected and "{{" not in str(annotations):
                    expected["exp_annotations"] = annotations
    path = folder / "alerts.test.yaml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("promtool")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_rules_are_valid(tmp_path: Path) -> None:
    prepared_tests(tmp_path)
    result = promtool("check", "rules", str(tmp_path / "rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_its_unit_test(tmp_path: Path) -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))
    fired = {
        check["alertname"]
        for case in tests["tests"]
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert fired == set(alerts()), "an alert without a test that makes it fire"
    result = promtool("test", "rules", str(prepared_tests(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_readme_table() -> None:
    """Each metric the README says to alert on has an alert that queries it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Metrics and what to alert on", 1)[1].split("\n\n", 2)[1]
    wanted: set[str] = set()
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[-1] not in ("—", "-", ""):
            wanted.add(cells[0].split("`")[1].split("{")[0])
    exprs = " ".join(rule["expr"] for rule in alerts().values())
    missing = {name for name in wanted if name not in exprs}
    assert not missing, f"README alerts without a rule: {missing}"


def test_monitoring_kustomization_lists_its_files() -> None:
    kust = yaml.safe_load((MONITORING / "kustomization.yaml").read_text(encoding="utf-8"))
    assert set(kust["resources"]) == {p.name for p in MONITORING.glob("*.yaml")} - {
        "kustomization.yaml"
    }
    overlay = yaml.safe_load(
        (ROOT / "deploy/k8s/overlays/example/kustomization.yaml").read_text(encoding="utf-8")
    )
    assert "../../monitoring" in overlay["resources"]


def test_pod_monitors_scrape_named_ports_of_serve_and_worker() -> None:
    docs = list(yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text(encoding="utf-8")))
    ports = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: [
            e["port"] for e in d["spec"]["podMetricsEndpoints"]
        ]
        for d in docs
    }
    assert ports == {"serve": ["http"], "worker": ["metrics"]}
    for name, port in (("serve", "http"), ("worker", "metrics")):
        deployment = yaml.safe_load(
            (ROOT / f"deploy/k8s/base/deployment-{name}.yaml").read_text(encoding="utf-8")
        )
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert port in {p["name"] for p in container["ports"]}
