"""``python -m outbox_relay`` is the same as the ``outbox-relay`` command."""

from outbox_relay.cli import main

main()
