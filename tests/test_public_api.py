"""The pool outside the ORM: ``django_pgpool.connection()``, ``getconn()``, ``putconn()``,
``closeall()``, ``stats()``, sharing the alias's pool (limits, reset, statistics) with
the ORM."""

from __future__ import annotations

import threading
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

import django_pgpool
from django_pgpool import PoolError, PoolTimeout
from testproject.library.models import Author

from .aliases import temporary_alias
from .helpers import eventually, pool_options, query_one

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _orm_connection_given_back() -> None:
    # The test database set-up leaves the ORM holding a connection; give it
    # back so that pool_in_use counts only what each test takes.
    connection.close()


def backend_pid(conn: Any) -> int:
    return int(query_one(conn, "SELECT pg_backend_pid()"))


def insert_author(conn: Any, name: str) -> None:
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO library_author (name) VALUES (%s)", [name])


def author_exists(name: str) -> bool:
    exists = Author.objects.filter(name=name).exists()
    connection.close()
    return exists


def in_use() -> int:
    return int(django_pgpool.get_pool("default").stats()["pool_in_use"])


def server_has_backend(admin: Any, pid: int) -> bool:
    return bool(query_one(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]))


def test_get_pool_returns_the_aliases_pool_once_the_backend_has_loaded() -> None:
    import django_pgpool.pool as pool_module  # the backend imports it too

    pool = django_pgpool.get_pool("default")
    assert isinstance(pool, pool_module.ConnectionPool)
    assert pool is connection.pool and pool.name == "default"


def test_a_with_block_is_one_transaction_committed_when_it_succeeds() -> None:
    with django_pgpool.connection("default") as conn:
        insert_author(conn, "Octavia E. Butler")
        # The ORM uses another connection: the row is not committed yet.
        assert not author_exists("Octavia E. Butler")
    assert author_exists("Octavia E. Butler")
    assert in_use() == 0


def test_a_with_block_that_raises_is_rolled_back() -> None:
    def write_then_fail() -> None:
        with django_pgpool.connection() as conn:
            insert_author(conn, "Never Written")
            raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        write_then_fail()
    assert not author_exists("Never Written")
    assert in_use() == 0


def test_a_with_block_whose_sql_fails_gives_back_a_usable_connection() -> None:
    with pytest.raises(psycopg2.errors.DivisionByZero), django_pgpool.connection() as conn:
        query_one(conn, "SELECT 1/0")
    assert in_use() == 0
    with django_pgpool.connection() as conn:
        assert query_one(conn, "SELECT 42") == 42


def test_a_raw_checkout_is_counted_in_the_aliases_statistics() -> None:
    before = django_pgpool.get_pool("default").stats()["requests_num"]
    with django_pgpool.connection("default"):
        assert django_pgpool.stats()["default"]["pool_in_use"] == 1
    conn = django_pgpool.getconn("default")
    django_pgpool.putconn(conn)
    assert django_pgpool.stats()["default"]["requests_num"] == before + 2


def test_with_max_size_1_an_orm_query_waits_while_a_raw_connection_is_held() -> None:
    with pool_options(max_size=1, timeout=10):
        raw = django_pgpool.getconn("default")
        raw_pid = backend_pid(raw)
        raw.rollback()
        orm_pid: list[int] = []

        def orm_query() -> None:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                orm_pid.append(cursor.fetchone()[0])
            connection.close()

        thread = threading.Thread(target=orm_query)
        thread.start()
        assert eventually(lambda: django_pgpool.stats()["default"]["requests_waiting"] == 1)
        assert thread.is_alive() and not orm_pid
        django_pgpool.putconn(raw)
        thread.join(10)
        # The only connection of the pool went from the raw caller to the ORM.
        assert orm_pid == [raw_pid]


def test_with_max_size_1_a_raw_checkout_times_out_while_the_orm_holds_the_connection() -> None:
    with pool_options(max_size=1, timeout=10, release="request"):
        Author.objects.count()  # the ORM keeps its connection until close()
        with pytest.raises(PoolTimeout, match=r"pool 'default'.*within 0\.2 s"):
            django_pgpool.getconn("default", timeout=0.2)
        connection.close()
        with django_pgpool.connection("default", timeout=0.2) as conn:
            assert query_one(conn, "SELECT 1") == 1


