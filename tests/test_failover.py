"""When the database moves: servers that change role, switchovers and failovers.

Every test starts its own servers on loopback: two independent servers behind
one multi-host alias (``HOST`` "127.0.0.1,127.0.0.1", ``PORT`` "a,b"), or a
primary and a streaming standby made with ``pg_basebackup -R``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from django.db import DatabaseError, connections, transaction

from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testsupport import eventually
from testsupport.pgserver import EmbeddedPostgres
from testsupport.replication import execute, make_read_only, primary_and_standby, promote

from .clusters import CREATE_WRITES, Write, aliases, multi_host_settings, writers
from .helpers import query_one

PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def two_servers() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """Two independent servers; tests make the first read-only and must undo it."""
    with (
        EmbeddedPostgres(password=PASSWORD) as first,
        EmbeddedPostgres(password=PASSWORD) as second,
    ):
        for server in (first, second):
            execute(server, CREATE_WRITES)
        yield first, second


@pytest.fixture
def servers(
    two_servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    yield two_servers
    first = two_servers[0]
    execute(first, "ALTER SYSTEM RESET default_transaction_read_only")
    execute(first, "SELECT pg_reload_conf()")


def multi_host_pool(
    servers: tuple[EmbeddedPostgres, ...], name: str, target: str = "read-write", **options: Any
) -> ConnectionPool:
    kwargs = {
        "host": ",".join("127.0.0.1" for _ in servers),
        "port": ",".join(str(server.port) for server in servers),
        "user": "postgres",
        "password": PASSWORD,
        "dbname": "postgres",
        "application_name": name,
        "target_session_attrs": target,
    }
    return ConnectionPool(PoolConfig(name=name, **options), kwargs)


def port_of(conn: Any) -> int:
    return int(conn.info.port)


def insert(conn: Any) -> None:
    with conn.cursor() as cursor:
        cursor.execute("INSERT INTO writes (thread) VALUES (0)")


# ------------------------------------------------------------------ the pool itself


def test_a_connection_whose_server_turned_read_only_fails_one_write_then_none(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], caplog: Any
) -> None:
    first, second = servers
    caplog.set_level(logging.INFO, logger="django_pgpool")
    pool = multi_host_pool(servers, "ro-once", min_size=4, max_size=4)
    try:
        pool.open(wait=True)
        assert pool.roles.servers() == {f"127.0.0.1:{first.port}": 4}
        make_read_only(first)
        # Idle since before the change, the connections can't know: the first
        # write finds out, and says so for all of them.
        conn = pool.getconn()
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            insert(conn)
        pool.putconn(conn)
        for _ in range(12):
            conn = pool.getconn()
            insert(conn)  # never again
            assert port_of(conn) == second.port
            pool.putconn(conn)
        assert eventually(lambda: pool.roles.servers() == {f"127.0.0.1:{second.port}": 4})
        stats = pool.stats()
        assert stats["server_events"] == 1
        assert stats["connections_wrong_role"] == 4
        assert stats["connections_suspect"] == 0
    finally:
        pool.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    changed = [m for m in warnings if f"127.0.0.1:{first.port}" in m and "retired" in m]
    assert len(changed) == 1, warnings
    assert "read-only (default_transaction_read_only=on)" in changed[0]
    assert "the alias asks for read-write" in changed[0]


def test_a_connection_that_learnt_its_servers_new_role_is_retired_at_checkout_for_free(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    first, second = servers
    pool = multi_host_pool(servers, "ro-free", min_size=0, max_size=2)
    try:
        conn = pool.getconn()
        assert port_of(conn) == first.port
        make_read_only(first)
        query_one(conn, "SELECT 1")  # any answer carries the new setting
        assert conn.get_parameter_status("default_transaction_read_only") == "on"
        pool.putconn(conn)
        checks_before = pool.stats()["checks_num"]
        conn = pool.getconn()
        insert(conn)  # no write ever failed
        assert port_of(conn) == second.port
        pool.putconn(conn)
        stats = pool.stats()
        assert stats["connections_wrong_role"] == 1
        assert stats["checks_num"] == checks_before  # two local reads, no round trip
    finally:
        pool.close()


def test_an_alias_that_asks_for_no_role_is_left_alone(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
) -> None:
    first, _ = servers
    pool = multi_host_pool(servers, "ro-any", target="any", min_size=0, max_size=1)
    try:
        conn = pool.getconn()
        make_read_only(first)
        with pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            insert(conn)
        pool.putconn(conn)
        conn = pool.getconn()
        assert port_of(conn) == first.port  # what the alias asked for: any server
        pool.putconn(conn)
        assert pool.stats()["server_events"] == 0
    finally:
        pool.close()


def test_a_standby_alias_retires_connections_to_a_server_that_left_recovery() -> None:
    with primary_and_standby(PASSWORD) as (primary, standby):
        pool = multi_host_pool((standby, primary), "standby-only", target="standby", max_size=2)
        try:
            conn = pool.getconn()
            assert port_of(conn) == standby.port
            promote(standby)
            query_one(conn, "SELECT 1")
            assert conn.get_parameter_status("in_hot_standby") == "off"
            pool.putconn(conn)
            with pytest.raises(psycopg2.OperationalError):
                pool.getconn(timeout=1)  # no standby left: nothing to hand out
            assert pool.stats()["connections_wrong_role"] == 1
        finally:
            pool.close()


def test_a_terminated_session_makes_the_others_suspect_but_keeps_those_that_answer(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], caplog: Any
) -> None:
    first, _ = servers
    caplog.set_level(logging.INFO, logger="django_pgpool")
    pool = multi_host_pool(servers, "terminated", min_size=3, max_size=3, check_after_idle=60)
    try:
        pool.open(wait=True)
        conn = pool.getconn()
        execute(first, f"SELECT pg_terminate_backend({query_one(conn, 'SELECT pg_backend_pid()')})")
        time.sleep(0.1)
        with pytest.raises(psycopg2.OperationalError) as lost:
            query_one(conn, "SELECT 1")
        assert pool.roles.note_error(conn, lost.value) == "gone"
        pool.putconn(conn)
        # The two others were checked, answered and stay.
        assert eventually(lambda: pool.stats()["checks_num"] == 2)
        stats = pool.stats()
        assert stats["connections_lost"] == 0 and stats["connections_suspect"] == 0
        assert stats["connections_closed"] == 1  # the terminated one
    finally:
        pool.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("2 other(s) answered" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ through Django


@pytest.fixture(params=["request", "transaction"])
def writable_alias(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres],
    django_db_blocker: Any,
    request: pytest.FixtureRequest,
) -> Iterator[str]:
    settings_dict = multi_host_settings(
        servers, "writable", min_size=2, max_size=4, timeout=5, release=request.param
    )
    with django_db_blocker.unblock(), aliases(writable=settings_dict):
        yield "writable"


def port_written(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("INSERT INTO writes (thread) VALUES (0) RETURNING inet_server_port()")
        return int(cursor.fetchone()[0])


def test_an_autocommit_write_refused_as_read_only_is_retried_once_on_a_writable_server(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], writable_alias: str
) -> None:
    first, second = servers
    db = connections[writable_alias]
    assert port_written(writable_alias) == first.port
    make_read_only(first)
    # The same request, the same connection: the server refuses, the statement
    # runs again on a fresh connection, the caller sees only its result.
    assert port_written(writable_alias) == second.port
    assert port_written(writable_alias) == second.port
    db.close()
    assert db.pool.stats()["statements_retried"] == 1


def port_read(alias: str) -> int:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT inet_server_port()")
        return int(cursor.fetchone()[0])


@pytest.mark.parametrize("first", ["a write", "a read"])
def test_a_transaction_that_begins_on_a_read_only_server_moves_before_its_first_result(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], writable_alias: str, first: str
) -> None:
    first_server, second = servers
    db = connections[writable_alias]
    assert port_written(writable_alias) == first_server.port
    make_read_only(first_server)
    # Its BEGIN runs on the read-only server: the first statement is refused
    # (a write), or answers with the server's new role (a read). Either way
    # nothing else ran in the transaction: it begins again on the new server.
    with transaction.atomic(using=writable_alias):
        if first == "a read":
            assert port_read(writable_alias) == second.port
        assert port_written(writable_alias) == second.port
    db.close()
    assert db.pool.stats()["statements_retried"] == 1


def test_a_transaction_running_when_the_server_turns_read_only_finishes_there(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], writable_alias: str
) -> None:
    first, second = servers
    db = connections[writable_alias]
    with transaction.atomic(using=writable_alias):
        assert port_written(writable_alias) == first.port
        make_read_only(first)
        # Read-only applies to transactions that begin afterwards.
        assert port_written(writable_alias) == first.port
    # The answers told the new role: the next transaction begins elsewhere,
    # without a failure (the connection is replaced between the two).
    with transaction.atomic(using=writable_alias):
        assert port_written(writable_alias) == second.port
    db.close()
    assert db.pool.stats()["statements_retried"] == 0


def test_a_write_is_not_retried_once_the_request_changed_its_session(
    servers: tuple[EmbeddedPostgres, EmbeddedPostgres], writable_alias: str
) -> None:
    first, second = servers
    db = connections[writable_alias]
    with db.cursor() as cursor:
        cursor.execute("SET search_path TO public")
    assert port_written(writable_alias) == first.port
    make_read_only(first)
    with pytest.raises(DatabaseError):
        port_written(writable_alias)  # its session would not follow it
    db.close()
    assert port_written(writable_alias) == second.port  # the next request
    db.close()


# ------------------------------------------------------------------ failover


def writes_between(results: list[Write], start: float, end: float) -> list[Write]:
    return [w for w in results if w.finished >= start and w.started < end]


@pytest.mark.slow
def test_failover_every_write_succeeds_again_within_5_s_of_the_promotion(
    record_property: Any, django_db_blocker: Any
) -> None:
    with primary_and_standby(PASSWORD) as (primary, standby):
        execute(primary, CREATE_WRITES)
        alias = "failover"
        settings_dict = multi_host_settings(
            (primary, standby), alias, min_size=2, max_size=8, timeout=10
        )
        with django_db_blocker.unblock(), aliases(failover=settings_dict):
            with writers(alias, threads=8, transactions=True) as results:
                time.sleep(1.0)
                stopped = time.monotonic()
                primary.stop()  # the primary dies
                time.sleep(1.0)  # an HA manager notices...
                promoted = time.monotonic()
                promote(standby)  # ...and promotes the standby
                time.sleep(6.0)
            pool = connections[alias].pool

            # A failure is counted when its write began: a transaction whose
            # COMMIT was lost with the primary raises only after Django's
            # atomic() took a new connection (set_autocommit), which waits out
            # the outage in the pool.
            failed = [w for w in results if not w.ok]
            first_write = min(w.finished for w in results if w.ok and w.port == standby.port)
            record_property("writes_failed_during_failover", len(failed))
            record_property(
                "seconds_from_promotion_to_first_write", round(first_write - promoted, 2)
            )
            print(
                f"\nfailover: {len(failed)} of {len(results)} writes failed, all begun before "
                f"the promotion (in flight when the primary stopped); the first write on the "
                f"promoted server {first_write - promoted:.2f} s after the promotion, and every "
                f"write begun after the promotion succeeded there"
            )
            assert all(w.ok for w in results if w.finished < stopped)
            assert all(w.started < promoted for w in failed), failed
            assert first_write - promoted < 5.0
            after = [w for w in results if w.started >= promoted]
            assert len(after) > 50 and all(w.ok and w.port == standby.port for w in after)
            assert len(failed) <= 8  # at most one per thread: what was in flight
            assert set(pool.roles.servers()) == {f"127.0.0.1:{standby.port}"}

            # The old primary comes back, writable (nothing fenced it yet), and
            # being first in HOST it takes the pool's connections again...
            primary.start()
            pool.drain()
            with writers(alias, threads=8, transactions=True) as results:
                assert eventually(
                    lambda: set(pool.roles.servers()) == {f"127.0.0.1:{primary.port}"}, timeout=5
                )
                time.sleep(0.5)
                fenced = time.monotonic()
                make_read_only(primary)  # ...until it is fenced, read-only
                assert eventually(
                    lambda: set(pool.roles.servers()) == {f"127.0.0.1:{standby.port}"}, timeout=5
                )
                moved_back = time.monotonic() - fenced
                time.sleep(1.0)
            stats = pool.stats()

    read_only_failures = [w for w in results if w.code == "25006"]
    after_fence = [w for w in results if w.started >= fenced]
    record_property("writes_failed_with_25006_after_fencing", len(read_only_failures))
    print(
        f"fenced old primary: {len(read_only_failures)} writes failed with 25006, "
        f"{stats['statements_retried']} were retried, all connections on the new primary "
        f"{moved_back:.2f} s after the fence, {stats['connections_wrong_role']} connections retired"
    )
    assert len(read_only_failures) <= 1  # at most once per process
    assert all(w.ok for w in after_fence if w.code != "25006")
    assert stats["server_events"] >= 1 and stats["connections_wrong_role"] >= 1
