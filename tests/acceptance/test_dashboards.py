"""The dashboard and the alert rules against a real Prometheus (Debian's ``prometheus``),
scraping a real relay and a real consume loop on the test servers while events keep coming.

Prometheus runs with the Compose stack's own ``deploy/prometheus/prometheus.yml`` (its job
names, its rule file), only with the targets pointed at this test's relay and consumer and
scraping every second. Then:

- every query of the dashboard returns at least one series (with every outbox picked in its
  ``outbox`` variable), and every series of the relay but its process-wide ones carries the
  ``outbox`` label;
- every alert expression can be answered: each of its operands returns at least one series
  (a comparison is asked with ``bool``, so that a quiet alert still shows its series, and
  ``absent(x)`` is asked as ``x``); a rule naming a label or a metric that is not there fails;
- when the relay stops publishing (its path to the broker is cut: the process lives on and
  reports) while events keep coming, the lag alert's expression becomes true and Prometheus,
  evaluating the shipped rule file, puts OutboxLagging in pending state.

When every relay process is down there is no lag figure at all (the relays report it); that
case is OutboxRelayDown's, which promtool tests (test_alert_rules.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import yaml
from confluent_kafka import Message
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox import testing, urls
from outbox.consumer import ConsumeLoop, ConsumerSettings
from tests.acceptance.relay_harness import (
    TcpProxy,
    broker_behind_proxy,
    create_topic,
    start_relay,
    stop,
    wait_until,
)
from tests.unit.test_dashboard import DASHBOARD, queries

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus is not installed (Debian: apt-get install prometheus)",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "outbox-rules.yml"
#: What Grafana's $__rate_interval becomes here: four scrapes at 1 s, and some.
RATE_INTERVAL = "10s"
#: What the dashboard's outbox variable becomes with "All" picked.
ALL_OUTBOXES = ".*"
LAG_ALERT = "OutboxLagging"
#: Where to draw a picture of the dashboard's panels from this run (make dashboard-picture).
PICTURE_ENV = "OUTBOX_DASHBOARD_PNG"


def as_grafana_sends(expr: str) -> str:
    """A dashboard query with its variables replaced as Grafana does (every outbox picked)."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$outbox", ALL_OUTBOXES)


class Prometheus:
    """A Prometheus server's HTTP API."""

    def __init__(self, base: str) -> None:
        self.base = base

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - localhost
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series an instant query returns now."""
        data = self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def alert_states(self, name: str) -> set[str]:
        """The states (pending, firing) of the alerts called ``name``."""
        alerts = self.get("/api/v1/alerts")["alerts"]
        return {a["state"] for a in alerts if a["labels"]["alertname"] == name}


@dataclass
class Stack:
    prometheus: Prometheus
    proxy: TcpProxy
    written: list[int]
    started: float  # when Prometheus started scraping (Unix time)


def prometheus_config(relay: str, consumer: str) -> dict[str, Any]:
    """The Compose stack's Prometheus configuration, scraping every second this test's relay
    and consumer under the same job names, with the repository's rule file."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    targets = {"outbox-relay": [relay], "outbox-consumer": [consumer]}
    assert {job["job_name"] for job in config["scrape_configs"]} == set(targets)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config


