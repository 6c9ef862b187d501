"""docker/prometheus and docker/grafana: valid for Prometheus itself, and about metrics pacs-ai exports.

``promtool`` (Debian's ``prometheus`` package, installed by scripts/test) checks the
alert rules, runs their unit tests (``prometheus/alerts_test.yml`` beside this file:
each alert fires on the series it is meant for, with its labels and text), checks
the scrape configuration, and parses every query of the Grafana dashboard as a
recording rule.  Every metric a rule, a panel or the README names must be one that
:mod:`pacs_ai.metrics` exports, so a renamed metric cannot leave a silent alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pacs_ai import metrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "docker" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = REPO / "docker" / "grafana" / "pacs-ai.json"
ALERT_TESTS = Path(__file__).resolve().parent / "prometheus" / "alerts_test.yml"

_METRIC = re.compile(r"\bpacs_ai_[a-z0-9_]+")
_HISTOGRAM_SERIES = re.compile(r"_(bucket|sum|count)$")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    assert executable, "promtool is missing: `apt-get install prometheus` (scripts/test installs it)"
    return subprocess.run([executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def unknown_metrics(query: str) -> set[str]:
    """Metric names in ``query`` that pacs-ai does not export (a histogram's series count as it)."""
    exported = set(metrics.metric_names())
    named = _METRIC.findall(query)
    return {name if name in exported else _HISTOGRAM_SERIES.sub("", name) for name in named} - exported


def test_the_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_each_alert_fires_on_what_it_is_meant_for() -> None:
    tested = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups: [{name: x, rules: [{alert: X, expr: 'rate(pacs_ai_jobs_total[5m]'}]}]\n", encoding="utf-8"
    )
    assert promtool("check", "rules", str(broken)).returncode != 0


def test_the_scrape_config_passes_promtool(tmp_path: Path) -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where docker-compose.yml mounts it
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config), encoding="utf-8")
    checked = promtool("check", "config", str(local))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pacs-ai-receiver"]["static_configs"][0]["targets"] == ["receiver:9180"]
    assert all(target.endswith(":9181") for target in jobs["pacs-ai-workers"]["static_configs"][0]["targets"])


def test_every_alert_names_metrics_pacs_ai_exports() -> None:
    rules = alert_rules()
    wanted = {
        "PacsAiListenerDown",
        "PacsAiIngestErrors",
        "PacsAiQueueBacklogGrowing",
        "PacsAiJobFailureRate",
        "PacsAiDeliveryFailed",
        "PacsAiStorageBacklog",
        "PacsAiDiskAlmostFull",
        "PacsAiWorkerLost",
    }
    assert wanted <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert _METRIC.search(rule["expr"]), f"{rule['alert']} names no pacs-ai metric"
        assert not unknown_metrics(rule["expr"]), f"{rule['alert']}: {unknown_metrics(rule['expr'])}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert unknown_metrics("rate(pacs_ai_no_such_metric_total[5m])") == {"pacs_ai_no_such_metric_total"}


def test_every_dashboard_query_parses_and_names_exported_metrics(tmp_path: Path) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    for query in queries:
        assert not unknown_metrics(query), f"{query}: {unknown_metrics(query)}"
    # Grafana's variables as Prometheus would receive them; each query checked as a recording rule.
    rules = [
        {"record": f"pacs_ai_dashboard:query_{index}", "expr": query}
        for index, query in enumerate(
            query.replace("$__rate_interval", "5m").replace("$instance", ".*") for query in queries
        )
    ]
    rules_file = tmp_path / "dashboard-queries.yml"
    document = {"groups": [{"name": "dashboard", "rules": rules}]}
    rules_file.write_text(yaml.safe_dump(document), encoding="utf-8")
    checked = promtool("check", "rules", str(rules_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # Every metric pacs-ai exports has a panel.
    shown = {name for query in queries for name in _METRIC.findall(query)}
    shown |= {_HISTOGRAM_SERIES.sub("", name) for name in shown}
    assert set(metrics.metric_names()) <= shown, sorted(set(metrics.metric_names()) - shown)


def test_the_operations_guide_lists_exactly_the_exported_metrics() -> None:
    guide = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    match = re.search(r"^#+ Metrics\n(.*?)(?=^#+ )", guide, flags=re.MULTILINE | re.DOTALL)
    assert match, "docs/operations.md has no Metrics section"
    listed = set(re.findall(r"`(pacs_ai_[a-z0-9_]+)`", match.group(1)))
    assert listed == set(metrics.metric_names())


@pytest.mark.parametrize("value", ["CT_SCANNER", "1.2.840.113619.2.55", "Doe^John", 'x"}\n'])
def test_label_values_are_kept_to_safe_characters(value: str) -> None:
    cleaned = metrics.label(value, 16)
    assert len(cleaned) <= 16 and re.fullmatch(r"[A-Za-z0-9_.:+\- ]+", cleaned)
