"""The service function: the order and its event are written in one transaction."""

from django.db import connection, transaction

import outbox
from shop.models import Order


def place_order(item: str, quantity: int) -> Order:
    with transaction.atomic():
        order = Order.objects.create(item=item, quantity=quantity)
        outbox.add(
            connection,
            "orders",
            {"order_id": order.id, "item": item, "quantity": quantity},
            key=str(order.id),
        )
        return order
