"""The Grafana dashboard (deploy/grafana/outbox-dashboard.json) is well formed: unique panel
ids, panels that do not overlap, a Prometheus datasource on every query (the dashboard's own
datasource variable, so it imports into any Grafana), a description on every panel, no
query naming a metric that the relay or the consume loops do not export, and every relay series
filtered by the ``outbox`` variable. That each query
returns data from a real relay and consumer is tests/acceptance/test_dashboards.py's job."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.exported_metrics import exported, named_in

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "outbox-dashboard.json"
#: A relay metric in PromQL, with its label matchers if any.
RELAY_SELECTOR = re.compile(r"\b(outbox_relay_[a-z_]+)(\{[^}]*\})?")
#: The relay's metrics about the process itself, not about one outbox.
RELAY_LEVEL = {"outbox_relay_outboxes_served"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def test_panel_ids_are_unique_and_panels_do_not_overlap() -> None:
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_has_the_dashboards_prometheus_datasource() -> None:
    [variable] = [v for v in dashboard()["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    expected = {"type": "prometheus", "uid": f"${{{variable['name']}}}"}
    for panel in panels():
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_every_panel_has_a_title_and_says_what_it_shows() -> None:
    titles = [panel["title"] for panel in panels()]
    assert len(titles) == len(set(titles)), titles
    for panel in panels():
        assert len(panel["description"]) > 20, panel["title"]


def test_queries_name_only_metrics_that_are_exported() -> None:
    named = set().union(*map(named_in, queries()))
    assert named - exported() == set()


def test_the_panels_the_issue_asks_for_are_there() -> None:
    """Published by topic, backlog and age, batch size and duration, failures by reason, the
    breaker, shards per relay, dead letters, consumer throughput, duplicates and failures."""
    named = set().union(*map(named_in, queries()))
    assert named >= {
        "outbox_relay_events_published_total",
        "outbox_relay_backlog_events",
        "outbox_relay_oldest_unpublished_age_seconds",
        "outbox_relay_batch_size_sum",
        "outbox_relay_batch_duration_seconds_bucket",
        "outbox_relay_delivery_failures_total",
        "outbox_relay_circuit_breaker_state",
        "outbox_relay_shards_owned",
        "outbox_relay_events_dead_lettered_total",
        "outbox_consumer_messages_processed_total",
        "outbox_consumer_duplicates_skipped_total",
        "outbox_consumer_handler_failures_total",
        "outbox_consumer_lag_messages",
        "outbox_consumer_dead_lettered_total",
    }
    by_topic = [q for q in queries() if "outbox_relay_events_published_total" in q]
    assert any("by (outbox, topic)" in q for q in by_topic)
    assert any("by (outbox, reason)" in q for q in queries() if "delivery_failures" in q)
    assert any("by (instance, outbox)" in q for q in queries() if "shards_owned" in q)


def test_the_outbox_variable_picks_one_outbox_several_or_all() -> None:
    [variable] = [v for v in dashboard()["templating"]["list"] if v["name"] == "outbox"]
    assert variable["type"] == "query"
    assert variable["query"]["query"] == "label_values(outbox_relay_outbox_up, outbox)"
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    assert variable["allValue"] == ".*"


def test_every_relay_series_is_filtered_by_the_outbox_variable() -> None:
    """Each per-outbox metric a query names is selected with ``outbox=~"$outbox"``, and each
    query aggregating it keeps the outbox (a legend naming it) or counts the outboxes."""
    for panel in panels():
        for target in panel["targets"]:
            for name, matchers in RELAY_SELECTOR.findall(target["expr"]):
                if name in RELAY_LEVEL:
                    continue
                assert matchers == '{outbox=~"$outbox"}', f"{panel['title']}: {name}"
                kept = (
                    "{{outbox}}" in target["legendFormat"] or "outboxes" in target["legendFormat"]
                )
                assert kept, f"{panel['title']}: {target['legendFormat']}"


def test_a_panel_shows_the_outboxes_served_and_up() -> None:
    [panel] = [p for p in panels() if p["title"] == "Outboxes served / up"]
    named = set().union(*(named_in(t["expr"]) for t in panel["targets"]))
    assert named == {"outbox_relay_outboxes_served", "outbox_relay_outbox_up"}
