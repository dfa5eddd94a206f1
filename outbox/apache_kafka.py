"""Apache Kafka itself for tests and benchmarks: one broker or a cluster, in KRaft mode, from the
jars on Maven Central (fetched once with Maven and cached), on free ports of 127.0.0.1.

Needs Java 17+ and Maven on the ``PATH`` (nothing from PyPI). The jars are cached under
``$OUTBOX_TEST_CACHE`` (default ``$XDG_CACHE_HOME/outbox-relay``, else ``~/.cache/outbox-relay``);
Maven's own repository (``~/.m2``) is reused, so a machine fetches each jar once.

Each node runs as broker and controller (combined mode). A node has three listeners: ``CLIENT``
(what clients are told to use, so a proxy can stand in front of it), ``INTERNAL`` (replication)
and ``CONTROLLER`` (the KRaft quorum). Settings follow ``docker-compose.yml``'s broker; a
cluster of three has replication factor 3 and ``min.insync.replicas=2`` by default.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from outbox.errors import OutboxError

#: The Apache Kafka release of the tests, the benchmarks and ``docker-compose.yml``: the one
#: Debezium 3.6 is built against.
KAFKA_VERSION = "4.3.0"
SLF4J_VERSION = "2.0.17"
CACHE_ENV = "OUTBOX_TEST_CACHE"

#: The JVM of a test broker: a small heap (two cores run three nodes at once).
JVM_OPTIONS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC")

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>outbox-relay.tools</groupId>
  <artifactId>{name}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies}
  </dependencies>
</project>
"""


class JavaToolMissing(OutboxError):
    """Java or Maven is not installed: Apache Kafka cannot run on this machine."""


def cache_dir() -> Path:
    """Where fetched jars are kept between runs."""
    named = os.environ.get(CACHE_ENV)
    if named:
        return Path(named)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "outbox-relay"


