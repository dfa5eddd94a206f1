"""The outboxes a relay fleet serves: named once here, read from the command line or a list file.

``outbox-relay run`` serves the outbox of each ``--database-url`` it is given (at ``--schema``
and ``--table-prefix``), or every outbox of ``--outboxes FILE``, a TOML list that may change
while the relays run::

    [[outbox]]
    name = "orders"                                   # in logs, metrics, status; unique
    database_url = "postgresql://relay:${ORDERS_PW}@db1/orders"
    schema = "public"                                 # optional, as --schema
    table_prefix = "outbox_"                          # optional, as --table-prefix
    relays = 2                                        # optional: relays serving it (default 1)
    retention = "7d"                                  # optional: --retention for this one
    record_format = "cloudevents-binary"              # optional: --record-format for this one

``${NAME}`` in a URL is read from the environment, so passwords need not be in the file. Pure
parsing, apart from :class:`OutboxFile`, which reads the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox import urls
from outbox.errors import ConfigurationError
from outbox.settings import OutboxSettings
from outbox_relay.config import RECORD_FORMATS, RelaySettings
from outbox_relay.durations import seconds

#: What an outbox's name may be: it is a metric label and a word on the command line.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KEYS = frozenset(
    {"name", "database_url", "schema", "table_prefix", "relays", "retention", "record_format"}
)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One outbox of the fleet: where it is, and how it is served."""

    name: str
    database_url: str
    location: OutboxSettings = dataclasses.field(default_factory=OutboxSettings)
    #: How many of the fleet's relays serve it at once (its shards are spread over them).
    relays: int = 1
    #: ``--retention`` for this outbox; None: the relays' own.
    retention: float | None = None
    #: ``--record-format`` for this outbox; None: the relays' own.
    record_format: str | None = None

    def settings(self, base: RelaySettings) -> RelaySettings:
        """The relays' settings, serving this outbox."""
        return dataclasses.replace(
            base,
            database_url=self.database_url,
            outbox=self.location,
            retention=base.retention if self.retention is None else self.retention,
            record_format=self.record_format or base.record_format,
        )

    @property
    def where(self) -> str:
        """The outbox for messages: its database (no password), schema and prefix."""
        table = self.location.events_table  # for people to read, not SQL
        return f"{urls.redact(self.database_url)} ({table})"


def check_name(name: object) -> str:
    """``name`` if it may name an outbox, else ConfigurationError saying what may."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"outbox name {name!r} is not allowed: use 1 to 63 letters, digits, '_', '.' or '-',"
            " starting with a letter or digit"
        )
    return name


def from_urls(database_urls: Sequence[str], location: OutboxSettings) -> tuple[OutboxEntry, ...]:
    """The outboxes of ``--database-url`` given once or more, each named after its database."""
    entries = []
    for url in database_urls:
        database = urls.parse(url).database or ""
        name = database if location == OutboxSettings() else f"{database}.{location.schema}"
        if location.table_prefix != OutboxSettings().table_prefix:
            name = f"{name}.{location.table_prefix.rstrip('_') or 'noprefix'}"
        entries.append(OutboxEntry(check_name(name or "outbox"), url, location))
    return _checked(entries, hint="give each outbox its name in an --outboxes file")


def parse(text: str, *, environ: Mapping[str, str] | None = None) -> tuple[OutboxEntry, ...]:
    """The outboxes of a list file's text; ConfigurationError naming the first thing wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"the outbox list is not valid TOML: {exc}") from exc
    unknown = set(document) - {"outbox"}
    if unknown:
        raise ConfigurationError(
            f"unknown key(s) {', '.join(sorted(unknown))} in the outbox list: it holds"
            " [[outbox]] tables only"
        )
    tables = document.get("outbox", [])
    if not isinstance(tables, list):
        raise ConfigurationError("the outbox list must use [[outbox]] tables, one per outbox")
    env = os.environ if environ is None else environ
    return _checked([_entry(n, table, env) for n, table in enumerate(tables, 1)], hint="")


