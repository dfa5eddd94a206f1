"""Brings outbox migration 0008 (published events kept by partition) to projects that ran 0003."""

from django.db import migrations

from outbox.django.operations import apply_outbox_migrations, keep_outbox

#: The last outbox SQL migration (schema/migrations) this Django migration is known to bring.
OUTBOX_VERSION = 8


class Migration(migrations.Migration):
    dependencies = [("outbox_relay", "0003_relay_retention")]
    operations = [migrations.RunPython(apply_outbox_migrations, keep_outbox)]
