"""CloudEvents 1.0 on Kafka (the Kafka protocol binding), pure: no I/O, no Kafka client.

A writer names an event's CloudEvents ``type`` and ``source`` in its headers, and a relay run
with ``--record-format cloudevents-binary`` or ``cloudevents-structured`` sends it as a
CloudEvent (the id is the event's id, the time that of its writer's clock)::

    outbox.add(session, "orders.placed", order, key="42",
               headers=cloudevents.attributes(type="com.example.order.placed",
                                              source="/shop/orders"))

A consumer reads either mode back with :func:`from_message`.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _quote
from typing import Any, Protocol

from outbox.errors import InvalidHeaderError

SPECVERSION = "1.0"
#: Binary mode: each attribute is a header named ``ce_`` and the attribute.
PREFIX = "ce_"
ID_HEADER = "ce_id"
SPECVERSION_HEADER = "ce_specversion"
TYPE_HEADER = "ce_type"
SOURCE_HEADER = "ce_source"
TIME_HEADER = "ce_time"
#: Carries ``datacontenttype`` in binary mode, the event format in structured mode.
CONTENT_TYPE_HEADER = "content-type"
#: The payload's media type when the writer names none: the writer's serializer writes JSON.
JSON = "application/json"
#: Structured mode: the whole event is this JSON object.
STRUCTURED = "application/cloudevents+json"
STRUCTURED_CONTENT_TYPE = STRUCTURED + "; charset=utf-8"
#: Set by the relay alone: a row's own ``ce_id`` or ``ce_specversion`` header is dropped.
RELAY_SET = frozenset({ID_HEADER, SPECVERSION_HEADER})

#: A context attribute's name (the spec: lower-case ASCII letters and digits).
_NAME = re.compile(r"[a-z0-9]{1,20}")
_RESERVED = frozenset({"id", "specversion", "data", "data_base64"})


def attributes(
    *,
    type: str,
    source: str,
    subject: str | None = None,
    datacontenttype: str | None = None,
    extensions: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The headers that give an event its CloudEvents ``type`` and ``source`` (and optionally
    ``subject``, the payload's media type, extension attributes), for ``headers=`` of
    ``outbox.add``; merge them with the event's other headers. InvalidHeaderError names what is
    wrong: an empty value, a source with whitespace, an extension name the spec refuses."""
    found = {TYPE_HEADER: _text("type", type), SOURCE_HEADER: _uri_reference(source)}
    if subject is not None:
        found[PREFIX + "subject"] = _text("subject", subject)
    if datacontenttype is not None:
        found[CONTENT_TYPE_HEADER] = _text("datacontenttype", datacontenttype)
    for name, value in (extensions or {}).items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
            raise InvalidHeaderError(
                f"CloudEvents extension name {name!r} is not allowed: 1 to 20 lower-case ASCII "
                "letters or digits, not id, specversion, data or data_base64"
            )
        found[PREFIX + name] = _text(name, value)
    return found


def _text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidHeaderError(f"CloudEvents {name} must be a non-empty str, got {value!r}")
    return value


def _uri_reference(source: object) -> str:
    text = _text("source", source)
    if any(c.isspace() for c in text):
        raise InvalidHeaderError(f"CloudEvents source must be a URI-reference, got {text!r}")
    return text


def time_of(event_id: str) -> str | None:
    """The RFC 3339 time of a UUIDv7 event id (its first 48 bits are its writer's Unix
    milliseconds), to the millisecond, in UTC; None when the id is not a UUIDv7."""
    if len(event_id) != 36 or event_id[14] != "7" or event_id[8] != "-":
        return None
    try:
        millis = int(event_id[:8] + event_id[9:13], 16)
    except ValueError:
        return None
    return _millis_text(millis)


