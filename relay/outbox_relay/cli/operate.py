"""The operator's commands: ``status``, ``dead-letters`` (list, retry, discard) and ``replay``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from outbox_relay import dead_letters, status
from outbox_relay.cli.common import (
    Where,
    checked_connection,
    explain,
    fail,
    handle_errors,
    where_options,
)
from outbox_relay.cli.duration import SYNTAX, Duration, seconds
from outbox_relay.cli.options import options
from outbox_relay.exit_codes import ExitCode
from outbox_relay.outboxes import OutboxEntry

F = TypeVar("F", bound=Callable[..., Any])


def _when(text: str | None) -> dt.datetime | None:
    """An ISO 8601 time (UTC when it has no offset), or a duration ago: 15m, 12h, 7d."""
    if text is None:
        return None
    try:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds(text))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO time nor a duration like 15m, 12h or 7d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:20])) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


_STATUS_EPILOG = (
    "With --outboxes and no --outbox: every outbox of the list, each in its own block (JSON:"
    ' {"outboxes": [...]}); one that cannot be read says why and the others are still shown;'
    " the exit code is the worst of theirs. An outbox's retention in the list stands for"
    " --retention. " + SYNTAX
)


@click.command("status", epilog=_STATUS_EPILOG)
@where_options
# The relays' own options: status must read them as the relays do.
@options("dead_letter_blocks_key", "retention")
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.option(
    "--max-lag",
    type=Duration(0),
    default=None,
    help="Exit 6 when the oldest unpublished event is older than this.",
)
@handle_errors
def status_command(
    where: Where,
    connect_timeout: float,
    dead_letter_blocks_key: bool,
    retention: float,
    as_json: bool,
    max_lag: float | None,
) -> None:
    """Backlog, lag, retries, dead letters, blocked keys, and the live relays with their shards."""

    def read(entry: OutboxEntry) -> status.Status:
        kept = retention if entry.retention is None else entry.retention
        with checked_connection(entry.database_url, connect_timeout, entry.location) as conn:
            return status.read(
                conn,
                entry.location,
                dead_letters_block=dead_letter_blocks_key,
                retention_kept=kept > 0,
            )

    if where.every_listed:
        _status_of_each([_report(entry, read, max_lag) for entry in where.outboxes()], as_json)
        return
    entry = where.outbox()
    found = read(entry)
    shown = {"outbox": entry.name, **found.as_json()}
    click.echo(json.dumps(shown, indent=2) if as_json else status.render(found))
    problem = status.lagging(found, max_lag)
    if problem:
        fail(problem, ExitCode.LAGGING)


def _status_of_each(reports: list[status.Report], as_json: bool) -> None:
    """Every outbox's block (or JSON), what is wrong with each on stderr, the worst exit code."""
    if as_json:
        click.echo(json.dumps({"outboxes": [r.as_json() for r in reports]}, indent=2))
    else:
        click.echo(status.render_all(reports))
    for report in reports:
        if report.error or report.problem:
            click.echo(f"Error: {report.outbox}: {report.error or report.problem}", err=True)
    code = status.worst(reports)
    if code:
        raise SystemExit(int(code))


def _report(
    entry: OutboxEntry, read: Callable[[OutboxEntry], status.Status], max_lag: float | None
) -> status.Report:
    """One outbox's status, or, when it cannot be read, why: the others are still reported."""
    try:
        found = read(entry)
    except Exception as exc:
        explained = explain(exc)
        if explained is None:
            raise
        message, code = explained
        return status.Report(entry.name, entry.where, error=message, code=code)
    problem = status.lagging(found, max_lag)
    code = ExitCode.LAGGING if problem else ExitCode.OK
    return status.Report(entry.name, entry.where, found, code=code, problem=problem)


@click.group("dead-letters")
def dead_letters_group() -> None:
    """List, retry and discard events the relay gave up on."""


def _selection_options(func: F) -> F:
    for option in (
        click.option("--id", "ids", type=int, multiple=True, help="Row id (repeatable)."),
        click.option("--topic", help="Only this topic."),
        click.option("--key", help="Only this key (UTF-8)."),
        click.option("--since", help="Dead-lettered at or after: ISO time or 15m/12h/7d ago."),
        click.option("--until", help="Dead-lettered before: ISO time or 15m/12h/7d ago."),
    ):
        func = option(func)
    return func


def _selection(
    ids: tuple[int, ...], topic: str | None, key: str | None, since: str | None, until: str | None
) -> dead_letters.Selection:
    return dead_letters.Selection(ids, topic, key, _when(since), _when(until))


_actor_option = click.option(
    "--actor",
    envvar="OUTBOX_ACTOR",
    show_envvar=True,
    default=dead_letters.default_actor,
    show_default="user@host",
    help="Who is acting, for the log.",
)


def _history_line(entry: dict[str, Any]) -> str:
    return "{at:%Y-%m-%d %H:%M:%S} {action:8} row {row_id} {topic} by {actor}: {reason}".format(
        **entry
    )


