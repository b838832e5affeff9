"""A network that goes silent: no connection can stop the pool, and every wait has a bound.

Two kinds of silence (see tests/network.py). A proxy that stops forwarding:
the server, or a NAT on the way, stops answering while both kernels still
acknowledge what is sent, so only the pool's own time limits apply. A cable
cut in a network namespace: packets are dropped, and TCP's keepalives and
``tcp_user_timeout`` apply.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from django_pgpool.pool import ConnectionPool

from .helpers import backends, eventually, query_one
from .network import Proxy, dropping_link_or_skip, within

#: The bounds the README documents.
CHECK_TIMEOUT = 5.0
SILENT_REQUEST_BOUND = 10.0


@pytest.fixture
def proxy(server: Any) -> Iterator[Proxy]:
    through = Proxy((server.host, server.port))
    yield through
    through.heal()
    through.close()


def through(proxy: Proxy, server: Any, make_pool: Any, **options: Any) -> ConnectionPool:
    """A pool whose connections go through ``proxy``."""
    name = f"pgpool-silent-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    pool: ConnectionPool = make_pool(
        proxy.connect_kwargs(server, application_name=name), name=name, **options
    )
    pool.application_name = name
    return pool


def socket_option(conn: Any, level: int, option: int) -> int:
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        return int(sock.getsockopt(level, option))
    finally:
        sock.close()


def fill_send_buffer(fd: int) -> None:
    """Write to a non-blocking socket until it stays unwritable for half a second."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    chunk = b"\0" * 65536
    while True:
        try:
            os.write(fd, chunk)
        except BlockingIOError:
            if not poller.poll(500):
                return


def backend_pid(conn: Any) -> int:
    return int(query_one(conn, "SELECT pg_backend_pid()"))


# ------------------------------------------------------------------ defaults


