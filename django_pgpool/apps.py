"""``INSTALLED_APPS`` entry: system checks, the ``pgpool`` management command,
and, listed first, a guarantee that Django's PostgreSQL backend loads on
psycopg2 even when psycopg 3 is installed (see :mod:`django_pgpool.driver`)."""

from __future__ import annotations

from django.apps import AppConfig

from . import driver

driver.use_psycopg2()


class PgPoolConfig(AppConfig):
    name = "django_pgpool"
    verbose_name = "PostgreSQL connection pool"

    def ready(self) -> None:
        from django.core.checks import Tags, register

        from . import checks

        register(checks.check_settings, checks.TAG)
        register(checks.check_driver, checks.TAG)
        # Needs the server: Django runs it only with --database (and in migrate).
        register(checks.check_server, Tags.database, checks.TAG)