def test_session_state_set_on_a_raw_connection_does_not_reach_the_orm() -> None:
    with pool_options(max_size=1):
        with django_pgpool.connection() as conn:
            raw_pid = backend_pid(conn)
            with conn.cursor() as cursor:
                cursor.execute("SET statement_timeout = '1234ms'")
                cursor.execute("SET TIME ZONE 'Asia/Tokyo'")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
            assert cursor.fetchone() == (raw_pid, "0")
            cursor.execute("SELECT current_setting('TimeZone')")
            assert cursor.fetchone()[0] == "UTC"  # what Django sets with USE_TZ
        connection.close()


def test_getconn_hands_out_a_connection_in_a_transaction_as_psycopg2s_pool_does() -> None:
    conn = django_pgpool.getconn("default")
    assert conn.autocommit is False
    insert_author(conn, "Committed")
    conn.commit()
    insert_author(conn, "Left uncommitted")
    django_pgpool.putconn(conn)
    assert author_exists("Committed")
    assert not author_exists("Left uncommitted")
    assert in_use() == 0


def test_putconn_with_close_closes_the_server_connection(admin: Any) -> None:
    conn = django_pgpool.getconn()
    pid = backend_pid(conn)
    django_pgpool.putconn(conn, close=True)
    assert conn.closed
    assert eventually(lambda: not server_has_backend(admin, pid))
    assert in_use() == 0


def test_putconn_refuses_a_connection_that_no_pool_handed_out(server: Any) -> None:
    stray = server.connect()
    try:
        with pytest.raises(PoolError, match="not taken from a django_pgpool pool"):
            django_pgpool.putconn(stray)
    finally:
        stray.close()


def test_putconn_refuses_a_connection_given_back_twice() -> None:
    conn = django_pgpool.getconn()
    django_pgpool.putconn(conn)
    with pytest.raises(PoolError, match="returned twice"):
        django_pgpool.putconn(conn)


def test_closeall_closes_the_aliases_connections_and_the_next_use_builds_a_new_pool(
    admin: Any, fresh_pools: None
) -> None:
    with django_pgpool.connection("default") as conn:
        old_pid = backend_pid(conn)
    old_pool = django_pgpool.get_pool("default")
    django_pgpool.closeall("default")
    assert old_pool.closed
    assert "default" not in django_pgpool.stats()
    assert eventually(lambda: not server_has_backend(admin, old_pid))
    with django_pgpool.connection("default") as conn:
        assert backend_pid(conn) != old_pid
    assert django_pgpool.get_pool("default") is not old_pool


def test_closeall_lets_a_connection_in_use_finish_its_work_then_closes_it(
    admin: Any, fresh_pools: None
) -> None:
    conn = django_pgpool.getconn("default")
    pid = backend_pid(conn)
    django_pgpool.closeall("default")
    insert_author(conn, "Finished after closeall")
    conn.commit()
    django_pgpool.putconn(conn)
    assert conn.closed
    assert eventually(lambda: not server_has_backend(admin, pid))
    assert author_exists("Finished after closeall")


def test_close_pools_closes_every_alias(fresh_pools: None) -> None:
    with django_pgpool.connection("default"), django_pgpool.connection("replica"):
        pass
    pools = [django_pgpool.get_pool("default"), django_pgpool.get_pool("replica")]
    django_pgpool.close_pools()
    assert all(pool.closed for pool in pools)
    assert django_pgpool.stats() == {}


def test_an_alias_whose_engine_is_not_django_pgpool_is_refused_with_the_fix() -> None:
    with temporary_alias("plain", ENGINE="django.db.backends.sqlite3", NAME=":memory:"):
        for use in (django_pgpool.get_pool, django_pgpool.getconn):
            with pytest.raises(ImproperlyConfigured) as caught:
                use("plain")
            assert str(caught.value) == (
                "DATABASES['plain'] does not use django_pgpool (ENGINE is "
                "'django.db.backends.sqlite3'); set ENGINE to 'django_pgpool'."
            )
        with pytest.raises(ImproperlyConfigured, match="does not use django_pgpool"):
            django_pgpool.connection("plain").__enter__()


def test_an_alias_with_pooling_turned_off_is_refused_with_the_reason() -> None:
    with (
        temporary_alias("unpooled", OPTIONS={"pool": False}),
        pytest.raises(ImproperlyConfigured, match=r"\['pool'\] is False: this alias does not pool"),
    ):
        django_pgpool.getconn("unpooled")
