"""The names of the samples the relay and the consume loops export, read from their registries
(not from a list kept by hand): what a dashboard or an alert rule may query."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

from outbox.consumer_metrics import BrokerGauge, Progress
from outbox_relay.metrics import RelayMetrics

#: The sample names of each metric type beside the family's own name.
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}

#: Metric names as they appear in PromQL: ours and the process collector's.
METRIC_NAME = re.compile(r"\b(?:outbox_(?:relay|consumer)|process)_[a-z_]+\b")


def exported() -> set[str]:
    consumer = CollectorRegistry()
    Progress("consumer", ["topic"], consumer)
    BrokerGauge("consumer", consumer)
    names = set()
    for registry in (RelayMetrics().registry, consumer):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def named_in(promql: str) -> set[str]:
    """The metric names a PromQL text mentions."""
    return set(METRIC_NAME.findall(promql))
