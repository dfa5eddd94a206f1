"""Trace context through the outbox, with OpenTelemetry installed (and without it).

``outbox.add`` stores the current trace context as a ``traceparent`` (and ``tracestate``)
header, the relay publishes it unchanged, and the consume loop runs the handler in a span that
continues the trace. The "request" spans around ``outbox.add`` come from a local tracer provider:
making a span current is all the writer needs. The consume loop's spans come from the global
provider, which OpenTelemetry lets a process set only once: the module-scoped ``spans`` fixture
sets it (or reuses an SDK provider already set) and attaches an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Message
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.consumer import BatchConsumeLoop
from outbox.tracing import TRACEPARENT_HEADER, TRACESTATE_HEADER
from tests.acceptance.relay_harness import read_topic, run_relay, wait_until
from tests.integration.test_consumer import (
    WAIT,
    Running,
    produce,
    running,
    settings,
    unique_name,
)

ROOT = Path(__file__).resolve().parents[2]

#: The application's own tracer: spans made current around ``outbox.add``.
REQUESTS = TracerProvider().get_tracer("tests.request")

CALLERS_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished through the global tracer provider, in memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "another kind of provider is set globally"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the processor stays attached to the global provider: drop its spans


def stored_headers(database_url: str) -> list[dict[str, bytes]]:
    """Each stored event's headers, in insertion order."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT header_names, header_values FROM outbox_events ORDER BY id"
        ).fetchall()
    return [dict(zip(names, values, strict=True)) for names, values in rows]


def parse_traceparent(value: bytes | str) -> tuple[int, int, int]:
    """(trace id, parent span id, flags) of a W3C ``traceparent`` (version 00)."""
    text = value.decode() if isinstance(value, bytes) else value
    version, trace_id, span_id, flags = text.split("-")
    assert (version, len(trace_id), len(span_id), len(flags)) == ("00", 32, 16, 2), text
    return int(trace_id, 16), int(span_id, 16), int(flags, 16)


def ids_of(span: trace.Span) -> tuple[int, int, int]:
    context = span.get_span_context()
    return context.trace_id, context.span_id, int(context.trace_flags)


# --- the writer ----------------------------------------------------------------------------------


def test_add_stores_the_current_trace_context(engine: sa.Engine, database_url: str) -> None:
    """A span current around outbox.add: its trace id and span id are stored as a traceparent
    header, after the caller's own headers."""
    with (
        REQUESTS.start_as_current_span("POST /orders") as span,
        Session(engine) as session,
        session.begin(),
    ):
        outbox.add(session, "orders", {"n": 1}, headers={"content-type": "application/json"})
    (headers,) = stored_headers(database_url)
    assert list(headers) == ["content-type", TRACEPARENT_HEADER]
    assert headers["content-type"] == b"application/json"
    assert parse_traceparent(headers[TRACEPARENT_HEADER]) == ids_of(span)
    assert ids_of(span)[2] & TraceFlags.SAMPLED  # sampled, and so marked in the header


def test_add_stores_the_tracestate_when_there_is_one(database_url: str) -> None:
    """A span context with a trace state (here a remote one, no SDK involved) gives both
    headers."""
    context = SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "opaque"), ("other", "x")]),
    )
    with trace.use_span(NonRecordingSpan(context)), psycopg.connect(database_url) as conn:
        outbox.add(conn, "orders", {"n": 1})
    (headers,) = stored_headers(database_url)
    assert headers == {
        TRACEPARENT_HEADER: b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        TRACESTATE_HEADER: b"vendor=opaque,other=x",
    }


def test_add_many_stores_it_on_every_event(database_url: str) -> None:
    events = [
        outbox.Event("orders", {"n": n}, headers={"n": str(n)} if n else None) for n in (0, 1)
    ]
    with REQUESTS.start_as_current_span("batch") as span, psycopg.connect(database_url) as conn:
        outbox.add_many(conn, events)
    stored = stored_headers(database_url)
    assert [list(h) for h in stored] == [[TRACEPARENT_HEADER], ["n", TRACEPARENT_HEADER]]
    assert {parse_traceparent(h[TRACEPARENT_HEADER]) for h in stored} == {ids_of(span)}


@pytest.mark.asyncio
async def test_the_async_writers_store_it(async_engine: AsyncEngine, database_url: str) -> None:
    with REQUESTS.start_as_current_span("async") as span:
        async with async_engine.begin() as conn:
            await outbox.add_async(conn, "orders", {"n": 1})
            await outbox.add_many_async(conn, [outbox.Event("orders", {"n": 2})])
    stored = stored_headers(database_url)
    assert [parse_traceparent(h[TRACEPARENT_HEADER]) for h in stored] == [ids_of(span)] * 2


