"""ENGINE "django_pgpool" through Django: requests, the ORM, settings, aliases."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import DataError, OperationalError, connection, connections, transaction
from django.test import override_settings

import django_pgpool
from django_pgpool import PoolTimeout
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testproject.library.models import Author, Book

from .helpers import eventually, pool_options, query_one, run_in_threads, serve

pytestmark = pytest.mark.django_db(transaction=True)


def session() -> dict[str, Any]:
    status, body = serve("/db/session/")
    assert status == 200, body
    return json.loads(body)


def test_the_engine_is_djangos_postgresql_backend_on_psycopg2() -> None:
    from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

    assert isinstance(connections["default"], DjangoWrapper)
    assert connection.vendor == "postgresql"
    with connection.cursor():
        assert isinstance(connection.connection, psycopg2.extensions.connection)


def test_consecutive_requests_are_served_by_the_same_server_connection(fresh_pools: None) -> None:
    pids = {session()["backend_pid"] for _ in range(10)}
    assert len(pids) == 1
    assert connection.connection is None  # given back at the end of each request


def test_each_request_takes_a_connection_and_gives_it_back(seeded_books: list[int]) -> None:
    pool = connection.pool
    before = pool.stats()["requests_num"]
    for pk in seeded_books:
        status, body = serve(f"/books/{pk}/")
        assert status == 200
        assert json.loads(body)["id"] == pk
    assert pool.stats()["requests_num"] - before == len(seeded_books)
    assert pool.stats()["pool_in_use"] == 0


def test_a_process_never_holds_more_than_max_size_connections_for_an_alias(
    seeded_books: list[int], peak_sampler: Any
) -> None:
    options = connection.settings_dict["OPTIONS"]
    options["application_name"] = tag = f"pgpool-max-size-{os.getpid()}"
    try:
        with pool_options(max_size=3, timeout=30):

            def requests(index: int) -> None:
                for n in range(15):
                    status, _ = serve(f"/books/{seeded_books[(index + n) % 3]}/buy/", "POST")
                    assert status == 200

            with peak_sampler(application_name=tag) as sampler:
                run_in_threads(12, requests)
            assert sampler.peak == 3
            assert connection.pool.stats()["requests_queued"] > 0
    finally:
        del options["application_name"]
        connection.close_pool()
    assert Book.objects.filter(pk__in=seeded_books).count() == 3


def test_an_exhausted_pool_fails_the_query_with_a_django_operational_error() -> None:
    with pool_options(max_size=1, timeout=0.3, release="request"):
        holding, release = threading.Event(), threading.Event()

        def hold_the_only_connection() -> None:
            Author.objects.count()
            holding.set()
            release.wait()
            connection.close()

        holder = threading.Thread(target=hold_the_only_connection)
        holder.start()
        holding.wait()
        try:
            with pytest.raises(OperationalError) as caught:
                Author.objects.count()
        finally:
            release.set()
            holder.join()
    assert isinstance(caught.value, PoolTimeout)
    message = str(caught.value)
    assert "pool 'default'" in message and "0.3 s" in message and "All 1 connections" in message


def test_a_transaction_left_open_is_rolled_back_before_the_next_user() -> None:
    connection.set_autocommit(False)
    Author.objects.create(name="never committed")
    connection.close()  # given back mid-transaction
    assert not Author.objects.filter(name="never committed").exists()


def test_an_aborted_transaction_does_not_reach_the_next_user() -> None:
    connection.set_autocommit(False)
    with pytest.raises(DataError), connection.cursor() as cursor:
        cursor.execute("SELECT 1/0")
    connection.close()
    assert Author.objects.count() == 0  # would fail in an aborted transaction


def test_a_connection_killed_on_the_server_is_not_handed_out_again(
    admin: Any, fresh_pools: None
) -> None:
    pid = session()["backend_pid"]
    query_one(admin, "SELECT pg_terminate_backend(%s)", [pid])
    assert eventually(
        lambda: not query_one(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
    )
    assert session()["backend_pid"] != pid  # the very next request already gets a live one


def test_pooled_connections_follow_override_settings_time_zone() -> None:
    assert session()["time_zone"] == "UTC"  # USE_TZ=True: Django's connections use UTC
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        assert session()["time_zone"] == "Asia/Tokyo"
        with override_settings(TIME_ZONE="America/Lima"):
            assert session()["time_zone"] == "America/Lima"
    assert session()["time_zone"] == "UTC"


def _set_alias_time_zone(name: str | None) -> None:
    wrapper = connections["default"]
    wrapper.settings_dict["TIME_ZONE"] = name
    # Cached per wrapper; Django's own setting_changed handler clears them the same way.
    wrapper.__dict__.pop("timezone", None)
    wrapper.__dict__.pop("timezone_name", None)


def test_a_per_alias_time_zone_is_applied_to_every_pooled_connection(fresh_pools: None) -> None:
    saved = connection.settings_dict["TIME_ZONE"]
    _set_alias_time_zone("Africa/Nairobi")
    try:
        for _ in range(3):
            assert session()["time_zone"] == "Africa/Nairobi"
    finally:
        _set_alias_time_zone(saved)
    assert session()["time_zone"] == "UTC"


def current_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return str(cursor.fetchone()[0])


def test_a_settings_change_builds_a_new_pool_and_retires_the_old_one(server: Any) -> None:
    test_database = connection.settings_dict["NAME"]
    assert current_database() == test_database
    old_pool = connection.pool
    connection.close()
    connection.settings_dict["NAME"] = server.dbname
    try:
        assert current_database() == server.dbname
        assert connection.pool is not old_pool
        assert old_pool.closed
        connection.close()
    finally:
        connection.settings_dict["NAME"] = test_database
    assert current_database() == test_database


@pytest.mark.django_db(databases=["default", "replica"], transaction=True)
def test_each_alias_gets_its_own_pool() -> None:
    Author.objects.using("default").count()
    Author.objects.using("replica").count()
    default_pool, replica_pool = connections["default"].pool, connections["replica"].pool
    assert isinstance(default_pool, ConnectionPool) and isinstance(replica_pool, ConnectionPool)
    assert default_pool is not replica_pool
    with connections["default"].cursor() as primary, connections["replica"].cursor() as replica:
        primary.execute("SELECT pg_backend_pid()")
        replica.execute("SELECT pg_backend_pid()")
        assert primary.fetchone() != replica.fetchone()
    assert set(django_pgpool.stats()) >= {"default", "replica"}
    for alias in ("default", "replica"):
        connections[alias].close()


def test_close_pool_while_other_threads_hold_connections(admin: Any) -> None:
    started, closed = threading.Event(), threading.Event()
    results: list[Any] = []

    def busy_thread() -> None:
        results.append(Author.objects.count())
        started.set()
        closed.wait()
        results.append(Author.objects.count())  # same connection, still fine
        connection.close()  # goes back to a closed pool: closed, no error
        results.append(Author.objects.count())  # a new pool serves the thread

    thread = threading.Thread(target=busy_thread)
    thread.start()
    started.wait()
    connection.close_pool()
    django_pgpool.close_pools()
    closed.set()
    thread.join()
    assert results == [0, 0, 0]


def test_conn_max_age_with_the_pool_is_refused_with_an_explanation(fresh_pools: None) -> None:
    connection.settings_dict["CONN_MAX_AGE"] = 60
    try:
        with pytest.raises(ImproperlyConfigured) as caught:
            Author.objects.count()
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = 0
    message = str(caught.value)
    assert "CONN_MAX_AGE=60" in message
    assert "the pool owns the connections, not the thread" in message


def test_conn_health_checks_make_every_checkout_a_round_trip_check(fresh_pools: None) -> None:
    connection.settings_dict["CONN_HEALTH_CHECKS"] = True
    try:
        connection.close_pool()
        session()
        pool = connection.pool
        assert pool.config.check_every_checkout
        for expected_checks in (1, 2, 3):
            # Once the returned connection has been reset in the background and
            # sits idle, even a moment later, taking it costs a round-trip check.
            assert eventually(lambda: pool.stats()["pool_available"] == 1)
            session()
            assert pool.stats()["checks_num"] == expected_checks
    finally:
        connection.settings_dict["CONN_HEALTH_CHECKS"] = False
        connection.close_pool()


def test_without_a_pool_key_the_backend_pools_with_the_documented_defaults(
    fresh_pools: None,
) -> None:
    options = connection.settings_dict["OPTIONS"]
    saved = options.pop("pool")
    try:
        Author.objects.count()
        assert connection.pool.config == PoolConfig(name="default")
        connection.close()
    finally:
        options["pool"] = saved
        connection.close_pool()


def test_pool_false_connects_directly_like_djangos_own_backend(fresh_pools: None) -> None:
    with pool_options():
        connection.settings_dict["OPTIONS"]["pool"] = False
        assert connection.pool is None
        Author.objects.count()
        assert not hasattr(connection.connection, "pool_entry")
        assert "default" not in django_pgpool.stats()


def test_invalid_pool_options_fail_at_first_use_naming_alias_option_value_and_fix(
    fresh_pools: None,
) -> None:
    with pool_options(max_size=-2), pytest.raises(ImproperlyConfigured) as caught:
        Author.objects.count()
    assert "DATABASES['default']['OPTIONS']['pool']['max_size'] = -2" in str(caught.value)
    assert ">= 1" in str(caught.value)


def test_atomic_blocks_and_savepoints_work_on_pooled_connections() -> None:
    with transaction.atomic():
        Author.objects.create(name="outer")
        try:
            with transaction.atomic():
                Author.objects.create(name="inner")
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
    assert list(Author.objects.values_list("name", flat=True)) == ["outer"]


def test_requests_from_many_threads_through_a_live_server(
    live_server: Any, seeded_books: list[int], peak_sampler: Any
) -> None:
    def fetch(pk: int) -> dict[str, Any]:
        with urllib.request.urlopen(f"{live_server.url}/books/{pk}/", timeout=30) as response:
            return json.loads(response.read())

    database = connection.settings_dict["NAME"]
    with peak_sampler(database=database) as sampler, ThreadPoolExecutor(8) as executor:
        results = list(executor.map(fetch, seeded_books * 10))
    assert [result["id"] for result in results] == seeded_books * 10
    assert sampler.peak <= connection.pool.config.max_size + 1  # + this test's own connection


def test_a_pool_error_is_never_rewrapped_by_django() -> None:
    with pool_options(max_size=1, timeout=0.1):
        conn = connection.pool.getconn()
        try:
            with pytest.raises(PoolTimeout):
                Author.objects.count()
            assert not connection.errors_occurred
        finally:
            connection.pool.putconn(conn)


def test_a_query_after_a_timeout_works_once_a_connection_is_free() -> None:
    with pool_options(max_size=1, timeout=0.1):
        conn = connection.pool.getconn()
        with pytest.raises(PoolTimeout):
            Author.objects.count()
        connection.pool.putconn(conn)
        started = time.monotonic()
        assert Author.objects.count() == 0
        assert time.monotonic() - started < 1


def test_the_admin_works_on_pooled_connections(seeded_books: list[int]) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    User.objects.create_superuser("admin", "admin@example.com", "pw")
    client = Client()
    assert client.login(username="admin", password="pw")
    response = client.get("/admin/library/book/")
    assert response.status_code == 200
    assert b"The Dispossessed" in response.content


def test_a_connection_error_reaching_the_orm_names_the_alias() -> None:
    from django_pgpool.base import DatabaseWrapper

    entry = {**connection.settings_dict, "NAME": "pgpool_no_such_database"}
    missing = DatabaseWrapper(entry, alias="missing")
    started = time.monotonic()
    with pytest.raises(OperationalError) as caught:
        missing.ensure_connection()
    assert time.monotonic() - started < 2
    missing.close_pool()
    message = str(caught.value)
    assert message.startswith("pool 'missing' could not open a connection: ")
    assert 'database "pgpool_no_such_database" does not exist' in message


def test_code_patching_ensure_connection_on_djangos_base_class_sees_every_call() -> None:
    # What Django's own AssertNumQueriesUponConnectionTests does: the backend
    # must not override ensure_connection(), or the captured method calls the
    # patch again, and again (as Django's stock backend, it is the base's).
    from unittest import mock

    from django.db.backends.base.base import BaseDatabaseWrapper

    real_ensure_connection = connection.ensure_connection
    connection.close()
    calls = []

    def ensure_connection_and_configure() -> None:
        calls.append(connection.connection is None)
        real_ensure_connection()

    with mock.patch.object(
        BaseDatabaseWrapper, "ensure_connection", side_effect=ensure_connection_and_configure
    ):
        assert Book.objects.count() >= 0
    assert calls[0] is True, "the patched method was not called to open the connection"
