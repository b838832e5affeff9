import os

from django.apps import AppConfig


class LibraryConfig(AppConfig):
    name = "testproject.library"
    label = "library"

    def ready(self) -> None:
        # Some projects query the database while starting up. This one can be
        # told to, to show that such a query's pool (on the real database)
        # never serves the tests that run on the test database afterwards.
        if os.environ.get("TESTPROJECT_QUERY_IN_READY"):
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT current_database()")
                os.environ["TESTPROJECT_READY_SAW_DATABASE"] = cursor.fetchone()[0]
