"""``python -m relay`` is the same as the ``outbox-relay`` command."""

from relay.cli import main

main()