def test_a_traceparent_of_the_callers_own_wins(database_url: str) -> None:
    """The caller's traceparent is stored as given; the current trace adds nothing then (not
    even its tracestate, which belongs to another trace)."""
    context = SpanContext(
        trace_id=1, span_id=2, is_remote=False, trace_state=TraceState([("vendor", "x")])
    )
    with trace.use_span(NonRecordingSpan(context)), psycopg.connect(database_url) as conn:
        outbox.add(conn, "orders", {"n": 1}, headers={TRACEPARENT_HEADER: CALLERS_TRACEPARENT})
        outbox.add_many(
            conn, [outbox.Event("orders", 2, headers={TRACEPARENT_HEADER: CALLERS_TRACEPARENT})]
        )
    assert stored_headers(database_url) == [{TRACEPARENT_HEADER: CALLERS_TRACEPARENT.encode()}] * 2


def test_without_an_active_span_no_header_is_added(database_url: str) -> None:
    """With no valid span context current, OpenTelemetry's propagator writes nothing, so the
    event keeps exactly the caller's headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    assert carrier == {}  # what the propagator does with no span
    with psycopg.connect(database_url) as conn:
        outbox.add(conn, "orders", {"n": 1})
        outbox.add(conn, "orders", {"n": 2}, headers={"a": "b"})
    assert stored_headers(database_url) == [{}, {"a": b"b"}]


def test_baggage_is_stored_as_the_configured_propagator_writes_it(database_url: str) -> None:
    """The default propagators are W3C trace context and W3C baggage: baggage set without a
    span is stored alone (and read back into the context on the consumer side)."""
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        with psycopg.connect(database_url) as conn:
            outbox.add(conn, "orders", {"n": 1})
    finally:
        otel_context.detach(token)
    assert stored_headers(database_url) == [{"baggage": b"tenant=acme"}]


def test_bad_headers_are_still_refused_by_the_writer(database_url: str) -> None:
    """Tracing does not get in the way of validation: the same errors as without a span."""
    with REQUESTS.start_as_current_span("bad"), psycopg.connect(database_url) as conn:
        with pytest.raises(outbox.InvalidHeaderError):
            outbox.add(conn, "orders", 1, headers=[("a", "b")])  # type: ignore[arg-type]
        with pytest.raises(outbox.InvalidHeaderError):
            outbox.add(conn, "orders", 1, headers={"event_id": "x"})
    assert stored_headers(database_url) == []


# --- without OpenTelemetry -----------------------------------------------------------------------

#: Runs in a fresh interpreter: imports outbox, writes two events, reports what was imported.
#: With "blocked", a meta path finder makes ``opentelemetry`` look uninstalled (as a missing
#: package does, the import fails) and records every lookup of it.
PROBE = """
import importlib.abc, json, sys

class Blocker(importlib.abc.MetaPathFinder):
    looked_up = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "opentelemetry":
            return None
        self.looked_up.append(name)
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

if sys.argv[2] == "blocked":
    sys.meta_path.insert(0, Blocker())

def otel_modules():
    return sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")

import psycopg
import outbox

imported_by_import = otel_modules()
with psycopg.connect(sys.argv[1]) as conn:
    outbox.add(conn, "orders", {"n": 1}, headers={"a": "b"})
    outbox.add_many(conn, [outbox.Event("orders", {"n": 2})])
print(json.dumps({
    "imported_by_import": imported_by_import,
    "imported_by_add": otel_modules(),
    "looked_up": Blocker.looked_up,
}))
"""


def probe(database_url: str, mode: str) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, database_url, mode],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result: dict[str, list[str]] = json.loads(out)
    return result


def test_without_opentelemetry_add_works_unchanged_and_imports_nothing(database_url: str) -> None:
    """opentelemetry looks uninstalled: add and add_many work, store only the caller's headers,
    and nothing of opentelemetry is imported; outbox looked for the package once, by name."""
    result = probe(database_url, "blocked")
    assert result == {
        "imported_by_import": [],
        "imported_by_add": [],
        "looked_up": ["opentelemetry"],
    }
    assert stored_headers(database_url) == [{"a": b"b"}, {}]


def test_with_opentelemetry_it_is_imported_by_the_first_add_only(database_url: str) -> None:
    """The control for the test above (the probe does see opentelemetry when outbox imports it):
    installed, it is imported lazily by the first add, not by ``import outbox``. No span is
    current in the probe, so no header is added."""
    result = probe(database_url, "installed")
    assert result["imported_by_import"] == []
    assert "opentelemetry.propagate" in result["imported_by_add"]
    assert stored_headers(database_url) == [{"a": b"b"}, {}]


# --- the relay and the consume loop --------------------------------------------------------------


@pytest.mark.kafka
def test_the_relay_publishes_the_trace_context_unchanged(
    database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    """A trace id set around outbox.add arrives in the Kafka message's traceparent."""
    with REQUESTS.start_as_current_span("POST /orders") as span, psycopg.connect(database_url) as c:
        event_id = str(outbox.add(c, topic, {"n": 1}, key="k", headers={"content-type": "json"}))
    (stored,) = stored_headers(database_url)
    result = run_relay(database_url, kafka_bootstrap, "--exit-when-idle", timeout=60)
    assert result.returncode == 0, result.stderr
    (message,) = read_topic(kafka_bootstrap, topic, expect_ids={event_id})
    assert message.headers[TRACEPARENT_HEADER] == stored[TRACEPARENT_HEADER]
    assert (
        parse_traceparent(message.headers[TRACEPARENT_HEADER])[0]
        == span.get_span_context().trace_id
    )
    assert message.headers == {**stored, outbox.EVENT_ID_HEADER: event_id.encode()}