@functools.lru_cache(maxsize=1024)
def _millis_text(millis: int) -> str:
    """Cached: the events of a batch share their writers' milliseconds."""
    seconds, rest = divmod(millis, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{rest:03d}Z"


def is_structured(content_type: str) -> bool:
    """Whether a message's content type is structured mode's (``application/cloudevents+json``)."""
    return content_type.partition(";")[0].strip().lower() == STRUCTURED


@functools.lru_cache(maxsize=256)
def is_json(content_type: str) -> bool:
    """Whether a media type is JSON: ``application/json``, ``text/json``, ``*/*+json``."""
    media = content_type.partition(";")[0].strip().lower()
    return media in ("application/json", "text/json") or media.endswith("+json")


#: Headers as the relay holds them: (name, value) pairs.
Pairs = Sequence[tuple[str, bytes]]
#: Headers as Kafka clients take them.
MessageHeaders = list[tuple[str, str | bytes | None]]


def binary_headers(
    event_id: str,
    headers: Pairs,
    *,
    source: bytes,
    type: bytes,
) -> MessageHeaders:
    """Binary mode's headers: the required attributes first (the row's own ``ce_source``,
    ``ce_type``, ``ce_time`` and ``content-type`` win over ``source``, ``type``, the id's time and
    JSON), then the row's other headers unchanged. A row's ``ce_id`` and ``ce_specversion`` are
    dropped. Per event at the relay's rate: the common cases take no lookups."""
    when = _time_bytes(event_id)
    content_type = _JSON
    rest: Pairs = headers
    if headers:
        given = dict(headers)
        if not _SET_HERE.isdisjoint(given):
            source = given.get(SOURCE_HEADER) or source
            type = given.get(TYPE_HEADER) or type
            when = given.get(TIME_HEADER) or when
            content_type = given.get(CONTENT_TYPE_HEADER) or content_type
            rest = [(n, v) for n, v in headers if n not in _SET_HERE]
    found: MessageHeaders = [
        (SPECVERSION_HEADER, _SPECVERSION),
        (ID_HEADER, event_id.encode()),
        (SOURCE_HEADER, source),
        (TYPE_HEADER, type),
    ]
    if when:
        found.append((TIME_HEADER, when))
    found.append((CONTENT_TYPE_HEADER, content_type))
    found.extend(rest)
    return found


#: The headers binary mode sets itself: from the row's own (attributes), or never (the id).
_SET_HERE = frozenset({SOURCE_HEADER, TYPE_HEADER, TIME_HEADER, CONTENT_TYPE_HEADER, *RELAY_SET})
_SPECVERSION = SPECVERSION.encode()
_JSON = JSON.encode()


def _time_bytes(event_id: str) -> bytes:
    """:func:`time_of` as header bytes (empty: no time)."""
    text = time_of(event_id)
    return text.encode() if text else b""


def structured_value(
    event_id: str,
    payload: bytes,
    headers: Pairs,
    *,
    source: str,
    type: str,
) -> tuple[bytes, MessageHeaders]:
    """Structured mode: the event as one JSON object (the payload as ``data`` when it is JSON,
    else ``data_base64``) and the message's headers (its content type, then the row's headers
    that are not attributes)."""
    others: MessageHeaders = []
    found: dict[str, str] = {}
    for name, value in headers:
        attribute = _attribute_name(name)
        if attribute is None:
            others.append((name, value))
        elif attribute not in ("id", "specversion"):
            found[attribute] = value.decode("utf-8", "replace")
    content_type = found.pop("datacontenttype", JSON)
    when = found.pop("time", None) or time_of(event_id)
    # Written out rather than json.dumps'ed: names are [a-z0-9], values are quoted by the C
    # encoder json.dumps uses, and the payload's JSON goes in as it is.
    parts = [
        '{"specversion":"1.0","id":',
        _quote(event_id),
        ',"source":',
        _quote(found.pop("source", source)),
        ',"type":',
        _quote(found.pop("type", type)),
    ]
    if when:
        parts += (',"time":', _quote(when))
    parts += (',"datacontenttype":', _quote(content_type))
    for name, text in found.items():
        parts += (',"', name, '":', _quote(text))
    data = _json_text(payload) if is_json(content_type) else None
    if data is not None:
        parts += (',"data":', data, "}")
    else:
        parts += (',"data_base64":"', base64.b64encode(payload).decode(), '"}')
    value = "".join(parts).encode()
    return value, [(CONTENT_TYPE_HEADER, _STRUCTURED_CONTENT_TYPE), *others]


_STRUCTURED_CONTENT_TYPE = STRUCTURED_CONTENT_TYPE.encode()


def _attribute_name(header: str) -> str | None:
    """The attribute a row header sets in structured mode (None: it stays a header)."""
    if header == CONTENT_TYPE_HEADER:
        return "datacontenttype"
    if header.startswith(PREFIX) and _NAME.fullmatch(header[len(PREFIX) :]):
        return header[len(PREFIX) :]
    return None


def _json_text(payload: bytes) -> str | None:
    """The payload as JSON text to embed as it is (None: it is not UTF-8 JSON)."""
    try:
        text = payload.decode("utf-8")
        json.loads(text, parse_constant=_refuse_constant)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError alike
        return None
    return text


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity, which Python's parser takes and JSON does not: embedded in the event,
    they would make the whole structured value unreadable to a strict parser."""
    raise ValueError(f"{name} is not JSON")


def structured_id(value: bytes | str | None) -> str | None:
    """The ``id`` of a structured-mode event (None: the value is not one)."""
    try:
        found = json.loads(value or b"")
    except ValueError:
        return None
    event_id = found.get("id") if isinstance(found, dict) else None
    return event_id if isinstance(event_id, str) and event_id else None


class KafkaMessage(Protocol):
    """What :func:`from_message` reads of a message (a confluent-kafka ``Message`` has it)."""

    def headers(self) -> Any: ...

    def value(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class CloudEvent:
    """A CloudEvent read from a Kafka message: its context attributes, as text, and its data
    as bytes (the JSON text of ``data``, or ``data_base64`` decoded)."""

    attributes: Mapping[str, str]
    data: bytes

    @property
    def id(self) -> str:
        """The event's id (with the relay's records, the outbox event's UUID)."""
        return self.attributes["id"]

    @property
    def source(self) -> str:
        """Where the event happened (a URI-reference)."""
        return self.attributes["source"]

    @property
    def type(self) -> str:
        """What kind of event it is."""
        return self.attributes["type"]

    @property
    def time(self) -> dt.datetime | None:
        """When it happened (None: the event does not say)."""
        text = self.attributes.get("time")
        return dt.datetime.fromisoformat(text) if text else None

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.data)


def from_message(message: KafkaMessage) -> CloudEvent | None:
    """The CloudEvent a Kafka message carries, binary or structured; None when it carries none
    (no ``ce_id`` header, and no ``application/cloudevents+json`` value)."""
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    headers = {n: v.decode() if isinstance(v, bytes) else v for n, v in pairs if v is not None}
    value = message.value() or b""
    body = value.encode() if isinstance(value, str) else bytes(value)
    content_type = headers.get(CONTENT_TYPE_HEADER, "")
    if ID_HEADER in headers:
        found = {n[len(PREFIX) :]: v for n, v in headers.items() if n.startswith(PREFIX)}
        if content_type:
            found["datacontenttype"] = content_type
        return CloudEvent(found, body)
    if not is_structured(content_type):
        return None
    document = json.loads(body)
    if "data_base64" in document:
        data = base64.b64decode(document.pop("data_base64"))
    elif "data" in document:
        data = json.dumps(document.pop("data"), ensure_ascii=False).encode()
    else:
        data = b""
    found = {n: v if isinstance(v, str) else json.dumps(v) for n, v in document.items()}
    return CloudEvent(found, data)
