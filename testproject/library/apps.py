import os

from django.apps import AppConfig


class LibraryConfig(AppConfig):
    name = "testproject.library"
    label = "library"

    def ready(self) -> None:
        # TESTPROJECT_PROMETHEUS=<seconds>: expose the pools' metrics on
        # /metrics (written every that many seconds in multiprocess mode).
        if os.environ.get("TESTPROJECT_PROMETHEUS"):
            import django_pgpool.prometheus

            django_pgpool.prometheus.register(interval=float(os.environ["TESTPROJECT_PROMETHEUS"]))
        # Some projects query the database while starting up. This one can be
        # told to, to show that such a query's pool (on the real database)
        # never serves the tests that run on the test database afterwards.
        if os.environ.get("TESTPROJECT_QUERY_IN_READY"):
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT current_database()")
                os.environ["TESTPROJECT_READY_SAW_DATABASE"] = cursor.fetchone()[0]
