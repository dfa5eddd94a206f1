"""`outbox-relay run --metrics-port`: Prometheus metrics, /healthz and /readyz of a real relay.

The relay runs as a subprocess against the real PostgreSQL and broker; the figures it exposes are
compared with what reached Kafka and what is left in the table. The relay serves one outbox:
every series of it carries that outbox's name (``outbox``), read from ``outbox_relay_outbox_up``
rather than spelled here.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox import testing
from tests.acceptance.relay_harness import (
    broker_behind_proxy,
    create_topic,
    read_topic,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)
from tests.unit.test_metrics import DOCUMENTED

pytestmark = pytest.mark.kafka


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; connection errors count as status 0."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http to localhost
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def scrape(base: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> {sorted labels: value} of one /metrics scrape."""
    status, body = get(f"{base}/metrics")
    assert status == 200, body
    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for family in text_string_to_metric_families(body):
        values[f"family:{family.name}"][()] = 1
        for sample in family.samples:
            values[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return values


def metric(base: str, name: str) -> float:
    """One sample's value (0 when absent), or the sum over its labels."""
    return sum(scrape(base).get(name, {}).values())


def served_outbox(values: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> str:
    """The name of the one outbox the relay serves, from its ``outbox_relay_outbox_up``."""
    [labels] = values["outbox_relay_outbox_up"]
    return dict(labels)["outbox"]


def metrics_args(port: int) -> list[str]:
    return ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]


def test_metrics_count_what_reached_kafka(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A single relay drains N events: published counter == distinct events on the topic,
    backlog 0, 256 shards, its outbox up, every series labelled with it; every documented
    metric exists; /healthz and /readyz say 200."""
    topic, other = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 400, keys=20)
    ids += write_events(database_url, other, 100, keys=5)
    port = testing.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_relay(
        database_url,
        kafka_bootstrap,
        "--batch-size",
        "50",
        *metrics_args(port),
        log=tmp_path / "relay.log",
    )
    try:
        wait_until(lambda: get(f"{base}/healthz")[0] == 200, 20)
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, 20)
        wait_until(lambda: unpublished(database_url) == 0, 30)
        # The backlog gauges are refreshed every few seconds.
        wait_until(lambda: metric(base, "outbox_relay_backlog_events") == 0, 20)

        values = scrape(base)
        families = {name.removeprefix("family:") for name in values if name.startswith("family:")}
        assert families >= DOCUMENTED, DOCUMENTED - families
        outbox = served_outbox(values)
        only = (("outbox", outbox),)
        assert values["outbox_relay_outbox_up"] == {only: 1}
        assert values["outbox_relay_outboxes_served"][()] == 1
        published = values["outbox_relay_events_published_total"]
        assert published[(("outbox", outbox), ("topic", topic))] == 400
        assert published[(("outbox", outbox), ("topic", other))] == 100
        assert values["outbox_relay_shards_owned"] == {only: 256}
        assert values["outbox_relay_oldest_unpublished_age_seconds"] == {only: 0}
        assert values["outbox_relay_circuit_breaker_state"] == {only: 0}
        assert values["outbox_relay_batch_size_sum"] == {only: 500}
        assert values["outbox_relay_batch_size_count"][only] >= 10  # batches of 50 at most
        assert values["outbox_relay_batch_duration_seconds_count"][only] >= 10
        assert sum(values.get("outbox_relay_delivery_failures_total", {}).values()) == 0
        assert sum(values.get("outbox_relay_events_dead_lettered_total", {}).values()) == 0
        labelled = {
            dict(labels).get("outbox")
            for name, samples in values.items()
            if name.startswith("outbox_relay_") and name != "outbox_relay_outboxes_served"
            for labels in samples
        }
        assert labelled == {outbox}
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (200, "ok\n")
    finally:
        code = stop(proc)
    assert code == 0, (tmp_path / "relay.log").read_text()

    delivered = {r.event_id for r in read_topic(kafka_bootstrap, topic, expect_ids=set(ids[:400]))}
    delivered |= {r.event_id for r in read_topic(kafka_bootstrap, other, expect_ids=set(ids[400:]))}
    assert delivered == set(ids)
    assert sum(published.values()) == len(delivered)


def test_readyz_follows_the_broker(database_url: str, tmp_path: Path) -> None:
    """Cutting the broker off makes /readyz 503 (naming Kafka) while /healthz stays 200 and the
    breaker opens; after the restore /readyz is 200 again and the backlog drains."""
    port = testing.free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "relay.log"
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        ids = write_events(database_url, topic, 20, keys=4)
        proc = start_relay(
            database_url,
            bootstrap,
            *metrics_args(port),
            "--delivery-timeout",
            "2",
            "--breaker-threshold",
            "1",
            log=log,
        )
        try:
            wait_until(lambda: unpublished(database_url) == 0, 30)
            wait_until(lambda: get(f"{base}/readyz") == (200, "ok\n"), 20)

            proxy.cut()
            wait_until(lambda: get(f"{base}/readyz")[0] == 503, 20)
            status, reason = get(f"{base}/readyz")
            assert status == 503
            assert reason.startswith("kafka: "), reason
            assert "database" not in reason
            ids += write_events(database_url, topic, 10, keys=4)
            wait_until(lambda: metric(base, "outbox_relay_circuit_breaker_state") == 2, 20)
            assert get(f"{base}/healthz") == (200, "ok\n")
            assert metric(base, "outbox_relay_delivery_failures_total") > 0

            proxy.restore()
            wait_until(lambda: get(f"{base}/readyz") == (200, "ok\n"), 30)
            wait_until(lambda: unpublished(database_url) == 0, 30)
            wait_until(lambda: metric(base, "outbox_relay_circuit_breaker_state") == 0, 10)
        finally:
            code = stop(proc)
        assert code == 0, log.read_text()
        received = read_topic(bootstrap, topic, expect_ids=set(ids))
        assert {r.event_id for r in received} == set(ids)
