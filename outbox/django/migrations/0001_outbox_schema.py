"""Creates the outbox (every outbox migration up to OUTBOX_VERSION, or later ones if shipped)."""

from django.db import migrations

from outbox.django.operations import apply_outbox_migrations, keep_outbox

#: The last outbox SQL migration (schema/migrations) this Django migration is known to bring.
#: When the package ships a later one, a new Django migration here applies it (a test checks).
OUTBOX_VERSION = 5


class Migration(migrations.Migration):
    initial = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(apply_outbox_migrations, keep_outbox)]