def process_spans(exporter: InMemorySpanExporter, topic: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == f"process {topic}"]


@pytest.mark.kafka
@pytest.mark.parametrize("batch_size", [1, 50])
def test_the_consume_loop_continues_the_trace(
    spans: InMemorySpanExporter,
    database_url: str,
    engine: sa.Engine,
    kafka_bootstrap: str,
    topic: str,
    batch_size: int,
) -> None:
    """outbox.add in a span -> relay -> ConsumeLoop: the handler runs inside a CONSUMER span
    whose parent is the span around outbox.add (same trace id); an event written with no span
    current is handled in a span of a new trace."""
    with (
        REQUESTS.start_as_current_span("POST /orders") as request,
        psycopg.connect(database_url) as c,
    ):
        traced = str(outbox.add(c, topic, "traced", key="k"))
    with psycopg.connect(database_url) as c:
        untraced = str(outbox.add(c, topic, "untraced", key="k"))
    result = run_relay(database_url, kafka_bootstrap, "--exit-when-idle", timeout=60)
    assert result.returncode == 0, result.stderr

    seen: dict[str, tuple[SpanContext, int | None, int | None]] = {}

    def handler(_session: Session, message: Message) -> None:
        """Notes the span current while it runs, and where the message was."""
        value = message.value()
        assert value is not None
        context = trace.get_current_span().get_span_context()
        seen[value.decode()] = (context, message.partition(), message.offset())

    spans.clear()
    name = unique_name()
    with running(
        settings(name, topic, kafka_bootstrap, batch_size=batch_size), handler, engine
    ) as run:
        wait_until(lambda: run.loop.stats.processed >= 2, timeout=WAIT)

    by_id = {s.attributes["messaging.message.id"]: s for s in process_spans(spans, topic)}  # type: ignore[index]
    assert set(by_id) == {traced, untraced}
    span, root = by_id[traced], by_id[untraced]
    assert span.kind is SpanKind.CONSUMER
    assert span.context.trace_id == request.get_span_context().trace_id
    assert span.parent is not None
    assert (span.parent.span_id, span.parent.is_remote) == (
        request.get_span_context().span_id,
        True,
    )
    assert root.parent is None
    assert root.context.trace_id not in {0, request.get_span_context().trace_id}
    # The span is current while the handler runs.
    assert seen["traced"][0] == span.get_span_context()
    assert seen["untraced"][0] == root.get_span_context()
    _, partition, offset = seen["traced"]
    assert dict(span.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
        "messaging.consumer.group.name": name,
        "messaging.message.id": traced,
    }


