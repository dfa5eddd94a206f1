"""The ``outbox-relay`` command: thin wiring of options to the library, and exit codes.

One module per command group: ``schema``, ``relay`` (``run``), ``operate`` (``status``,
``dead-letters``, ``replay``) and ``dedup``. The relay's options are generated from its settings
(``options``). Every option can also be set through the environment variable ``--help`` shows.
"""

from __future__ import annotations

import click

from outbox_relay import logs
from outbox_relay.cli import dedup, dev, operate, relay, schema


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(logs.LOG_FORMATS),
    default="auto",
    show_default=True,
    help="Log lines as JSON, as pretty console output, or auto: pretty on a terminal only.",
)
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Lowest level of log lines to write.",
)
@click.version_option(package_name="outbox-relay")
def cli(log_format: logs.LogFormat, log_level: str) -> None:
    """outbox-relay: the transactional outbox for PostgreSQL and Kafka.

    Applications write events with outbox.add() inside their own transactions; this command
    manages the outbox schema and runs the relay that publishes the events to Kafka.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 bad arguments or settings,
    3 schema missing or not current, 4 PostgreSQL unreachable, 5 Kafka unreachable at start,
    6 lag over status --max-lag, 7 nothing matched (dead-letters, replay).
    """
    logs.configure(log_format, log_level)


for command in (
    schema.group,
    relay.run,
    dedup.group,
    operate.status_command,
    operate.dead_letters_group,
    operate.replay_command,
    dev.dev_servers,
):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="outbox-relay")
