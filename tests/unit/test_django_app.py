"""The Django app's migrations keep up with the outbox's SQL migrations."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from outbox import schema

pytest.importorskip("django")


def test_the_last_django_migration_brings_the_last_sql_migration() -> None:
    """When a release adds schema/migrations/NNNN_*.sql, it must add a Django migration to
    outbox/django/migrations that applies it (OUTBOX_VERSION = NNNN): a project that already
    ran the earlier ones would otherwise never get it from ``manage.py migrate``."""
    package = importlib.import_module("outbox.django.migrations")
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
    versions = [
        importlib.import_module(f"{package.__name__}.{name}").OUTBOX_VERSION for name in names
    ]
    assert versions == sorted(versions)
    assert versions[-1] == schema.latest_version()
