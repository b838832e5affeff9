"""Changing a running pool: resize, drain, rotating credentials, signals."""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection

from django_pgpool import PoolTimeout
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from django_pgpool.signals import connection_discarded, pool_exhausted
from testsupport.pgserver import EmbeddedPostgres

from .helpers import backends, eventually, pool_options, query_one


def backend_pid(conn: Any) -> int:
    return int(query_one(conn, "SELECT pg_backend_pid()"))


def test_growing_the_pool_lets_waiting_requests_in_at_once(make_pool: Any) -> None:
    pool = make_pool(max_size=1, timeout=10)
    held = pool.getconn()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    eventually(lambda: pool.stats()["requests_waiting"] == 1)
    pool.resize(max_size=2)
    waiter.join(5)
    assert len(got) == 1
    assert pool.stats()["pool_max"] == 2
    pool.putconn(got[0])
    pool.putconn(held)


def test_shrinking_the_pool_closes_idle_connections_now_and_busy_ones_on_return(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=0, max_size=4, max_idle=None)
    conns = [pool.getconn() for _ in range(4)]
    for conn in conns[:2]:
        pool.putconn(conn)
    pool.resize(max_size=1)
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 2)
    pool.putconn(conns[2])
    pool.putconn(conns[3])
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 1)
    # (The server may see a session end a moment before the pool counts it.)
    assert eventually(lambda: pool.stats()["pool_size"] == 1)


def test_resize_refuses_impossible_sizes(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=4)
    with pytest.raises(ValueError, match="max_size=2 below min_size=3"):
        pool.resize(min_size=3, max_size=2)
    with pytest.raises(ValueError, match="max_size must be >= 1 connections"):
        pool.resize(max_size=0)


def test_drain_retires_every_connection_without_disturbing_their_users(make_pool: Any) -> None:
    pool = make_pool(min_size=2, max_size=4)
    busy = pool.getconn()
    idle = pool.getconn()
    old_pids = {backend_pid(busy), backend_pid(idle)}
    pool.putconn(idle)
    pool.drain()
    assert query_one(busy, "SELECT 1") == 1  # still usable until returned
    pool.putconn(busy)
    for _ in range(4):
        conn = pool.getconn()
        assert backend_pid(conn) not in old_pids
        pool.putconn(conn)


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(password=secrets.token_urlsafe(16)) as server:
        yield server


def test_a_password_rotated_while_the_pool_runs(cluster: EmbeddedPostgres) -> None:
    current = {"password": cluster.password}
    kwargs = cluster.settings.connect_kwargs(password=lambda: current["password"])
    pool = ConnectionPool(PoolConfig(name="rotating", min_size=1, max_size=3), kwargs)
    try:
        old = pool.getconn()
        new_password = secrets.token_urlsafe(16)
        with old.cursor() as cursor:
            cursor.execute("ALTER ROLE postgres PASSWORD %s", [new_password])
        current["password"] = new_password  # what a secrets manager would now return
        fresh = pool.getconn()  # a new connection: authenticated with the new password
        assert query_one(fresh, "SELECT 1") == 1
        assert query_one(old, "SELECT 1") == 1  # the old session is unaffected
        pool.putconn(old)
        pool.putconn(fresh)
        pool.drain()
        conns = [pool.getconn() for _ in range(3)]
        assert all(query_one(conn, "SELECT 1") == 1 for conn in conns)
        for conn in conns:
            pool.putconn(conn)
    finally:
        pool.close()


def test_connect_params_are_evaluated_for_every_new_connection(server: Any) -> None:
    calls: list[int] = []

    def fresh_params() -> dict[str, Any]:
        calls.append(1)
        return {"application_name": f"pgpool-token-{len(calls)}"}

    pool = ConnectionPool(
        PoolConfig(name="params", min_size=0, max_size=2, connect_params=fresh_params),
        server.connect_kwargs(),
    )
    try:
        first, second = pool.getconn(), pool.getconn()
        names = {query_one(c, "SHOW application_name") for c in (first, second)}
        assert names == {"pgpool-token-1", "pgpool-token-2"}
        pool.putconn(first)
        pool.putconn(second)
    finally:
        pool.close()


