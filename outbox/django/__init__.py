"""The outbox as a Django app: add ``"outbox.django"`` to ``INSTALLED_APPS`` and ``manage.py
migrate`` creates the outbox's tables, in the database your models use.

    INSTALLED_APPS = [..., "outbox.django"]
    OUTBOX_SETTINGS = outbox.OutboxSettings(schema="events")  # optional; the defaults otherwise

Then write events in the same ``transaction.atomic()`` block as your models::

    from django.db import connection, transaction
    import outbox

    with transaction.atomic():
        order = Order.objects.create(item="book")
        outbox.add(connection, "orders", {"id": order.id}, key=str(order.id))

Needs Django 4.2+ on the psycopg 3 backend (``pip install 'outbox-relay[django]'``).
"""
