"""The Prometheus alert rules shipped in deploy/prometheus: they parse (``promtool check
rules``), their unit tests pass (``promtool test rules``: series that must fire each alert and
series that must not), every alert has both kinds of test, every metric they name is one
the relay or the consume loops export, and every alert about an outbox is computed and named per
outbox (two outboxes in its tests, only one firing).

promtool comes from Debian's ``prometheus`` package (``.ci/run`` installs it when missing);
without it these tests skip and say so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.exported_metrics import exported, named_in

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = RULES_DIR / "outbox-rules.yml"
RULE_TESTS = RULES_DIR / "outbox-rules.test.yml"
PROMTOOL = shutil.which("promtool")
OUTBOX_LABEL = re.compile(r'outbox="([^"]*)"')
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@needs_promtool
def test_the_rules_parse() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


@needs_promtool
def test_the_rules_unit_tests_pass() -> None:
    tested = promtool("test", "rules", RULE_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@needs_promtool
def test_a_broken_rule_is_caught(tmp_path: Path) -> None:
    """The check can fail: a rule with a syntax error in its expression is refused."""
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("> 60", "> > 60", 1))
    assert promtool("check", "rules", str(broken)).returncode != 0


def cases() -> list[dict[str, Any]]:
    return [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """For each alert, at least one evaluation that expects it to fire and one that expects
    nothing: a rule that always or never fires cannot pass both."""
    for alert in alerts():
        name = alert["alert"]
        fired = [c for c in cases() if c["alertname"] == name and c["exp_alerts"]]
        quiet = [c for c in cases() if c["alertname"] == name and not c["exp_alerts"]]
        assert fired, f"{name}: no test expects it to fire"
        assert quiet, f"{name}: no test expects it to stay quiet"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for alert in alerts():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]


def test_the_rules_name_only_metrics_the_relay_and_the_consumers_export() -> None:
    named = set().union(*(named_in(alert["expr"]) for alert in alerts()))
    assert {name.split("_")[1] for name in named} == {"relay", "consumer"}
    assert named - exported() == set()


def about_outboxes() -> list[dict[str, Any]]:
    """The alerts on a relay's series about an outbox (all but the scrape's ``up``)."""
    return [
        alert
        for alert in alerts()
        if any(name.startswith("outbox_relay_") for name in named_in(alert["expr"]))
    ]


def outboxes_in(test: dict[str, Any]) -> set[str]:
    """The outboxes a promtool test's series are about."""
    return {o for s in test["input_series"] for o in OUTBOX_LABEL.findall(s["series"])}


def test_every_alert_about_an_outbox_is_per_outbox() -> None:
    """Computed ``by (outbox)``, its summary naming the outbox, and a test where it fires for
    one outbox with the ``outbox`` label while another outbox's series are there too."""
    assert {a["alert"] for a in about_outboxes()} >= {"OutboxLagging", "OutboxDown"}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    for alert in about_outboxes():
        name = alert["alert"]
        assert "by (outbox)" in alert["expr"], name
        assert "{{ $labels.outbox }}" in alert["annotations"]["summary"], name
        fired_for_one = [
            case
            for test in tests
            if len(outboxes_in(test)) > 1
            for case in test.get("alert_rule_test", [])
            if case["alertname"] == name
            and len(case["exp_alerts"]) == 1
            and case["exp_alerts"][0]["exp_labels"].get("outbox") in outboxes_in(test)
        ]
        assert fired_for_one, f"{name}: no test fires it for one outbox of two"