@pytest.mark.kafka
def test_the_batch_consume_loop_links_its_span_to_each_message_s_trace(
    spans: InMemorySpanExporter,
    database_url: str,
    engine: sa.Engine,
    kafka_bootstrap: str,
    topic: str,
) -> None:
    """BatchConsumeLoop: the handler runs inside one CONSUMER span per batch, linked to the
    trace of each message that carries one (the span around outbox.add) and to nothing for a
    message that carries none; the span counts the batch's messages."""
    with (
        REQUESTS.start_as_current_span("POST /orders") as request,
        psycopg.connect(database_url) as c,
    ):
        outbox.add(c, topic, "traced", key="k")
    with psycopg.connect(database_url) as c:
        outbox.add(c, topic, "untraced", key="k")
    result = run_relay(database_url, kafka_bootstrap, "--exit-when-idle", timeout=60)
    assert result.returncode == 0, result.stderr

    current: list[SpanContext] = []

    def handler(_session: Session, messages: Sequence[Message]) -> None:
        current.extend(trace.get_current_span().get_span_context() for _ in messages)

    spans.clear()
    name = unique_name()
    loop = BatchConsumeLoop(
        settings(name, topic, kafka_bootstrap, batch_size=50), handler, sessionmaker(engine)
    )
    run = Running(loop)
    try:
        wait_until(lambda: loop.stats.processed >= 2, timeout=WAIT)
    finally:
        run.stop()
    assert run.error is None, repr(run.error)

    batch_spans = process_spans(spans, topic)
    assert batch_spans, "no process span"
    assert {s.get_span_context().span_id for s in batch_spans} == {c.span_id for c in current}
    assert sum(s.attributes["messaging.batch.message_count"] for s in batch_spans) == 2  # type: ignore[index,misc]
    assert all(s.kind is SpanKind.CONSUMER and s.parent is None for s in batch_spans)
    links = [link.context for s in batch_spans for link in s.links]
    assert [(link.trace_id, link.span_id) for link in links] == [
        (request.get_span_context().trace_id, request.get_span_context().span_id)
    ]
    assert (
        dict(batch_spans[0].attributes or {}).items()
        >= {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": name,
        }.items()
    )


@pytest.mark.kafka
def test_a_failing_handler_s_span_records_the_error(
    spans: InMemorySpanExporter, engine: sa.Engine, kafka_bootstrap: str, topic: str
) -> None:
    """Each attempt is a span; the failed one has status ERROR and the exception recorded."""
    produce(kafka_bootstrap, topic, [("order-1", str(uuid.uuid4()))])
    attempts: list[int] = []

    def flaky(_session: Session, _message: Message) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")

    spans.clear()
    with running(settings(unique_name(), topic, kafka_bootstrap), flaky, engine) as run:
        wait_until(lambda: run.loop.stats.processed >= 1, timeout=WAIT)
    failed, succeeded = process_spans(spans, topic)
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert failed.events[0].attributes is not None
    assert failed.events[0].attributes["exception.message"] == "first attempt fails"
    assert succeeded.status.status_code is StatusCode.UNSET
    assert (failed.parent, succeeded.parent) == (None, None)  # no traceparent: new traces


@pytest.mark.kafka
@pytest.mark.asyncio
@pytest.mark.parametrize("batch", [False, True], ids=["AsyncConsumeLoop", "AsyncBatchConsumeLoop"])
async def test_the_async_loops_continue_the_trace(
    spans: InMemorySpanExporter,
    database_url: str,
    async_engine: AsyncEngine,
    kafka_bootstrap: str,
    topic: str,
    batch: bool,
) -> None:
    """As the sync loops: the handler is awaited inside a CONSUMER span of the trace whose
    context outbox.add stored (parent for one message, a link for a batch), current meanwhile."""
    from sqlalchemy.ext.asyncio import async_sessionmaker

    from outbox.consumer_async import AsyncBatchConsumeLoop, AsyncConsumeLoop

    with (
        REQUESTS.start_as_current_span("POST /orders") as request,
        psycopg.connect(database_url) as c,
    ):
        event_id = str(outbox.add(c, topic, "traced", key="k"))
    result = run_relay(database_url, kafka_bootstrap, "--exit-when-idle", timeout=60)
    assert result.returncode == 0, result.stderr
    current: list[SpanContext] = []

    async def one(_session: object, _message: Message) -> None:
        current.append(trace.get_current_span().get_span_context())

    async def many(_session: object, _messages: Sequence[Message]) -> None:
        current.append(trace.get_current_span().get_span_context())

    spans.clear()
    config = settings(unique_name(), topic, kafka_bootstrap, batch_size=50 if batch else 1)
    sessions = async_sessionmaker(async_engine)
    loop = (
        AsyncBatchConsumeLoop(config, many, sessions)
        if batch
        else AsyncConsumeLoop(config, one, sessions)
    )
    task = asyncio.create_task(loop.run(handle_signals=False))
    async with asyncio.timeout(WAIT):
        while loop.stats.processed < 1:  # noqa: ASYNC110 - the stats have no event to wait on
            await asyncio.sleep(0.05)
    loop.stop()
    await asyncio.wait_for(task, 30)
    [span] = process_spans(spans, topic)
    assert span.kind is SpanKind.CONSUMER
    assert current == [span.get_span_context()]
    request_ids = (request.get_span_context().trace_id, request.get_span_context().span_id)
    if batch:
        assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
            request_ids
        ]
    else:
        assert span.parent is not None
        assert (span.context.trace_id, span.parent.span_id) == request_ids
        assert (span.attributes or {})["messaging.message.id"] == event_id
