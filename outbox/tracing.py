"""Trace context through the outbox, when OpenTelemetry is installed (the ``otel`` extra).

:func:`with_trace_context` adds the current trace context to an event's headers as OpenTelemetry's
configured propagator writes it (by default the W3C ``traceparent``, plus ``tracestate`` and
``baggage`` when there are any); the relay publishes stored headers unchanged; :func:`consuming`
continues the trace on the consumer side, and :func:`consuming_batch` links a batch's span to
the traces of its messages. Without OpenTelemetry every function here leaves
things as they are and nothing is imported: :func:`available` looks the package up once with
``importlib.util.find_spec``, and ``opentelemetry`` is imported only when it is there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from outbox.envelope import Event

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

#: The instrumentation scope of the consumer's spans.
TRACER_NAME = "outbox-relay"

_available: bool | None = None
_tracer: Tracer | None = None


def available() -> bool:
    """Whether OpenTelemetry is installed; looked up once, without importing it."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):
            _available = False
    return _available


def _unavailable() -> None:
    """The package was found but its API cannot be imported: stop trying."""
    global _available
    _available = False


def with_trace_context(event: Event) -> Event:
    """``event`` with the current trace context added to its headers.

    Returned unchanged without OpenTelemetry, without a valid current span context (the
    propagator then writes nothing), when the caller passed a ``traceparent`` of its own (the
    caller's context wins), or when the headers are not a mapping (:func:`~outbox.envelope.seal`
    refuses them). Other headers the caller passed keep their values.
    """
    if not available():
        return event
    headers = event.headers
    if headers is not None and (not isinstance(headers, Mapping) or TRACEPARENT_HEADER in headers):
        return event
    try:
        from opentelemetry import propagate
    except ImportError:
        _unavailable()
        return event
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return event
    merged: dict[str, str | bytes] = dict(headers or {})
    for name, value in carrier.items():
        merged.setdefault(name, value)
    return dataclasses.replace(event, headers=merged)


def consuming(
    topic: str,
    headers: Iterable[tuple[str, str | bytes | None]],
    attributes: Mapping[str, str | int] | None = None,
) -> contextlib.AbstractContextManager[object]:
    """A CONSUMER span named ``process <topic>`` whose parent is the trace context extracted from
    a message's ``headers`` (a new trace when they hold none), current for the block; an
    exception raised in the block is recorded on the span. Without OpenTelemetry, a no-op."""
    if not available():
        return contextlib.nullcontext()
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        _unavailable()
        return contextlib.nullcontext()
    return _get_tracer().start_as_current_span(
        f"process {topic}",
        context=propagate.extract(_carrier(headers)),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    )


def consuming_batch(
    topic: str | None,
    headers_of_each: Iterable[Iterable[tuple[str, str | bytes | None]]],
    attributes: Mapping[str, str | int] | None = None,
) -> contextlib.AbstractContextManager[object]:
    """A CONSUMER span for a batch of messages handled together, current for the block: named
    ``process <topic>`` (``process`` when the batch spans several topics), a child of the
    current context, with a link to the trace context each message's headers carry (messages
    without one add no link), as OpenTelemetry's messaging conventions have it for batches.
    Without OpenTelemetry, a no-op."""
    if not available():
        return contextlib.nullcontext()
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        _unavailable()
        return contextlib.nullcontext()
    links = []
    for headers in headers_of_each:
        context = trace.get_current_span(propagate.extract(_carrier(headers))).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
    return _get_tracer().start_as_current_span(
        f"process {topic}" if topic else "process",
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
        links=links,
    )


def _carrier(headers: Iterable[tuple[str, str | bytes | None]]) -> dict[str, str]:
    return {
        name: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        for name, value in headers
        if value is not None
    }


def _get_tracer() -> Tracer:
    global _tracer
    if _tracer is None:
        from opentelemetry import trace

        # Before a provider is set this is a proxy that follows the one set later.
        _tracer = trace.get_tracer(TRACER_NAME)
    return _tracer