def test_pooled_connections_get_keepalives_and_time_limits_by_default(make_pool: Any) -> None:
    pool = make_pool(min_size=0)
    conn = pool.getconn()
    try:
        params = conn.get_dsn_parameters()
        assert params["connect_timeout"] == "10"
        assert params["keepalives"] == "1"
        assert params["keepalives_idle"] == "5"
        assert params["keepalives_interval"] == "1"
        assert params["keepalives_count"] == "5"
        assert params["tcp_user_timeout"] == "10000"
        # And the kernel applies them to the socket.
        assert socket_option(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert socket_option(conn, socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
        assert socket_option(conn, socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 1
        assert socket_option(conn, socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 5
        assert socket_option(conn, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10000
    finally:
        pool.putconn(conn)


def test_socket_settings_given_for_the_database_win_over_the_defaults(
    make_pool: Any, server: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    pool = make_pool(
        server.connect_kwargs(keepalives_idle=30, tcp_user_timeout=0, keepalives=0), min_size=0
    )
    conn = pool.getconn()
    try:
        params = conn.get_dsn_parameters()
        assert (params["keepalives_idle"], params["tcp_user_timeout"]) == ("30", "0")
        assert params["keepalives"] == "0"
        assert params["connect_timeout"] == "7"  # from libpq's environment variable
        assert socket_option(conn, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert params["keepalives_interval"] == "1"  # the others keep their defaults
    finally:
        pool.putconn(conn)


# ------------------------------------------------------------------ a server that stops answering


def test_the_check_of_a_silent_connection_gives_up_and_the_request_gets_another(
    proxy: Proxy, server: Any, make_pool: Any
) -> None:
    pool = through(proxy, server, make_pool, min_size=0, max_size=2, check_after_idle=0.05)
    conn = pool.getconn()
    silent_pid = backend_pid(conn)
    pool.putconn(conn)
    time.sleep(0.1)  # its reset answered; idle long enough to be checked with a round trip
    proxy.flow_of(conn).silence()
    taken = within(CHECK_TIMEOUT + 5, lambda: pool.getconn(timeout=30))
    assert taken.error is None, taken.error
    assert CHECK_TIMEOUT - 0.2 < taken.seconds < CHECK_TIMEOUT + 2
    assert backend_pid(taken.result) != silent_pid
    pool.putconn(taken.result)
    stats = pool.stats()
    assert (stats["checks_failed"], stats["connections_lost"]) == (1, 1)
    assert stats["pool_size"] == 1


def test_one_silent_connection_cannot_stop_the_pool(
    proxy: Proxy, server: Any, make_pool: Any
) -> None:
    pool = through(
        proxy,
        server,
        make_pool,
        min_size=0,
        max_size=3,
        timeout=1,
        max_lifetime=1.0,
        max_idle=None,
        check_after_idle=0.05,
    )
    first, second, third = (pool.getconn() for _ in range(3))
    silent, healthy, killed = first, second, third
    killed_pid = backend_pid(killed)
    for conn in (silent, healthy, killed):  # the killed one on top of the idle stack
        pool.putconn(conn)
    time.sleep(0.1)  # their resets answered
    proxy.flow_of(silent).silence()
    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    query_one(admin, "SELECT pg_terminate_backend(%s)", [killed_pid])
    admin.close()
    time.sleep(0.2)
    # This request finds the killed connection dead, then takes the healthy
    # one; the pool checks the connections that sat idle beside them in the
    # background, among them the silent one.
    conn = pool.getconn()
    pool.putconn(conn)
    assert eventually(lambda: pool.stats()["checks_num"] >= 2)

    # Steady load, with every connection reaching max_lifetime on the way:
    # the slots of the expired ones must come back while the background
    # check waits on the silent connection.
    results: list[bool] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            try:
                conn = pool.getconn()
            except psycopg2.OperationalError:
                results.append(False)
                continue
            try:
                query_one(conn, "SELECT 1")
                time.sleep(0.01)
            finally:
                pool.putconn(conn)
            results.append(True)

    threads = [threading.Thread(target=requests, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(CHECK_TIMEOUT + 1.5)
    stop.set()
    for thread in threads:
        thread.join(5)
    assert len(results) > 100
    assert all(results), f"{results.count(False)} of {len(results)} requests got no connection"
    stats = pool.stats()
    assert stats["connections_lost"] == 2  # the killed one and the silent one
    assert stats["connections_expired"] >= 3
    assert stats["pool_size"] <= 3


def test_closing_a_connection_whose_socket_is_full_does_not_wait(
    proxy: Proxy, server: Any, make_pool: Any
) -> None:
    pool = through(proxy, server, make_pool, min_size=0, max_size=1)
    conn = pool.getconn()
    proxy.flow_of(conn).silence()
    # Fill the socket's send buffer (libpq's sockets are non-blocking), as a
    # large statement sent into a silent network leaves it.
    fill_send_buffer(conn.fileno())
    closed = within(3, lambda: pool.putconn(conn, close=True))
    assert closed.error is None, closed.error
    assert closed.seconds < 1
    assert pool.stats()["pool_size"] == 0
    proxy.heal()
    other = pool.getconn(timeout=5)  # its slot is free again
    assert query_one(other, "SELECT 1") == 1
    pool.putconn(other)


def test_a_thread_that_ends_mid_transaction_on_a_silent_connection_costs_only_that_connection(
    proxy: Proxy, server: Any, make_pool: Any
) -> None:
    pool = through(proxy, server, make_pool, min_size=0, max_size=2, timeout=2, max_lifetime=1.0)
    flows: list[Any] = []

    def forgetful() -> None:
        conn = pool.getconn(bind_to_thread=True)
        conn.autocommit = False
        query_one(conn, "SELECT 1")  # a transaction is open
        flows.append(proxy.flow_of(conn))
        flows[0].silence()
        # ... and the thread ends without returning the connection.

    thread = threading.Thread(target=forgetful)
    thread.start()
    thread.join()
    assert eventually(lambda: pool.stats()["connections_reclaimed"] == 1)
    assert eventually(lambda: pool.stats()["pool_size"] == 0, timeout=2)
    # The pool goes on serving, expired connections' slots coming back.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        conn = pool.getconn()
        assert query_one(conn, "SELECT 1") == 1
        pool.putconn(conn)
        time.sleep(0.02)
    assert pool.stats()["connections_expired"] >= 1


def test_idle_connections_are_kept_alive_through_a_nat_that_forgets_quiet_flows(
    server: Any, make_pool: Any
) -> None:
    nat = Proxy((server.host, server.port), idle_cutoff=1.5)
    try:
        pool = through(
            nat, server, make_pool, min_size=2, max_size=2, keepalive_time=0.5, max_idle=None
        )
        pool.open(wait=True)
        bystander = psycopg2.connect(**nat.connect_kwargs(server))  # nobody keeps it alive
        time.sleep(3.0)
        held = [pool.getconn(timeout=2), pool.getconn(timeout=2)]
        assert [query_one(conn, "SELECT 1") for conn in held] == [1, 1]
        for conn in held:
            pool.putconn(conn)
        stats = pool.stats()
        assert stats["connections_lost"] == 0 and stats["connections_num"] == 2
        assert stats["checks_num"] >= 4  # the keepalives
        assert nat.flow_of(bystander).forgotten  # what would have happened to them
        bystander.close()
    finally:
        nat.heal()
        nat.close()


def test_keepalives_do_not_keep_connections_above_min_size_from_max_idle(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=1, max_size=3, max_idle=1.5, keepalive_time=0.2)
    held = [pool.getconn() for _ in range(3)]
    for conn in held:
        pool.putconn(conn)
    assert eventually(lambda: pool.stats()["checks_num"] >= 3)  # each had a keepalive
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 1)


# ------------------------------------------------------------------ a cable that is cut


@pytest.mark.slow
def test_a_request_whose_network_goes_silent_mid_query_fails_within_the_bound(
    server: Any, make_pool: Any
) -> None:
    with dropping_link_or_skip((server.host, server.port)) as link:
        pool = make_pool(link.connect_kwargs(server), min_size=1, max_size=2)
        conn = pool.getconn()
        assert query_one(conn, "SELECT 1") == 1
        threading.Timer(0.5, link.cut).start()
        failed = within(SILENT_REQUEST_BOUND + 10, lambda: query_one(conn, "SELECT pg_sleep(60)"))
        assert isinstance(failed.error, psycopg2.OperationalError), failed.error
        assert "timed out" in str(failed.error)
        # Counted from the last byte the server sent.
        assert SILENT_REQUEST_BOUND - 2 < failed.seconds < SILENT_REQUEST_BOUND + 2
        pool.putconn(conn)
        link.heal()
        # The pool recovers by itself.
        again = within(15, lambda: pool.getconn(timeout=15))
        assert again.error is None, again.error
        assert query_one(again.result, "SELECT 1") == 1
        pool.putconn(again.result)
        assert eventually(lambda: pool.stats()["pool_size"] >= 1)


@pytest.mark.slow
def test_the_bound_follows_the_socket_settings_given_for_the_database(
    server: Any, make_pool: Any
) -> None:
    with dropping_link_or_skip((server.host, server.port)) as link:
        kwargs = link.connect_kwargs(server, tcp_user_timeout=2000)
        pool = make_pool(kwargs, min_size=0, max_size=1)
        conn = pool.getconn()
        link.cut()  # the statement never reaches the server
        failed = within(15, lambda: query_one(conn, "SELECT 1"))
        assert isinstance(failed.error, psycopg2.OperationalError), failed.error
        assert 1.5 < failed.seconds < 4
        pool.putconn(conn)
        link.heal()
        again = pool.getconn(timeout=15)
        assert query_one(again, "SELECT 1") == 1
        pool.putconn(again)