def test_pid_in_application_name_tags_connections_with_the_process(server: Any) -> None:
    pool = ConnectionPool(
        PoolConfig(name="tagged", min_size=0), server.connect_kwargs(application_name="web-{pid}")
    )
    try:
        conn = pool.getconn()
        assert query_one(conn, "SHOW application_name") == f"web-{os.getpid()}"
        pool.putconn(conn)
    finally:
        pool.close()


@pytest.mark.django_db(transaction=True)
def test_django_signals_report_exhaustion_and_discarded_connections() -> None:
    exhausted: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []

    def on_exhausted(sender: str, **info: Any) -> None:
        exhausted.append({"sender": sender, **info})

    def on_discarded(sender: str, **info: Any) -> None:
        discarded.append({"sender": sender, **info})

    pool_exhausted.connect(on_exhausted)
    connection_discarded.connect(on_discarded)
    try:
        with pool_options(min_size=0, max_size=1, timeout=0.2):
            pool = connection.pool
            held = pool.getconn()
            with pytest.raises(PoolTimeout), connection.cursor():
                pass
            pool.putconn(held, close=True)
    finally:
        pool_exhausted.disconnect(on_exhausted)
        connection_discarded.disconnect(on_discarded)
    assert exhausted == [
        {
            "sender": "default",
            "signal": pool_exhausted,
            "max_size": 1,
            "timeout": 0.2,
            "waiting": 1,
            "unreachable": False,
        }
    ]
    assert {
        "sender": "default",
        "signal": connection_discarded,
        "reason": "the caller asked to close it",
    } in discarded


def test_a_failing_listener_never_breaks_the_pool(make_pool: Any, caplog: Any) -> None:
    pool = make_pool(max_size=1)

    def broken(event: str, info: dict[str, Any]) -> None:
        raise RuntimeError("listener bug")

    pool.on_event = broken
    pool.putconn(pool.getconn(), close=True)
    conn = pool.getconn()
    assert query_one(conn, "SELECT 1") == 1
    pool.putconn(conn)
    assert "listener failed" in caplog.text


def test_warm_up_fails_fast_when_the_database_is_unreachable() -> None:
    pool = ConnectionPool(
        PoolConfig(name="warm", min_size=2),
        {"host": "127.0.0.1", "port": 1, "user": "x", "dbname": "x"},
    )
    started = time.monotonic()
    with pytest.raises(PoolTimeout, match="could not open its 2 connection"):
        pool.open(wait=True, timeout=1.0)
    assert time.monotonic() - started < 3
    pool.close()


def shell_output(cluster: EmbeddedPostgres, capfd: Any, **settings: Any) -> str:
    """What ``manage.py dbshell`` prints for a query, for an alias with these settings."""
    from django.db import connections

    from django_pgpool.base import DatabaseWrapper

    entry = {**cluster.settings.django_database(), **settings}
    entry = connections.configure_settings({"default": dict(entry), "shell": entry})["shell"]
    wrapper = DatabaseWrapper(entry, alias="shell")
    capfd.readouterr()
    wrapper.client.runshell(["-X", "-A", "-t", "-c", "SELECT 'shell-as-' || current_user"])
    return str(capfd.readouterr().out)


@pytest.mark.skipif(not shutil.which("psql"), reason="psql is not installed")
def test_dbshell_logs_in_with_a_callable_password(cluster: EmbeddedPostgres, capfd: Any) -> None:
    password = cluster.password
    output = shell_output(cluster, capfd, PASSWORD=lambda: password)
    assert "shell-as-postgres" in output


@pytest.mark.skipif(not shutil.which("psql"), reason="psql is not installed")
def test_dbshell_takes_credentials_from_connect_params(
    cluster: EmbeddedPostgres, capfd: Any
) -> None:
    password = cluster.password
    output = shell_output(
        cluster,
        capfd,
        PASSWORD="an-expired-token",
        OPTIONS={"pool": {"connect_params": lambda: {"password": password}}},
    )
    assert "shell-as-postgres" in output
