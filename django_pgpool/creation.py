"""Test databases: Django's PostgreSQL code, with pools closed where it matters.

``CREATE DATABASE ... TEMPLATE`` and ``DROP DATABASE`` fail ("database is
being accessed by other users") while any session is connected to the
database involved, and a pool keeps sessions open on purpose. Before each of
those statements every pool connected to that database is closed, whatever
alias it belongs to (a replica alias or a test mirror may point at it too),
including connections still checked out: at those moments the tests are not
running, so whatever still holds one has leaked it.
"""

from __future__ import annotations

from typing import Any

from . import driver

driver.use_psycopg2()

from django.db.backends.postgresql import creation as postgresql  # noqa: E402

from . import registry  # noqa: E402


class DatabaseCreation(postgresql.DatabaseCreation):
    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        # An earlier test run in this process may have left a pool on the test
        # database, which would stop it from being dropped and recreated.
        registry.close_for_database(
            self._get_test_db_name(),  # type: ignore[attr-defined]
            force=True,
        )
        return super()._create_test_db(verbosity, autoclobber, keepdb)  # type: ignore[misc]

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        registry.close_for_database(self.connection.settings_dict["NAME"], force=True)
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        registry.close_for_database(test_database_name, force=True)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]
