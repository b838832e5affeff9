"""The session reset costs no round trip of its own and needs no spare connection.

A returned connection that ran anything has its reset *sent* as it goes back
(``DISCARD ALL``, or the statements it stands for) and the answer *read* when
the connection is next taken. These tests pin down what that must never
change: every path that hands a connection out reads the reset's answer
first, whatever the next user's first statement is; a reset that fails costs
that connection only; and a pool never holds more connections than the
threads using them at once.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from django_pgpool import libpq

from .helpers import (
    PeakSampler,
    backends,
    eventually,
    pool_options,
    query_one,
    run_in_threads,
    serve,
)


def dirty(conn: Any) -> int:
    """Change the session the way a request might; return the backend pid."""
    with conn.cursor() as cursor:
        cursor.execute("SET search_path TO pg_catalog")
        cursor.execute("SELECT set_config('app.tenant_id', '42', false)")
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def session_of(conn: Any) -> tuple[Any, ...]:
    """(backend pid, search_path, tenant id) as the server sees this session now."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), current_setting('search_path'), "
            "coalesce(current_setting('app.tenant_id', true), '')"
        )
        return tuple(cursor.fetchone())


FRESH = ('"$user", public', "")


def activity(admin: Any, pid: int) -> tuple[Any, ...]:
    return tuple(
        query_one(
            admin, "SELECT state, query, query_start FROM pg_stat_activity WHERE pid = %s", [pid]
        )
    )


def test_this_psycopg2_build_can_send_without_waiting() -> None:
    # Otherwise every test below would pass on the synchronous fallback alone.
    assert libpq.available()


def test_the_reset_is_sent_as_the_connection_goes_back_and_checkout_sends_nothing(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=1, max_size=1)
    conn = pool.getconn()
    pid = dirty(conn)
    pool.putconn(conn)
    # The server runs the reset while nobody holds the connection...
    assert eventually(lambda: activity(admin, pid)[:2] == ("idle", "DISCARD ALL"))
    after_reset = activity(admin, pid)
    again = pool.getconn()
    # ...and taking it reads the answer without sending anything.
    assert activity(admin, pid) == after_reset
    assert session_of(again) == (pid, *FRESH)
    pool.putconn(again)
    stats = pool.stats()
    assert stats["resets_num"] == 2 and stats["checks_num"] == 0


def test_a_waiter_handed_a_dirty_connection_gets_it_reset(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1)
    conn = pool.getconn()
    pid = dirty(conn)
    seen: list[tuple[Any, ...]] = []

    def waiter() -> None:
        taken = pool.getconn(timeout=5)
        seen.append(session_of(taken))
        pool.putconn(taken)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert eventually(lambda: pool.stats()["requests_waiting"] == 1)
    pool.putconn(conn)
    thread.join(5)
    assert seen == [(pid, *FRESH)]


def test_every_way_of_taking_a_connection_reads_its_reset_first(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1, max_idle=None)
    conn = pool.getconn()
    pid = dirty(conn)
    pool.putconn(conn)

    with pool.connection() as taken:  # the context manager
        assert session_of(taken) == (pid, *FRESH)
        dirty(taken)
        taken.commit()

    keyed = pool.getconn("report")  # psycopg2's keyed checkout
    assert session_of(keyed) == (pid, *FRESH)
    dirty(keyed)
    pool.putconn(key="report")

    pool.resize(min_size=0, max_size=2)  # resized while a reset is in flight
    resized = pool.getconn()
    assert session_of(resized) == (pid, *FRESH)
    dirty(resized)
    pool.putconn(resized)

    pool.drain()  # drained: the dirty connection is closed, never handed out
    drained = pool.getconn()
    assert session_of(drained)[1:] == FRESH and session_of(drained)[0] != pid
    pool.putconn(drained)


def test_a_fork_while_a_reset_is_in_flight_leaves_the_parent_a_clean_connection(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, max_size=1)
    conn = pool.getconn()
    pid = dirty(conn)
    pool.putconn(conn)  # the reset's answer is on its way
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            pool.getconn()
        except Exception:
            os._exit(0)  # the inherited pool refuses: as it must
        os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    again = pool.getconn()
    assert session_of(again) == (pid, *FRESH)
    pool.putconn(again)


def test_a_copy_as_the_first_statement_after_a_dirty_return(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1)
    conn = pool.getconn()
    dirty(conn)
    pool.putconn(conn)
    again = pool.getconn()
    out = io.StringIO()
    with again.cursor() as cursor:
        cursor.copy_expert("COPY (SELECT current_setting('search_path')) TO STDOUT", out)
    assert out.getvalue() == '"$user", public\n'
    pool.putconn(again)


def test_a_named_cursor_as_the_first_statement_after_a_dirty_return(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1)
    conn = pool.getconn()
    dirty(conn)
    pool.putconn(conn)
    again = pool.getconn()
    with again.cursor(name="first_statement", withhold=True) as cursor:
        cursor.execute("SELECT current_setting('search_path') FROM generate_series(1, 3)")
        assert cursor.fetchall() == [('"$user", public',)] * 3
    pool.putconn(again)


def test_a_reset_that_fails_costs_that_connection_only(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=1, reset="SELECT * FROM no_such_table_anywhere")
    conn = pool.getconn()
    first = dirty(conn)
    pool.putconn(conn)
    again = pool.getconn(timeout=5)  # the failed one is closed; a new one opened
    assert session_of(again)[0] != first
    pool.putconn(again)
    assert pool.stats()["connections_num"] == 2


pytestmark_django = pytest.mark.django_db(transaction=True)


@pytest.fixture
def one_connection() -> Iterator[None]:
    with pool_options(min_size=0, max_size=1):
        yield


def orm_request(*statements: str) -> Any:
    try:
        with connection.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
            return cursor.fetchone() if cursor.description else None
    finally:
        connection.close()


@pytestmark_django
@pytest.mark.usefixtures("one_connection")
def test_a_set_then_a_rolled_back_atomic_block_then_the_default_search_path() -> None:
    orm_request("SET search_path TO pg_catalog")

    class Rollback(Exception):
        pass

    def rolled_back_request() -> None:
        with transaction.atomic():
            orm_request_in_transaction("SELECT 1")
            raise Rollback

    with pytest.raises(Rollback):
        rolled_back_request()
    connection.close()
    assert orm_request("SHOW search_path") == ('"$user", public',)


def orm_request_in_transaction(sql: str) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()


@pytestmark_django
@pytest.mark.usefixtures("one_connection")
def test_djangos_sql_log_shows_only_the_users_statements() -> None:
    orm_request("SET search_path TO pg_catalog")
    with CaptureQueriesContext(connection) as captured:
        orm_request("SELECT 42")
    assert [query["sql"] for query in captured.captured_queries] == ["SELECT 42"]


@pytestmark_django
@pytest.mark.slow
def test_four_threads_never_hold_more_than_four_server_connections(
    seeded_books: list[int], admin: Any
) -> None:
    database = connection.settings_dict["NAME"]
    path = f"/books/{seeded_books[0]}/"
    with pool_options(min_size=1, max_size=10):
        pool = connection.pool
        with PeakSampler(lambda: backends(admin, database=database), interval=0.002) as peak:
            statuses = run_in_threads(4, lambda _: {serve(path)[0] for _ in range(2000)})
        stats = pool.stats()
    assert statuses == [{200}] * 4
    assert stats["requests_num"] >= 8000, stats
    assert peak.peak <= 4
    assert stats["connections_num"] <= 4, stats
