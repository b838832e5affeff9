"""The pool on its own (no Django), against a real PostgreSQL server."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg2
import psycopg2.pool
import pytest
from django.db import OperationalError as DjangoOperationalError

from django_pgpool import PoolClosed, PoolError, PoolTimeout, TooManyRequests, ownership
from django_pgpool.pool import ConnectionPool

from .helpers import backends, eventually, query_one, run_in_threads


def backend_pid(conn: Any) -> int:
    return int(query_one(conn, "SELECT pg_backend_pid()"))


def test_is_a_psycopg2_threaded_connection_pool(make_pool: Any) -> None:
    pool = make_pool()
    assert isinstance(pool, psycopg2.pool.ThreadedConnectionPool)
    conn = pool.getconn()
    assert isinstance(conn, psycopg2.extensions.connection)
    pool.putconn(conn)


def test_building_a_pool_opens_no_connection_until_first_use(make_pool: Any, admin: Any) -> None:
    pool = make_pool(min_size=3, max_size=5)
    time.sleep(0.3)
    assert backends(admin, application_name=pool.application_name) == 0
    pool.putconn(pool.getconn())
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 3)


def test_a_returned_connection_serves_the_next_checkout(make_pool: Any) -> None:
    pool = make_pool(max_size=4)
    pids = set()
    for _ in range(10):
        conn = pool.getconn()
        pids.add(backend_pid(conn))
        pool.putconn(conn)
    assert len(pids) == 1
    assert pool.stats()["connections_num"] == 1


def test_a_busy_pool_keeps_its_connections_instead_of_churning(make_pool: Any) -> None:
    # psycopg2's own pool closes every returned connection beyond minconn.
    pool = make_pool(min_size=0, max_size=6, max_idle=None)

    def work(_: int) -> set[int]:
        seen = set()
        for _ in range(30):
            conn = pool.getconn()
            seen.add(backend_pid(conn))
            pool.putconn(conn)
        return seen

    pids = set().union(*run_in_threads(6, work))
    stats = pool.stats()
    assert stats["connections_num"] <= 6
    assert stats["connections_closed"] == 0
    assert len(pids) == stats["connections_num"]


def test_never_more_than_max_size_server_connections_under_load(
    make_pool: Any, peak_sampler: Any
) -> None:
    pool = make_pool(max_size=4, timeout=30)

    def work(_: int) -> None:
        for _ in range(20):
            conn = pool.getconn()
            query_one(conn, "SELECT pg_sleep(0.002)")
            pool.putconn(conn)

    with peak_sampler(application_name=pool.application_name) as sampler:
        run_in_threads(16, work)
    assert sampler.peak == 4
    assert pool.stats()["requests_queued"] > 0


def test_exhausted_pool_waits_then_times_out_with_a_clear_error(make_pool: Any) -> None:
    pool = make_pool(max_size=2, timeout=0.5, name="orders-db")
    held = [pool.getconn(), pool.getconn()]
    started = time.monotonic()
    with pytest.raises(PoolTimeout) as caught:
        pool.getconn()
    waited = time.monotonic() - started
    assert 0.45 <= waited < 2.0
    message = str(caught.value)
    assert "'orders-db'" in message
    assert "0.5 s" in message
    assert "All 2 connections (max_size)" in message
    assert "1 request was waiting" in message
    error = caught.value
    assert (error.pool_name, error.max_size, error.timeout, error.waiting) == (
        "orders-db",
        2,
        0.5,
        1,
    )
    # Existing handlers catch it, whichever they were written against.
    assert isinstance(error, DjangoOperationalError)
    assert isinstance(error, psycopg2.OperationalError)
    assert isinstance(error, psycopg2.pool.PoolError)
    for conn in held:
        pool.putconn(conn)
    assert pool.stats()["requests_timeouts"] == 1


def test_a_timeout_among_ordinary_requests_blames_no_idle_thread(make_pool: Any) -> None:
    # max_size 2, timeout 1, 8 request threads that each run a query, render
    # their page and give their connection back: the pool is too small, and
    # nothing else is wrong.
    pool = make_pool(min_size=0, max_size=2, timeout=1)
    messages: list[str] = []
    stop = time.monotonic() + 3

    def requests(_: int) -> None:
        while time.monotonic() < stop:
            try:
                conn = pool.getconn()
            except PoolTimeout as exc:
                messages.append(str(exc))
                continue
            try:
                query_one(conn, "SELECT 1")
                time.sleep(0.5)  # the rest of the request, between queries
            finally:
                pool.putconn(conn)

    run_in_threads(8, requests)
    assert messages
    for message in messages:
        assert "sync_to_async" not in message and "usual cause" not in message
        assert "Raise OPTIONS['pool']['max_size']" in message


def test_a_timeout_names_an_event_loop_executor_thread_holding_a_connection(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, max_size=1, timeout=0.3)
    taken, release = threading.Event(), threading.Event()

    def executor_job() -> None:
        conn = pool.getconn()
        query_one(conn, "SELECT 1")
        taken.set()
        release.wait()
        pool.putconn(conn)

    holder = threading.Thread(target=executor_job, name="asyncio_0")
    holder.start()
    taken.wait()
    try:
        with pytest.raises(PoolTimeout) as caught:
            pool.getconn()
    finally:
        release.set()
        holder.join()
    message = str(caught.value)
    assert "Held by: asyncio_0 for " in message and ", idle." in message
    assert "asyncio_0 is an event loop executor thread" in message
    assert "sync_to_async(thread_sensitive=False)" in message
    assert "django_pgpool.closing_connections" in message


def test_a_timeout_points_at_a_connection_held_idle_for_longer_than_a_request_waits(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, max_size=1, timeout=0.3)
    conn = pool.getconn()
    query_one(conn, "SELECT 1")
    time.sleep(0.5)  # held, doing nothing, longer than a request waits
    with pytest.raises(PoolTimeout) as caught:
        pool.getconn()
    pool.putconn(conn)
    message = str(caught.value)
    assert "MainThread for 0." in message
    assert "Connections held idle for longer than a request waits" in message


def test_the_first_checkout_of_a_pool_is_not_counted_as_queued(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=2)
    pool.putconn(pool.getconn())
    conn = pool.getconn()
    pool.putconn(conn)
    stats = pool.stats()
    assert stats["requests_num"] == 2
    assert stats["requests_queued"] == 0
    assert stats["requests_wait_ms"] == 0 and stats["requests_wait_max_ms"] == 0


def test_requests_that_wait_for_a_busy_pool_are_counted_as_queued(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1, timeout=5)
    held = pool.getconn()
    threading.Timer(0.2, pool.putconn, [held]).start()
    pool.putconn(pool.getconn())  # waits for the one in use
    stats = pool.stats()
    assert stats["requests_queued"] == 1
    assert stats["requests_wait_ms"] >= 150


def test_every_request_that_got_no_connection_is_counted_as_an_error(
    make_pool: Any, server: Any
) -> None:
    pool = make_pool(server.connect_kwargs(dbname="pgpool_no_such_database"), min_size=0)
    for _ in range(3):
        with pytest.raises(psycopg2.OperationalError):
            pool.getconn()
    stats = pool.stats()
    assert stats["requests_num"] == stats["requests_errors"] == 3
    assert stats["requests_timeouts"] == 0


def test_a_waiting_request_gets_the_connection_as_soon_as_one_is_returned(make_pool: Any) -> None:
    pool = make_pool(max_size=1, timeout=10)
    conn = pool.getconn()
    got: list[float] = []

    def waiter() -> None:
        c = pool.getconn()
        got.append(time.monotonic())
        pool.putconn(c)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    returned_at = time.monotonic()
    pool.putconn(conn)
    thread.join()
    assert got[0] - returned_at < 0.2


def test_waiting_requests_are_served_first_come_first_served(make_pool: Any) -> None:
    pool = make_pool(max_size=1, timeout=10)
    conn = pool.getconn()
    order: list[int] = []
    threads = []
    for index in range(5):
        thread = threading.Thread(target=lambda i=index: _take_and_record(pool, order, i))
        thread.start()
        threads.append(thread)
        # Let each one start waiting before the next arrives.
        deadline = time.monotonic() + 2
        while pool.stats()["requests_waiting"] < index + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    pool.putconn(conn)
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


def _take_and_record(pool: ConnectionPool, order: list[int], index: int) -> None:
    conn = pool.getconn()
    order.append(index)
    time.sleep(0.01)
    pool.putconn(conn)


def test_a_returning_thread_cannot_take_its_connection_straight_back_while_others_wait(
    make_pool: Any,
) -> None:
    pool = make_pool(max_size=1, timeout=10)
    conn = pool.getconn()
    served: list[str] = []

    def waiter_thread() -> None:
        pool.putconn(pool.getconn())
        served.append("waiter")

    waiter = threading.Thread(target=waiter_thread)
    waiter.start()
    while pool.stats()["requests_waiting"] < 1:
        time.sleep(0.005)
    pool.putconn(conn)
    again = pool.getconn()  # queues behind the waiter
    served.append("returner")
    pool.putconn(again)
    waiter.join()
    assert served == ["waiter", "returner"]


def test_max_waiting_turns_away_requests_beyond_the_queue_limit(make_pool: Any) -> None:
    pool = make_pool(max_size=1, timeout=5, max_waiting=1)
    conn = pool.getconn()
    waiter = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    waiter.start()
    while pool.stats()["requests_waiting"] < 1:
        time.sleep(0.005)
    with pytest.raises(TooManyRequests, match="max_waiting=1"):
        pool.getconn()
    pool.putconn(conn)
    waiter.join()


def test_a_slow_connect_does_not_stall_other_threads(make_pool: Any, server: Any) -> None:
    # psycopg2's own pool calls connect() while holding its only lock.
    slow_connects = threading.Event()
    base = server.connect_kwargs(application_name="pgpool-test-slow-connect")

    def connect_kwargs() -> dict[str, Any]:
        if slow_connects.is_set():
            time.sleep(1.5)
        return base

    pool = make_pool(connect_kwargs, max_size=3)
    first = pool.getconn()
    slow_connects.set()
    opener = threading.Thread(target=lambda: pool.putconn(pool.getconn()))
    opener.start()  # opens a second connection, slowly
    time.sleep(0.2)
    started = time.monotonic()
    pool.putconn(first)
    again = pool.getconn()
    pool.putconn(again)
    assert time.monotonic() - started < 0.5
    opener.join()


def test_an_open_transaction_is_rolled_back_when_returned(
    make_pool: Any, pools_database: Any, caplog: Any
) -> None:
    pool = make_pool(max_size=1)
    pools_database.cursor().execute("CREATE TABLE IF NOT EXISTS pgpool_rollback_probe (n int)")
    conn = pool.getconn()
    conn.autocommit = False
    conn.cursor().execute("INSERT INTO pgpool_rollback_probe VALUES (1)")
    with caplog.at_level(logging.WARNING, logger="django_pgpool"):
        pool.putconn(conn)
    # Said once, plainly: the work is lost, and who returned it.
    [warning] = [r.getMessage() for r in caplog.records if "still open" in r.getMessage()]
    assert "rolled back" in warning and threading.current_thread().name in warning
    assert pool.stats()["returns_in_transaction"] == 1
    conn = pool.getconn()
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert conn.autocommit
    assert query_one(conn, "SELECT count(*) FROM pgpool_rollback_probe") == 0
    pool.putconn(conn)
    pools_database.cursor().execute("DROP TABLE pgpool_rollback_probe")


def test_an_aborted_transaction_is_rolled_back_when_returned(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    conn = pool.getconn()
    conn.autocommit = False
    with pytest.raises(psycopg2.errors.DivisionByZero):
        conn.cursor().execute("SELECT 1/0")
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
    pid = backend_pid_or_none(conn)
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert query_one(conn, "SELECT 1") == 1
    assert pid is None or backend_pid(conn) == pid
    pool.putconn(conn)
    assert pool.stats()["returns_in_transaction"] == 1


def test_transactions_left_open_are_reported_at_most_once_a_minute_with_a_count(
    make_pool: Any, caplog: Any, monkeypatch: Any
) -> None:
    pool = make_pool(max_size=1)
    with caplog.at_level(logging.WARNING, logger="django_pgpool"):
        for _ in range(5):
            conn = pool.getconn()
            conn.autocommit = False
            query_one(conn, "SELECT 1")
            pool.putconn(conn)
        warnings = [r for r in caplog.records if "still open" in r.getMessage()]
        assert len(warnings) == 1
        assert pool.stats()["returns_in_transaction"] == 5
        # A minute later, as far as the report's interval is concerned.
        monkeypatch.setattr(ownership, "OPEN_TRANSACTION_REPORT_INTERVAL", 0.0)
        conn = pool.getconn()
        conn.autocommit = False
        query_one(conn, "SELECT 1")
        pool.putconn(conn)
    warnings = [r.getMessage() for r in caplog.records if "still open" in r.getMessage()]
    assert len(warnings) == 2 and "5 such returns since the last report" in warnings[1]


def test_a_committed_or_rolled_back_connection_is_returned_without_a_report(
    make_pool: Any, caplog: Any
) -> None:
    pool = make_pool(max_size=1)
    with caplog.at_level(logging.WARNING, logger="django_pgpool"):
        with pool.connection() as conn:  # commits on the way out
            conn.autocommit = False
            query_one(conn, "SELECT 1")
        conn = pool.getconn()
        conn.autocommit = False
        query_one(conn, "SELECT 1")
        conn.rollback()
        pool.putconn(conn)
    assert not [r for r in caplog.records if "still open" in r.getMessage()]
    assert pool.stats()["returns_in_transaction"] == 0


def backend_pid_or_none(conn: Any) -> int | None:
    try:
        return int(conn.info.backend_pid)
    except Exception:
        return None


def test_a_closed_connection_is_discarded_and_never_handed_out_again(make_pool: Any) -> None:
    pool = make_pool(max_size=2)
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    assert pool.stats()["pool_size"] == 0
    again = pool.getconn()
    assert again is not conn
    assert query_one(again, "SELECT 1") == 1
    pool.putconn(again)
    assert pool.stats()["returns_bad"] == 1


def test_a_broken_connection_is_discarded_and_never_handed_out_again(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(max_size=2)
    conn = pool.getconn()
    pid = backend_pid(conn)
    query_one(admin, "SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(psycopg2.OperationalError):
        query_one(conn, "SELECT 1")
    pool.putconn(conn)
    for _ in range(3):
        again = pool.getconn()
        assert backend_pid(again) != pid
        pool.putconn(again)


def test_putconn_with_close_discards_the_connection(make_pool: Any) -> None:
    pool = make_pool(max_size=2)
    conn = pool.getconn()
    pool.putconn(conn, close=True)
    assert conn.closed
    assert pool.stats()["pool_size"] == 0


def test_returning_a_connection_twice_or_to_another_pool_is_refused(make_pool: Any) -> None:
    pool, other = make_pool(), make_pool()
    conn = pool.getconn()
    with pytest.raises(PoolError, match="does not belong"):
        other.putconn(conn)
    pool.putconn(conn)
    with pytest.raises(PoolError, match="returned twice"):
        pool.putconn(conn)


def test_keys_give_the_same_connection_until_put_back(make_pool: Any) -> None:
    # psycopg2's getconn(key) / putconn(key=...) semantics, for ported code.
    pool = make_pool(max_size=3)
    first = pool.getconn("job-1")
    assert pool.getconn("job-1") is first
    assert pool.getconn("job-2") is not first
    pool.putconn(key="job-1")
    pool.putconn(pool.getconn("job-2"))
    assert pool.stats()["pool_in_use"] == 0


def test_the_connection_context_manager_commits_rolls_back_and_returns(
    make_pool: Any, pools_database: Any
) -> None:
    pool = make_pool(max_size=1)
    pools_database.cursor().execute("CREATE TABLE IF NOT EXISTS pgpool_cm_probe (n int)")
    try:
        with pool.connection() as conn:
            conn.autocommit = False
            conn.cursor().execute("INSERT INTO pgpool_cm_probe VALUES (1)")

        def insert_then_fail() -> None:
            with pool.connection() as conn:
                conn.autocommit = False
                conn.cursor().execute("INSERT INTO pgpool_cm_probe VALUES (2)")
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            insert_then_fail()
        assert query_one(pools_database, "SELECT array_agg(n) FROM pgpool_cm_probe") == [1]
        assert pool.stats()["pool_in_use"] == 0
    finally:
        pools_database.cursor().execute("DROP TABLE pgpool_cm_probe")


def test_closing_the_pool_while_threads_hold_connections_does_not_disturb_them(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(max_size=3)
    holding = threading.Event()
    closed = threading.Event()
    results: list[Any] = []

    def user() -> None:
        conn = pool.getconn()
        holding.set()
        closed.wait()
        results.append(query_one(conn, "SELECT 42"))  # still works after close()
        pool.putconn(conn)  # no error: the connection is simply closed
        results.append(conn.closed)

    thread = threading.Thread(target=user)
    thread.start()
    holding.wait()
    pool.close()
    closed.set()
    thread.join()
    assert results == [42, 1]
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 0)
    with pytest.raises(PoolClosed):
        pool.getconn()


def test_closing_the_pool_wakes_waiting_requests_with_pool_closed(make_pool: Any) -> None:
    pool = make_pool(max_size=1, timeout=30)
    conn = pool.getconn()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            pool.getconn()
        except PoolError as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    while pool.stats()["requests_waiting"] < 1:
        time.sleep(0.005)
    pool.close()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], PoolClosed)
    pool.putconn(conn)


def test_a_connection_that_ran_nothing_goes_back_without_a_reset(make_pool: Any) -> None:
    pool = make_pool(max_size=1)
    for _ in range(5):
        pool.putconn(pool.getconn())
    assert pool.stats()["resets_num"] == 0
    conn = pool.getconn()
    query_one(conn, "SELECT 1")
    pool.putconn(conn)
    pool.putconn(pool.getconn())
    assert pool.stats()["resets_num"] == 1


def test_an_uncontended_checkout_and_return_send_nothing_to_the_server(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=1, max_size=2)
    conn = pool.getconn()
    pid = backend_pid(conn)
    pool.putconn(conn)  # the reset is sent as it goes back
    assert eventually(
        lambda: (
            query_one(admin, "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid])
            == ("idle", "DISCARD ALL")
        )
    )
    activity = "SELECT state_change, query_start FROM pg_stat_activity WHERE pid = %s"
    before = query_one(admin, activity, [pid])
    for _ in range(2000):
        pool.putconn(pool.getconn())
    assert query_one(admin, activity, [pid]) == before  # no statement reached the server
    assert pool.stats()["checks_num"] == 0
