"""A billing service: turns each ``orders.placed`` event into exactly one invoice.

The consume loop claims each event's id in the ``outbox_dedup`` table inside the same
transaction that writes the invoice, so an event Kafka delivers twice is billed once.

    python examples/billing.py --database-url postgresql://... --kafka-bootstrap-servers ...

With ``--metrics-port 9465`` it serves its Prometheus metrics (outbox.consumer_metrics).
"""

from __future__ import annotations

import argparse
import json
from decimal import Decimal

import sqlalchemy as sa
from confluent_kafka import Message
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from outbox import urls
from outbox.consumer import ConsumeLoop, ConsumerSettings
from outbox_relay import logs


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    order_id: Mapped[int] = mapped_column(primary_key=True)
    total: Mapped[Decimal]


def bill(session: Session, message: Message) -> None:
    """The side effect: one invoice per order. A second one would violate the primary key."""
    order = json.loads(message.value() or b"{}")
    session.add(Invoice(order_id=order["order_id"], total=Decimal(order["total"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--kafka-bootstrap-servers", required=True)
    parser.add_argument("--topic", default="orders.placed")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port"
    )
    args = parser.parse_args()
    logs.configure("json")
    engine = sa.create_engine(urls.to_sqlalchemy(args.database_url))
    Base.metadata.create_all(engine)
    settings = ConsumerSettings(
        "billing",
        [args.topic],
        args.kafka_bootstrap_servers,
        batch_size=100,
        kafka_config={
            # Offsets are committed every second: a crash redelivers about that much.
            "auto.commit.interval.ms": "1000",
            # A restarted consumer rejoins its group in seconds, not minutes; fine as long as
            # one batch (with its retries) takes well under 10 s.
            "session.timeout.ms": "6000",
            "max.poll.interval.ms": "10000",
        },
        backoff_cap=2.0,
        metrics_port=args.metrics_port,
    )
    ConsumeLoop(settings, bill, sessionmaker(engine)).run()


if __name__ == "__main__":
    main()
