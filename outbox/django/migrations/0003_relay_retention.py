"""Brings outbox migration 0007 (each relay's retention, for status) to projects that ran 0002."""

from django.db import migrations

from outbox.django.operations import apply_outbox_migrations, keep_outbox

#: The last outbox SQL migration (schema/migrations) this Django migration is known to bring.
OUTBOX_VERSION = 7


class Migration(migrations.Migration):
    dependencies = [("outbox_relay", "0002_relay_registry")]
    operations = [migrations.RunPython(apply_outbox_migrations, keep_outbox)]
