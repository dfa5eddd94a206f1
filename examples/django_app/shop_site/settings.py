"""A minimal Django project on PostgreSQL (psycopg 3) with the outbox installed as an app.

The database comes from ``DATABASE_URL`` (or ``OUTBOX_DATABASE_URL``), e.g.
``postgresql://app:secret@localhost:5432/shop``.
"""

import os

from psycopg.conninfo import conninfo_to_dict

from outbox import urls

_url = os.environ.get("DATABASE_URL") or os.environ["OUTBOX_DATABASE_URL"]
_params = conninfo_to_dict(urls.to_libpq(_url))

SECRET_KEY = "example-only-not-secret"  # noqa: S105 - an example project
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "outbox.django",  # manage.py migrate creates the outbox's tables
    "shop",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",  # psycopg 3 when it is installed
        "NAME": _params.get("dbname", ""),
        "USER": _params.get("user", ""),
        "PASSWORD": _params.get("password", ""),
        "HOST": _params.get("host", ""),
        "PORT": _params.get("port", ""),
    }
}