def java_tools_missing() -> str | None:
    """Why Apache Kafka cannot run here (Java or Maven missing), or None when it can."""
    missing = [tool for tool in ("java", "mvn") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not found on the PATH" if missing else None


def maven_jars(name: str, artifacts: Sequence[str]) -> Path:
    """The directory holding ``artifacts`` (``group:artifact:version``) and everything they
    depend on, fetched from Maven Central on first use and cached under ``name``."""
    target = cache_dir() / name / "jars"
    if target.is_dir() and any(target.glob("*.jar")):
        return target
    reason = java_tools_missing()
    if reason:
        raise JavaToolMissing(reason)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as work:
        pom = Path(work) / "pom.xml"
        pom.write_text(_POM.format(name=name, dependencies=_dependencies(artifacts)))
        fetched = Path(work) / "jars"
        command = ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"]
        result = subprocess.run(
            [*command, f"-DoutputDirectory={fetched}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"Maven could not fetch {', '.join(artifacts)}:\n{result.stdout}")
        with contextlib.suppress(OSError):  # another process finished first: use its copy
            fetched.rename(target)
    return target


def _dependencies(artifacts: Sequence[str]) -> str:
    lines = []
    for coordinates in artifacts:
        group, artifact, version = coordinates.split(":")
        lines.append(
            f"    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>"
            f"<version>{version}</version></dependency>"
        )
    return "\n".join(lines)


def kafka_jars() -> Path:
    """The broker's jars (``kafka_2.13``) with an SLF4J binding that logs to stderr."""
    return maven_jars(
        f"apache-kafka-{KAFKA_VERSION}",
        [
            f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}",
            f"org.slf4j:slf4j-api:{SLF4J_VERSION}",
            f"org.slf4j:slf4j-simple:{SLF4J_VERSION}",
        ],
    )


def _free_port() -> int:
    from outbox.testing import free_port

    return free_port()


@dataclass
class Node:
    """One broker-and-controller of a cluster."""

    node_id: int
    directory: Path
    client_port: int
    #: The port clients are told to use: ``client_port``, or a proxy's in front of it.
    advertised_port: int = 0
    internal_port: int = field(default_factory=_free_port)
    controller_port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.advertised_port = self.advertised_port or self.client_port

    @property
    def log_path(self) -> Path:
        return self.directory / "broker.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Cluster:
    """Apache Kafka nodes in KRaft combined mode; start, kill and restart them one by one."""

    def __init__(
        self,
        size: int,
        directory: Path,
        *,
        client_ports: Sequence[int] | None = None,
        advertised_ports: Sequence[int] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        clients = list(client_ports or [0] * size)
        advertised = list(advertised_ports or [0] * size)
        self.nodes = [
            Node(i + 1, directory / f"node-{i + 1}", clients[i] or _free_port(), advertised[i])
            for i in range(size)
        ]
        self.settings = {**broker_settings(size), **(settings or {})}
        self._cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        self._jars = kafka_jars()

    @property
    def bootstrap(self) -> str:
        """Every node's advertised address, comma-separated."""
        return ",".join(f"127.0.0.1:{n.advertised_port}" for n in self.nodes)

    def start(self) -> None:
        """Format every node's log directory and start them all; return once each listens."""
        for node in self.nodes:
            self._format(node)
        for node in self.nodes:
            self.start_node(node)
        for node in self.nodes:
            self._wait_listening(node)

    def start_node(self, node: Node, *, wait: bool = False) -> None:
        """Start (or restart) one node on its existing log directory."""
        log = open(node.log_path, "ab")  # noqa: SIM115 - the child holds its own copy
        try:
            node.process = subprocess.Popen(
                [*self._java("kafka.Kafka"), str(node.directory / "server.properties")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        if wait:
            self._wait_listening(node)

    def kill(self, node: Node) -> None:
        """SIGKILL: the node vanishes without a word (no controlled shutdown)."""
        self._signal(node, signal.SIGKILL, timeout=30)

    def shut_down(self, node: Node) -> None:
        """SIGTERM: a controlled shutdown (leadership moved away first)."""
        self._signal(node, signal.SIGTERM, timeout=120)

    def leader_of(self, topic: str, partition: int) -> Node:
        """The node that leads ``topic``'s ``partition`` now, as the cluster's metadata says."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self._running_bootstrap(), "log_level": 3})
        metadata = admin.list_topics(topic, timeout=30)
        leader = metadata.topics[topic].partitions[partition].leader
        return next(n for n in self.nodes if n.node_id == leader)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait()

    def _running_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.client_port}" for n in self.nodes if n.running)

    def _signal(self, node: Node, sig: int, *, timeout: float) -> None:
        if node.process is None or node.process.poll() is not None:
            return
        node.process.send_signal(sig)
        try:
            node.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait()

    def _wait_listening(self, node: Node) -> None:
        from outbox.testing import wait_for_port

        assert node.process is not None
        try:
            wait_for_port("127.0.0.1", node.client_port, timeout=90, process=node.process)
        except (RuntimeError, TimeoutError) as exc:
            tail = node.log_path.read_text(errors="replace")[-3000:]
            message = f"Apache Kafka node {node.node_id} did not start: {exc}\n{tail}"
            raise RuntimeError(message) from exc

    def _java(self, main_class: str) -> list[str]:
        return ["java", *JVM_OPTIONS, "-cp", f"{self._jars}/*", main_class]

    def _format(self, node: Node) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        properties = node.directory / "server.properties"
        properties.write_text(_properties({**self.settings, **self._node_settings(node)}))
        format_ = [
            "format",
            "--ignore-formatted",
            f"--cluster-id={self._cluster_id}",
            "-c",
            str(properties),
        ]
        result = subprocess.run(
            [*self._java("kafka.tools.StorageTool"), *format_],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"kafka-storage format failed:\n{result.stdout}{result.stderr}")

    def _node_settings(self, node: Node) -> dict[str, str]:
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        return {
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"CLIENT://127.0.0.1:{node.client_port},"
            f"INTERNAL://127.0.0.1:{node.internal_port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"CLIENT://127.0.0.1:{node.advertised_port},"
            f"INTERNAL://127.0.0.1:{node.internal_port}",
            "log.dirs": str(node.directory / "data"),
        }


def broker_settings(size: int) -> dict[str, str]:
    """The settings every node of a ``size``-node test cluster shares (``docker-compose.yml``'s
    broker has the same ones for one node), apart from its own id, listeners and directory."""
    replicas = str(min(size, 3))
    return {
        "process.roles": "broker,controller",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "INTERNAL",
        "listener.security.protocol.map": "CLIENT:PLAINTEXT,INTERNAL:PLAINTEXT,"
        "CONTROLLER:PLAINTEXT",
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": str(min(size, 2)),
        "default.replication.factor": replicas,
        "min.insync.replicas": str(min(size, 2)),
        "group.initial.rebalance.delay.ms": "0",
        "auto.create.topics.enable": "true",
        "num.partitions": "1",
        # Fewer partitions for consumer offsets than the 50 of the default: a test cluster
        # creates them on the first group join, and 50 take seconds on two cores.
        "offsets.topic.num.partitions": "3",
    }


def _properties(settings: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in sorted(settings.items()))


@contextlib.contextmanager
def cluster(
    size: int = 1,
    directory: str | Path | None = None,
    *,
    client_ports: Sequence[int] | None = None,
    advertised_ports: Sequence[int] | None = None,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Cluster]:
    """Start ``size`` Apache Kafka nodes; yield the cluster; kill them all after.

    ``client_ports`` (one per node) are where the nodes listen for clients (free ports by
    default); ``advertised_ports`` tell clients to connect elsewhere, to a proxy that forwards
    to the node's ``client_port``.
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="outbox-kafka-"))
        nodes = Cluster(
            size,
            Path(directory),
            client_ports=client_ports,
            advertised_ports=advertised_ports,
            settings=settings,
        )
        stack.callback(nodes.stop)
        nodes.start()
        yield nodes
