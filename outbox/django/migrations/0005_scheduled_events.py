"""Brings outbox migration 0009 (events delivered later) to projects that ran 0004."""

from django.db import migrations

from outbox.django.operations import apply_outbox_migrations, keep_outbox

#: The last outbox SQL migration (schema/migrations) this Django migration is known to bring.
OUTBOX_VERSION = 9


class Migration(migrations.Migration):
    dependencies = [("outbox_relay", "0004_published_partitions")]
    operations = [migrations.RunPython(apply_outbox_migrations, keep_outbox)]