def _entry(number: int, table: Any, environ: Mapping[str, str]) -> OutboxEntry:
    where = f"outbox {number} of the list"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where} is not a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known:"
            f" {', '.join(sorted(_KEYS))}"
        )
    for required in ("name", "database_url"):
        if required not in table:
            raise ConfigurationError(f"{where}: {required} is missing")
    name = check_name(table["name"])
    where = f"outbox {name!r}"
    url = _expand(str(table["database_url"]), environ, where)
    urls.parse(url)
    defaults = OutboxSettings()
    try:
        location = OutboxSettings(
            schema=table.get("schema", defaults.schema),
            table_prefix=table.get("table_prefix", defaults.table_prefix),
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {exc}") from exc
    relays = table.get("relays", 1)
    if isinstance(relays, bool) or not isinstance(relays, int) or relays < 1:
        raise ConfigurationError(f"{where}: relays must be a whole number of at least 1")
    retention = _retention(table.get("retention"), where)
    return OutboxEntry(
        name, url, location, relays, retention, _record_format(table.get("record_format"), where)
    )


def _expand(url: str, environ: Mapping[str, str], where: str) -> str:
    def value(match: re.Match[str]) -> str:
        variable = match.group(1)
        if variable not in environ:
            raise ConfigurationError(f"{where}: its database_url names ${{{variable}}}, unset")
        return environ[variable]

    return _VARIABLE.sub(value, url)


def _retention(value: object, where: str) -> float | None:
    if value is None:
        return None
    try:
        found = float(value) if isinstance(value, int | float) else seconds(str(value))
    except ValueError:
        found = -1.0
    if isinstance(value, bool) or found < 0:
        raise ConfigurationError(f"{where}: retention {value!r} is not a duration like 7d or 0")
    return found


def _record_format(value: object, where: str) -> str | None:
    if value is None:
        return None
    if value not in RECORD_FORMATS:
        raise ConfigurationError(
            f"{where}: record_format {value!r} is not one of {', '.join(RECORD_FORMATS)}"
        )
    return str(value)


def _checked(entries: Iterable[OutboxEntry], *, hint: str) -> tuple[OutboxEntry, ...]:
    """The entries, unless two share a name or an outbox."""
    found: dict[str, OutboxEntry] = {}
    places: dict[tuple[str, OutboxSettings], str] = {}
    for entry in entries:
        if entry.name in found:
            raise ConfigurationError(
                f"two outboxes are named {entry.name!r}" + (f": {hint}" if hint else "")
            )
        place = (urls.redact(entry.database_url), entry.location)
        if place in places:
            raise ConfigurationError(
                f"outboxes {places[place]!r} and {entry.name!r} are the same outbox ({entry.where})"
            )
        found[entry.name] = entry
        places[place] = entry.name
    return tuple(found.values())


class OutboxFile:
    """The list file, read again when its contents change (``changed``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._text: bytes | None = None

    def read(self) -> tuple[OutboxEntry, ...]:
        """Its outboxes now; ConfigurationError when it cannot be read or is wrong."""
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the outbox list {self.path} (--outboxes): {exc.strerror or exc}"
            ) from exc
        self._text = raw
        try:
            return parse(raw.decode())
        except (ConfigurationError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"{self.path}: {exc}") from exc

    def changed(self) -> bool:
        """Whether the file's contents differ from what ``read`` last read."""
        try:
            return self.path.read_bytes() != self._text
        except OSError:
            return True  # ``read`` says why


def find(entries: Sequence[OutboxEntry], name: str) -> OutboxEntry:
    """The entry named ``name``; ConfigurationError listing the names otherwise."""
    for entry in entries:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in entries) or "none"
    raise ConfigurationError(f"no outbox named {name!r} in the list (its outboxes: {names})")