def _echo_history(entries: list[dict[str, Any]], as_json: bool) -> None:
    for entry in entries:
        click.echo(json.dumps(entry, default=str) if as_json else _history_line(entry))
    if not entries and not as_json:
        click.echo("no retries or discards logged")


def _dead_letter_lines(row: dead_letters.DeadLetter) -> str:
    return (
        f"{row.id:>10} {row.dead_lettered_at:%Y-%m-%d %H:%M:%S} {row.topic} "
        f"key={row.key!r} attempts={row.attempts} {row.event_id}\n"
        f"{'':>10} {row.last_error}"
    )


@dead_letters_group.command("list", epilog=SYNTAX)
@where_options
@_selection_options
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--history",
    is_flag=True,
    help="Show the log of retries and discards instead (of the rows selected; --since and "
    "--until then say when the action was logged).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON lines, for scripts.")
@handle_errors
def dead_letters_list(
    where: Where,
    connect_timeout: float,
    limit: int,
    history: bool,
    as_json: bool,
    **selected: Any,
) -> None:
    """Dead-lettered events with their error and attempts (or, with --history, the log)."""
    entry = where.outbox()
    settings = entry.location
    with checked_connection(entry.database_url, connect_timeout, settings) as conn:
        if history:
            selection = _selection(**selected)
            _echo_history(dead_letters.history(conn, settings, limit, selection), as_json)
            return
        rows = dead_letters.list_dead_letters(conn, settings, _selection(**selected), limit)
    for row in rows:
        as_text = json.dumps(dataclasses.asdict(row), default=str) if as_json else None
        click.echo(as_text or _dead_letter_lines(row))
    if not rows and not as_json:
        click.echo("no dead letters")


@dead_letters_group.command("retry", epilog=SYNTAX)
@where_options
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@click.option("--reason", help="Why, for the log.")
@_actor_option
@handle_errors
def dead_letters_retry(
    where: Where,
    connect_timeout: float,
    everything: bool,
    reason: str | None,
    actor: str,
    **selected: Any,
) -> None:
    """Send dead letters again (attempts reset, same event_id). Select by --id, --topic, --key,
    time, or --all."""
    selection = _selection(**selected)
    if not everything and selection == dead_letters.Selection():
        raise click.UsageError(
            "choose what to retry: --id, --topic, --key, --since/--until or --all"
        )
    entry = where.outbox()
    settings = entry.location
    with checked_connection(entry.database_url, connect_timeout, settings) as conn:
        retried = dead_letters.retry(conn, settings, selection, actor=actor, reason=reason)
    if not retried:
        fail("no dead letter matched", ExitCode.NOTHING_MATCHED)
    click.echo(f"retrying {len(retried)} event(s): rows {_ids(retried)}")


@dead_letters_group.command("discard", epilog=SYNTAX)
@where_options
@click.option("--id", "ids", type=int, multiple=True, required=True, help="Row id (repeatable).")
@click.option("--reason", required=True, help="Why the event is dropped (recorded).")
@_actor_option
@handle_errors
def dead_letters_discard(
    where: Where,
    connect_timeout: float,
    ids: tuple[int, ...],
    reason: str,
    actor: str,
) -> None:
    """Delete dead letters for good; the log keeps what they were, who and why."""
    if not reason.strip():
        raise click.BadParameter("a reason is required", param_hint="--reason")
    entry = where.outbox()
    settings = entry.location
    with checked_connection(entry.database_url, connect_timeout, settings) as conn:
        discarded = dead_letters.discard(conn, settings, ids, reason=reason, actor=actor)
    if not discarded:
        fail("no dead letter matched", ExitCode.NOTHING_MATCHED)
    click.echo(f"discarded {len(discarded)} event(s): rows {_ids(discarded)}")


@click.command("replay", epilog=SYNTAX)
@where_options
@click.option("--from-id", type=int, help="First row id of the range.")
@click.option("--to-id", type=int, help="Last row id of the range (inclusive).")
@click.option("--since", help="Created at or after: ISO time or 15m/12h/7d ago.")
@click.option("--until", help="Created before: ISO time or 15m/12h/7d ago.")
@click.option("--topic", help="Only this topic.")
@handle_errors
def replay_command(
    where: Where,
    connect_timeout: float,
    from_id: int | None,
    to_id: int | None,
    since: str | None,
    until: str | None,
    topic: str | None,
) -> None:
    """Publish already-published events again, with their original event_id.

    Needs the relays to keep published rows (--retention); consumers' dedup recognises the
    events they already processed.
    """
    if from_id is None and to_id is None and since is None and until is None:
        raise click.UsageError("choose a range: --from-id/--to-id or --since/--until")
    selection = dead_letters.Selection(
        topic=topic, since=_when(since), until=_when(until), from_id=from_id, to_id=to_id
    )
    entry = where.outbox()
    settings = entry.location
    with checked_connection(entry.database_url, connect_timeout, settings) as conn:
        replayed = dead_letters.replay(conn, settings, selection)
        if not replayed:
            found = dead_letters.nothing_replayed(conn, settings, selection)
            fail(found.explain(selection), ExitCode.NOTHING_MATCHED)
    click.echo(f"replaying {len(replayed)} event(s): rows {_ids(replayed)}")
