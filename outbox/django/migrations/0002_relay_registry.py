"""Brings outbox migration 0006 (the relay registry) to projects that ran 0001 before it."""

from django.db import migrations

from outbox.django.operations import apply_outbox_migrations, keep_outbox

#: The last outbox SQL migration (schema/migrations) this Django migration is known to bring.
OUTBOX_VERSION = 6


class Migration(migrations.Migration):
    dependencies = [("outbox_relay", "0001_outbox_schema")]
    operations = [migrations.RunPython(apply_outbox_migrations, keep_outbox)]
