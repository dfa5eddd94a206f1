"""The app's configuration: applies ``settings.OUTBOX_SETTINGS`` when Django starts."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

import outbox
from outbox.settings import OutboxSettings


class OutboxConfig(AppConfig):
    name = "outbox.django"
    #: Not "outbox": that is a likely name for an app of the project's own.
    label = "outbox_relay"
    verbose_name = "Transactional outbox"

    def ready(self) -> None:
        configured = getattr(settings, "OUTBOX_SETTINGS", None)
        if configured is None:
            return
        if not isinstance(configured, OutboxSettings):
            raise ImproperlyConfigured(
                f"OUTBOX_SETTINGS must be an outbox.OutboxSettings, got {type(configured).__name__}"
            )
        outbox.configure(configured)