@contextlib.contextmanager
def prometheus_server(config: dict[str, Any], directory: Path) -> Iterator[Prometheus]:
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = testing.free_port()
    with open(directory / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        testing.wait_for_port("127.0.0.1", port, timeout=30, process=proc)
        server = Prometheus(f"http://127.0.0.1:{port}")
        wait_until(lambda: ready(server), timeout=30)
        yield server
    finally:
        stop(proc, timeout=30)


def ready(server: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{server.base}/-/ready", timeout=5) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


def keep_writing(database_url: str, topic: str, written: list[int], stop: threading.Event) -> None:
    """Five events every 200 ms until told to stop: events keep coming."""
    with psycopg.connect(database_url) as conn:
        n = 0
        while not stop.wait(0.2):
            events = [outbox.Event(topic, {"n": n + i}, key=f"key-{i}") for i in range(5)]
            with conn.transaction():
                written.extend(outbox.add_many(conn, events))
            n += 5


def handle(session: Session, message: Message) -> None:
    """The consumer's side effect is its dedup claim alone."""


@pytest.fixture(scope="module")
def stack(
    pg_server: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("dashboards")
    name = testing.unique_name("outbox_dash")
    database_url = testing.create_database(pg_server, name, template=template_database)
    relay_port, consumer_port = testing.free_port(), testing.free_port()
    written: list[int] = []
    stopping = threading.Event()
    engine = sa.create_engine(urls.to_sqlalchemy(database_url))
    try:
        with broker_behind_proxy(directory) as (bootstrap, proxy):
            topic = create_topic(bootstrap, partitions=2)
            writer = threading.Thread(
                target=keep_writing, args=(database_url, topic, written, stopping), daemon=True
            )
            writer.start()
            relay = start_relay(
                database_url,
                bootstrap,
                *("--metrics-port", str(relay_port), "--metrics-host", "127.0.0.1"),
                *("--delivery-timeout", "2", "--breaker-threshold", "1"),
                log=directory / "relay.log",
            )
            consumer = ConsumeLoop(
                ConsumerSettings(
                    testing.unique_name("billing"),
                    [topic],
                    bootstrap,
                    batch_size=50,
                    kafka_config={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"},
                    metrics_port=consumer_port,
                    metrics_host="127.0.0.1",
                ),
                handle,
                sessionmaker(engine),
            )
            consuming = threading.Thread(
                target=consumer.run, kwargs={"handle_signals": False}, daemon=True
            )
            consuming.start()
            config = prometheus_config(f"127.0.0.1:{relay_port}", f"127.0.0.1:{consumer_port}")
            try:
                with prometheus_server(config, directory) as prometheus:
                    started = time.time()
                    wait_until(lambda: consumer.stats.processed >= 50, timeout=60)
                    # Enough samples for every rate window of the dashboard.
                    enough = 'count_over_time(up{job="outbox-consumer"}[1m]) >= 15'
                    wait_until(lambda: bool(prometheus.query(enough)), timeout=60, interval=1)
                    yield Stack(prometheus, proxy, written, started)
            finally:
                stopping.set()
                writer.join(timeout=10)
                consumer.stop()
                consuming.join(timeout=30)
                stop(relay)
    finally:
        engine.dispose()
        testing.drop_database(pg_server, name)


def test_prometheus_scrapes_the_relay_and_the_consumer(stack: Stack) -> None:
    up = {s["metric"]["job"]: s["value"][1] for s in stack.prometheus.query("up")}
    assert up == {"outbox-relay": "1", "outbox-consumer": "1"}


def test_every_dashboard_query_returns_a_series(stack: Stack) -> None:
    empty = []
    for query in queries():
        expr = as_grafana_sends(query)
        if not stack.prometheus.query(expr):
            empty.append(expr)
    assert not empty, "queries without a series:\n" + "\n".join(empty)


def test_the_relays_series_are_labelled_with_their_outbox(stack: Stack) -> None:
    """The relay serves one outbox: every series of its own but the process-wide ones carries
    that outbox's name, the one the dashboard's variable lists."""
    [outbox] = {s["metric"]["outbox"] for s in stack.prometheus.query("outbox_relay_outbox_up")}
    assert outbox
    unlabelled = stack.prometheus.query('{__name__=~"outbox_relay_.+", outbox=""}')
    assert {s["metric"]["__name__"] for s in unlabelled} == {"outbox_relay_outboxes_served"}
    labelled = stack.prometheus.query('count by (outbox) ({__name__=~"outbox_relay_.+"})')
    assert {s["metric"].get("outbox") for s in labelled} == {outbox, None}


COMPARISON = re.compile(r"(?<![=!<>])(==|!=|>=|<=|>|<)(?!=)")


def operands(expr: str) -> list[str]:
    """An alert expression's operands as queries that return a series whether the alert fires
    or not: split at ``and``/``unless``/``or``, the comparison asked with ``bool``, and
    ``absent(x)`` asked as ``x``."""
    parts = re.split(r"\s+(?:and|unless|or)\s+", " ".join(expr.split()))
    answerable = []
    for part in parts:
        part = re.sub(r"^(?:on|ignoring)\s*\([^)]*\)\s*", "", part)  # the operator's matching
        inner = re.fullmatch(r"absent\((.*)\)", part)
        part = inner.group(1) if inner else part
        answerable.append(COMPARISON.sub(r"\1 bool", part, count=1))
    return answerable


def test_operands_are_split_and_asked_with_bool() -> None:
    assert operands('absent(up{job="x"} == 1)') == ['up{job="x"} == bool 1']
    assert operands("sum(a) > 0\n  unless sum(b) > 0") == ["sum(a) > bool 0", "sum(b) > bool 0"]
    assert operands("max by (o) (a) unless on (o) max by (o) (b)") == [
        "max by (o) (a)",
        "max by (o) (b)",
    ]


def test_every_alert_expression_can_be_answered(stack: Stack) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    empty = []
    for rule in (rule for group in groups for rule in group["rules"]):
        for query in operands(rule["expr"]):
            if not stack.prometheus.query(query):
                empty.append(f"{rule['alert']}: {query}")
    assert not empty, "operands without a series:\n" + "\n".join(empty)


def test_the_lag_alert_becomes_true_when_the_relay_stops_publishing(stack: Stack) -> None:
    """Events keep coming; the relay's path to the broker is cut. The oldest unpublished age
    passes 60 s, the expression of OutboxLagging returns its series, and Prometheus puts the
    alert in pending (it fires after its ``for: 5m``, not waited for here)."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    [expr] = [r["expr"] for g in groups for r in g["rules"] if r.get("alert") == LAG_ALERT]
    prometheus = stack.prometheus
    assert prometheus.query(expr) == [], "lagging while the relay publishes"

    assert prometheus.alert_states(LAG_ALERT) == set()

    stack.proxy.cut()
    cut_at = time.time()
    try:
        written_before = len(stack.written)
        wait_until(lambda: bool(prometheus.query(expr)), timeout=120, interval=1)
        [series] = prometheus.query(expr)
        assert float(series["value"][1]) > 60
        assert len(stack.written) > written_before, "events stopped coming"
        wait_until(lambda: "pending" in prometheus.alert_states(LAG_ALERT), timeout=30, interval=1)
    finally:
        stack.proxy.restore()
    if os.environ.get(PICTURE_ENV):
        picture(stack, cut_at, Path(os.environ[PICTURE_ENV]))


def picture(stack: Stack, cut_at: float, path: Path) -> None:
    """Draw some of the dashboard's panels from what Prometheus recorded during this module."""
    from tests.acceptance import dashboard_picture  # matplotlib: the docs extra, only here

    end = time.time()
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    drawn: dict[str, list[dashboard_picture.Line]] = {}
    for title in dashboard_picture.PANELS:
        lines = drawn.setdefault(title, [])
        for target in panels[title]["targets"]:
            data = stack.prometheus.get(
                "/api/v1/query_range",
                query=as_grafana_sends(target["expr"]),
                start=str(stack.started),
                end=str(end),
                step="1",
            )
            for series in data["result"]:
                lines.append(
                    dashboard_picture.Line(
                        dashboard_picture.legend(target["legendFormat"], series["metric"]),
                        [float(t) - stack.started for t, _ in series["values"]],
                        [float(v) for _, v in series["values"]],
                    )
                )
    marks = {"relay cut off from Kafka": cut_at - stack.started}
    dashboard_picture.draw(drawn, marks, path)
