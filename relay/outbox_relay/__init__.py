"""relay: the daemon that publishes outbox rows to Kafka, and the ``outbox-relay`` command."""
