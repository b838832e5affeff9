"""Session state never crosses requests.

Each test runs two "requests" on a pool of one connection, so the second is
served by the same server session as the first (the backend pid proves it),
and checks that nothing the first one did is visible to the second.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, connections, transaction

from .helpers import pool_options

pytestmark = pytest.mark.django_db(transaction=True)

# Roles are global to the cluster: unique per run, so concurrent runs never collide.
TENANT_ROLE = f"pgpool_tenant_{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def tenant_role(server: Any) -> Iterator[None]:
    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"DROP ROLE IF EXISTS {TENANT_ROLE}")
        cursor.execute(f"CREATE ROLE {TENANT_ROLE} NOLOGIN")
    yield
    with admin.cursor() as cursor:
        cursor.execute(f"DROP OWNED BY {TENANT_ROLE}")
        cursor.execute(f"DROP ROLE IF EXISTS {TENANT_ROLE}")
    admin.close()


@pytest.fixture
def one_connection() -> Iterator[None]:
    with pool_options(min_size=0, max_size=1):
        yield


def request(*statements: str) -> Any:
    """One request: run the statements, return the last row, give the connection back."""
    try:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
            row = cursor.fetchone() if cursor.description else None
            cursor.execute("SELECT pg_backend_pid()")
            request.pid = cursor.fetchone()[0]
        return row
    finally:
        connection.close()


def same_session_after(*statements: str) -> Any:
    """Run the statements in one request, then a probe query in the next; return the probe."""

    def probe(sql: str) -> Any:
        request(*statements)
        first_pid = request.pid
        row = request(sql)
        assert request.pid == first_pid, "the second request must reuse the same session"
        return row

    return probe


@pytest.mark.usefixtures("one_connection")
class TestNothingCrossesRequests:
    def test_set_role(self) -> None:
        probe = same_session_after(f"SET ROLE {TENANT_ROLE}")
        assert probe("SELECT current_user = session_user") == (True,)

    def test_set_session_authorization(self) -> None:
        probe = same_session_after(f"SET SESSION AUTHORIZATION {TENANT_ROLE}")
        assert probe("SELECT session_user::text") == ("postgres",)

    def test_tenant_id_set_with_set_config(self) -> None:
        # Row-level security policies read a setting like this one; a leak
        # would show one tenant another tenant's rows.
        probe = same_session_after("SELECT set_config('app.tenant_id', '42', false)")
        assert probe("SELECT coalesce(current_setting('app.tenant_id', true), '')") == ("",)

    def test_search_path(self) -> None:
        probe = same_session_after("SET search_path TO pg_catalog")
        assert probe("SHOW search_path") == ('"$user", public',)

    def test_statement_timeout(self) -> None:
        probe = same_session_after("SET statement_timeout = '50ms'")
        assert probe("SHOW statement_timeout") == ("0",)

    def test_temporary_table(self) -> None:
        probe = same_session_after("CREATE TEMP TABLE scratch (secret text)")
        assert probe("SELECT to_regclass('pg_temp.scratch')") == (None,)

    def test_session_advisory_lock(self, server: Any) -> None:
        probe = same_session_after("SELECT pg_advisory_lock(4242)")
        assert probe(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
        ) == (0,)
        other = server.connect(dbname="postgres")
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(4242)")
            assert cursor.fetchone() == (True,)
        other.close()

    def test_prepared_statement(self) -> None:
        probe = same_session_after("PREPARE leaked_plan AS SELECT 1")
        assert probe("SELECT count(*) FROM pg_prepared_statements") == (0,)

    def test_listen(self) -> None:
        probe = same_session_after("LISTEN tenant_events")
        assert probe("SELECT count(*) FROM pg_listening_channels()") == (0,)

    def test_holdable_cursor(self) -> None:
        probe = same_session_after("DECLARE leftover CURSOR WITH HOLD FOR SELECT 1")
        assert probe("SELECT count(*) FROM pg_cursors") == (0,)

    def test_open_transaction(self) -> None:
        probe = same_session_after("BEGIN", "SET LOCAL work_mem = '1MB'", "SELECT 1")
        assert probe("SELECT now() = statement_timestamp()") == (True,)


@pytest.mark.usefixtures("one_connection")
def test_djangos_time_zone_is_restored_after_a_reset() -> None:
    request("SET TIME ZONE 'Pacific/Auckland'")
    assert request("SHOW TimeZone") == ("UTC",)


def test_assume_role_is_applied_again_after_every_reset() -> None:
    options = connection.settings_dict["OPTIONS"]
    with pool_options(min_size=0, max_size=1):
        options["assume_role"] = TENANT_ROLE
        try:
            assert request("SELECT current_user::text") == (TENANT_ROLE,)
            request("RESET ROLE")
            assert request("SELECT current_user::text") == (TENANT_ROLE,)
        finally:
            del options["assume_role"]


def test_the_isolation_level_option_applies_to_every_checkout() -> None:
    options = connection.settings_dict["OPTIONS"]
    with pool_options(min_size=0, max_size=1):
        options["isolation_level"] = 3  # SERIALIZABLE, as psycopg2 / Django number it
        try:
            for _ in range(2):
                with transaction.atomic():
                    assert request_in_transaction("SHOW transaction_isolation") == ("serializable",)
                connection.close()
        finally:
            del options["isolation_level"]
    # and the next user of the pool without the option gets the server default
    with pool_options(min_size=0, max_size=1):
        with transaction.atomic():
            assert request_in_transaction("SHOW transaction_isolation") == ("read committed",)
        connection.close()


def request_in_transaction(sql: str) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()


def test_with_reset_off_only_the_transaction_is_rolled_back() -> None:
    # The documented risk of reset=False: session state is left for the next user.
    with pool_options(min_size=0, max_size=1, reset=False):
        request("SET statement_timeout = '5s'")
        assert request("SHOW statement_timeout") == ("5s",)
        connection.set_autocommit(False)
        with connection.cursor() as cursor:
            cursor.execute("CREATE TABLE reset_off_probe (n int)")
        connection.close()  # returned mid-transaction
        assert request("SELECT to_regclass('reset_off_probe')") == (None,)


def test_a_custom_reset_statement_replaces_the_built_in_one() -> None:
    with pool_options(min_size=0, max_size=1, reset="RESET statement_timeout"):
        request("SET statement_timeout = '5s'", "SET search_path TO pg_catalog")
        assert request("SHOW statement_timeout") == ("0",)
        assert request("SHOW search_path") == ("pg_catalog",)
        assert request("SHOW TimeZone") == ("UTC",)  # Django's session settings still applied


def test_each_reset_is_counted_in_the_statistics() -> None:
    with pool_options(min_size=0, max_size=1):
        for _ in range(3):
            request("SELECT 1")
        connections["default"].close()
        request("SELECT 1")
        assert connection.pool.stats()["resets_num"] >= 3


def test_a_reset_that_fails_every_time_is_one_warning_and_a_count(caplog: Any) -> None:
    # Valid SQL that fails on the server: every returned connection is then
    # discarded, and every request pays for a new one.
    caplog.set_level(logging.INFO, logger="django_pgpool")
    with pool_options(min_size=0, max_size=1, reset="SELECT pgpool_no_such_function()"):
        for _ in range(5):
            request("SELECT 1")  # each finds the previous connection's reset failed
        stats = connection.pool.stats()
        assert stats["resets_failed"] == 4
        assert stats["connections_num"] == 5
    warnings = [
        record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1, warnings
    assert "the session reset failed on a working connection" in warnings[0]
    assert "pgpool_no_such_function" in warnings[0]
    assert "OPTIONS['pool']['reset']" in warnings[0] and "resets_failed" in warnings[0]


def test_a_connection_lost_during_its_reset_is_no_warning(
    make_pool: Any, admin: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="django_pgpool")
    pool = make_pool(min_size=0, max_size=1, reset="SELECT pg_sleep(5)")
    conn = pool.getconn()
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    pool.putconn(conn)  # its reset is now running on the server
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    pool.putconn(pool.getconn())
    assert pool.stats()["resets_failed"] == 1
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
