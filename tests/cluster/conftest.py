"""A three-node Apache Kafka cluster for the fault tests of ``tests/cluster``.

The folder is a separate, slower set (``OUTBOX_TEST_CLUSTER=1 pytest tests/cluster``): plain
``pytest`` collects it with the rest of ``tests`` and skips every test here with one reason.
It needs Java and Maven (``outbox.apache_kafka``); without them it skips with one line too.

The cluster is started once per module (about 10-20 s on two cores) and every node's client
listener sits behind a :class:`~tests.acceptance.relay_harness.TcpProxy`: the nodes advertise
the proxies' ports, so cutting one proxy cuts that broker off from every client while it stays
in the cluster (replication and the KRaft quorum use listeners of their own). Before each test,
``healthy_cluster`` brings back whatever an earlier test left down.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from outbox import apache_kafka, testing
from tests.acceptance.relay_harness import TcpProxy

ENABLE_ENV = "OUTBOX_TEST_CLUSTER"
HERE = Path(__file__).resolve().parent
SIZE = 3


def skip_reason() -> str | None:
    """Why the cluster tests do not run here, or None when they do."""
    if os.environ.get(ENABLE_ENV) != "1":
        return (
            f"Apache Kafka cluster tests: a separate set, run with {ENABLE_ENV}=1 pytest "
            "tests/cluster"
        )
    missing = apache_kafka.java_tools_missing()
    return f"Apache Kafka cluster tests need Java and Maven: {missing}" if missing else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The hook sees every collected item of the session: mark only this folder's.
    reason = skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@dataclass
class ProxiedCluster:
    """The cluster and, per node (same order as ``cluster.nodes``), the proxy clients use."""

    cluster: apache_kafka.Cluster
    proxies: list[TcpProxy]

    @property
    def bootstrap(self) -> str:
        return self.cluster.bootstrap

    def proxy_of(self, node: apache_kafka.Node) -> TcpProxy:
        return self.proxies[self.cluster.nodes.index(node)]

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every node's log, for assertion messages."""
        parts = []
        for node in self.cluster.nodes:
            text = node.log_path.read_text(errors="replace") if node.log_path.exists() else ""
            parts.append(f"--- node {node.node_id} ({node.log_path}) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def heal(self, timeout: float = 120) -> None:
        """Every proxy open, every node running and registered with the cluster."""
        for proxy in self.proxies:
            proxy.restore()
        for node in self.cluster.nodes:
            if not node.running:
                self.cluster.start_node(node, wait=True)
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 3})
        deadline = time.monotonic() + timeout
        while True:
            brokers = 0
            with contextlib.suppress(Exception):
                brokers = len(admin.list_topics(timeout=10).brokers)
            if brokers == SIZE:
                return
            assert time.monotonic() < deadline, (
                f"the cluster did not come back whole within {timeout} s ({brokers} brokers)\n"
                f"{self.log_tails()}"
            )
            time.sleep(0.5)


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedCluster]:
    """Three Apache Kafka nodes (KRaft, combined mode), each behind a proxy of its own."""
    reason = skip_reason()
    if reason:  # only reached when a test here is run some other way
        pytest.skip(reason)
    directory = tmp_path_factory.mktemp("kafka-cluster")
    client_ports = [testing.free_port() for _ in range(SIZE)]
    proxies: list[TcpProxy] = [TcpProxy("127.0.0.1", port) for port in client_ports]
    try:
        with apache_kafka.cluster(
            SIZE,
            directory,
            client_ports=client_ports,
            advertised_ports=[proxy.port for proxy in proxies],
        ) as cluster:
            print(f"\nApache Kafka {apache_kafka.KAFKA_VERSION} cluster in {directory}")
            yield ProxiedCluster(cluster, proxies)
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def healthy_cluster(kafka_cluster: ProxiedCluster) -> ProxiedCluster:
    """The module's cluster, whole again: what an earlier test cut off or stopped is back."""
    kafka_cluster.heal()
    return kafka_cluster
