"""What production does to connections: restarts, killed backends, lifetimes, forks,
threads that die, leaks, interrupted work, secrets, shutdown.

Tests that stop or restart the server use a throwaway cluster of their own.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, OperationalError, connection, connections, transaction

from django_pgpool import PoolClosed, PoolTimeout, registry
from django_pgpool.base import DatabaseWrapper
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testproject.library.models import Author
from testsupport.pgserver import EmbeddedPostgres

from .helpers import backends, eventually, pool_options, query_one, run_in_threads, run_python


@pytest.fixture
def cluster() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL cluster of the test's own, which it may stop, restart or kill."""
    with EmbeddedPostgres(password=secrets.token_urlsafe(16)) as server:
        yield server


@contextmanager
def extra_alias(alias: str, settings_dict: dict[str, Any]) -> Iterator[None]:
    """Add a database alias to Django's connections for the duration of a test."""
    connections.settings[alias] = settings_dict
    try:
        yield
    finally:
        registry.close(alias)
        del connections.settings[alias]


def alias_settings(cluster: EmbeddedPostgres, alias: str, **pool: Any) -> dict[str, Any]:
    """A complete DATABASES entry (Django's defaults filled in) for the cluster."""
    entry = cluster.settings.django_database()
    entry["OPTIONS"] = {"pool": pool, "application_name": alias}
    # Fill in Django's defaults as for any DATABASES entry (it wants a "default").
    return connections.configure_settings({"default": dict(entry), alias: entry})[alias]


@contextmanager
def steady_load(alias: str, threads: int) -> Iterator[list[tuple[float, float, bool]]]:
    """Requests on ``alias`` from ``threads`` threads until the block ends.

    Each request takes the thread's own Django connection, runs one query and
    closes it, as a view does. Yields the list the requests are recorded in:
    (started, finished, succeeded).
    """
    results: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def request_loop(_: int) -> None:
        db = connections[alias]  # this thread's own wrapper, as in a request
        while not stop.is_set():
            started = time.monotonic()
            try:
                with db.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM pg_class")
                ok = True
            except DatabaseError:
                ok = False
            finally:
                db.close()
            results.append((started, time.monotonic(), ok))
            if not ok:
                time.sleep(0.01)

    load = threading.Thread(target=run_in_threads, args=(threads, request_loop))
    load.start()
    try:
        yield results
    finally:
        stop.set()
        load.join()


# ------------------------------------------------------------------ dead connections


def test_after_a_restart_every_request_succeeds_once_the_server_accepts_connections(
    cluster: EmbeddedPostgres, record_property: Any, django_db_blocker: Any
) -> None:
    alias = "restart-under-load"
    settings_dict = alias_settings(cluster, alias, min_size=2, max_size=8, timeout=5)
    # The cluster is this test's own, not the test database.
    with (
        django_db_blocker.unblock(),
        extra_alias(alias, settings_dict),
        steady_load(alias, threads=8) as results,
    ):
        time.sleep(1.0)
        went_down = time.monotonic()
        cluster.restart(down_for=1.0)
        came_back = time.monotonic()
        time.sleep(2.0)

    before = [ok for _, finished, ok in results if finished < went_down]
    during = [
        ok for started, finished, ok in results if finished >= went_down and started < came_back
    ]
    after = [ok for started, _, ok in results if started >= came_back]
    failed_during = during.count(False)
    record_property("requests_failed_during_outage", failed_during)
    print(f"\n{failed_during} of {len(during)} requests failed while the server restarted")
    assert all(before) and len(before) > 50
    assert len(after) > 50
    assert all(after), f"{after.count(False)} requests failed after the server was back"


def test_after_a_backend_crash_the_pool_recovers_with_the_server(
    cluster: EmbeddedPostgres, django_db_blocker: Any
) -> None:
    # SIGKILL on one backend makes PostgreSQL end every session and run crash
    # recovery: all the pool's connections die at once, and for a moment new
    # ones are refused ("the database system is in recovery mode").
    alias = "backend-crash"
    settings_dict = alias_settings(cluster, alias, min_size=2, max_size=4, timeout=10)
    with django_db_blocker.unblock(), extra_alias(alias, settings_dict):
        with steady_load(alias, threads=4) as results:
            time.sleep(0.5)
            pool = connections[alias].pool
            assert pool is not None
            before = pool.stats()
            admin = cluster.settings.connect()
            victim = query_one(
                admin,
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s LIMIT 1",
                [alias],
            )
            admin.close()
            os.kill(victim, signal.SIGKILL)
            assert eventually(lambda: "reinitializing" in cluster.log_tail(200), timeout=10), (
                cluster.log_tail()
            )
            assert eventually(cluster.accepting, timeout=30)
            came_back = time.monotonic()
            time.sleep(2.0)
        after_stats = pool.stats()

    after = [ok for started, _, ok in results if started >= came_back + 0.1]
    assert len(after) > 50
    assert all(after), f"{after.count(False)} requests failed after the server was back"
    # The connections died with the crash: they were closed and replaced.
    assert after_stats["connections_closed"] > before["connections_closed"]
    assert after_stats["connections_num"] > before["connections_num"]


def test_after_pg_terminate_backend_no_dead_connection_is_handed_out(
    cluster: EmbeddedPostgres,
) -> None:
    pool = ConnectionPool(
        PoolConfig(name="killed", min_size=4, max_size=4),
        cluster.settings.connect_kwargs(application_name="killed"),
    )
    pool.open(wait=True)
    admin = cluster.settings.connect()
    admin.autocommit = True
    try:
        query_one(
            admin,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'killed'",
        )
        assert eventually(lambda: backends(admin, application_name="killed") == 0)
        for _ in range(12):  # more than the pool holds: every one of them was dead
            conn = pool.getconn()
            assert query_one(conn, "SELECT 1") == 1
            pool.putconn(conn)
        assert pool.stats()["connections_lost"] >= 1
    finally:
        pool.close()
        admin.close()


def test_once_a_dead_connection_is_found_the_others_idle_beside_it_are_checked(
    cluster: EmbeddedPostgres,
) -> None:
    pool = ConnectionPool(
        PoolConfig(name="suspects", min_size=3, max_size=3, check_after_idle=60),
        cluster.settings.connect_kwargs(application_name="suspects"),
    )
    pool.open(wait=True)
    try:
        cluster.restart()
        conn = pool.getconn()  # finds a dead one, then checks the rest in the background
        assert query_one(conn, "SELECT 1") == 1
        pool.putconn(conn)
        assert eventually(lambda: pool.stats()["connections_lost"] == 3), pool.stats()
    finally:
        pool.close()


def test_a_request_waits_out_a_short_outage_instead_of_failing(cluster: EmbeddedPostgres) -> None:
    pool = ConnectionPool(
        PoolConfig(name="outage", min_size=1, max_size=2, timeout=10),
        cluster.settings.connect_kwargs(application_name="outage"),
    )
    try:
        pool.putconn(pool.getconn())
        cluster.stop()
        restart = threading.Timer(1.0, cluster.start)
        restart.start()
        started = time.monotonic()
        conn = pool.getconn()  # the idle connection is dead and the server is down: wait
        waited = time.monotonic() - started
        assert query_one(conn, "SELECT 1") == 1
        pool.putconn(conn)
        restart.join()
        assert 0.9 < waited < 8
    finally:
        pool.close()


def test_a_request_fails_at_once_when_waiting_cannot_help(cluster: EmbeddedPostgres) -> None:
    kwargs = cluster.settings.connect_kwargs(password="not-the-password")
    pool = ConnectionPool(PoolConfig(name="denied", min_size=0, timeout=30), kwargs)
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pool.getconn()
    assert time.monotonic() - started < 2
    pool.close()


def test_an_outage_longer_than_the_timeout_says_the_database_is_unreachable(
    cluster: EmbeddedPostgres,
) -> None:
    pool = ConnectionPool(
        PoolConfig(name="down", min_size=0, timeout=0.5), cluster.settings.connect_kwargs()
    )
    pool.putconn(pool.getconn())
    cluster.stop()
    try:
        with pytest.raises(PoolTimeout) as caught:
            pool.getconn()
        message = str(caught.value)
        assert "no connection became available within 0.5 s" in message
        assert "The database could not be reached" in message
        assert "Connection refused" in message
    finally:
        cluster.start()
        pool.close()


def test_a_pool_that_never_reached_its_server_fails_at_once(cluster: EmbeddedPostgres) -> None:
    # A management command run while the database is down, a wrong HOST or
    # PORT: nothing says the server was ever there to wait for.
    cluster.stop()
    pool = ConnectionPool(
        PoolConfig(name="never-up", min_size=1, timeout=30), cluster.settings.connect_kwargs()
    )
    try:
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError) as caught:
                pool.getconn()
            assert time.monotonic() - started < 2
            assert not isinstance(caught.value, PoolTimeout)
            assert str(caught.value).startswith("pool 'never-up' could not open a connection: ")
            assert "Connection refused" in str(caught.value)
        stats = pool.stats()
        assert stats["requests_errors"] == stats["requests_num"] == 3
        cluster.start()
        conn = pool.getconn()  # and it works as soon as the server does
        assert query_one(conn, "SELECT 1") == 1
        pool.putconn(conn)
    finally:
        pool.close()


def test_once_a_request_waited_out_an_outage_the_next_ones_fail_at_once_until_it_ends(
    cluster: EmbeddedPostgres,
) -> None:
    pool = ConnectionPool(
        PoolConfig(name="long-outage", min_size=1, max_size=2, timeout=1),
        cluster.settings.connect_kwargs(),
    )
    try:
        pool.putconn(pool.getconn())
        cluster.stop()
        # One request touching the database four times, as Django's error page does.
        started = time.monotonic()
        errors = []
        for _ in range(4):
            with pytest.raises(PoolTimeout) as caught:
                pool.getconn()
            errors.append(str(caught.value))
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 1.8  # one timeout, not four
        assert "The database could not be reached" in errors[0]
        for message in errors[1:]:
            assert "A request already waited the pool's whole timeout" in message
            assert "requests fail at once until it can be reached again" in message
            assert "Connection refused" in message
        cluster.start()
        # The worker reconnects (its backoff is at most 2 s), and requests flow again.
        assert eventually(lambda: _serves(pool), timeout=10)
    finally:
        pool.close()


def _serves(pool: ConnectionPool) -> bool:
    try:
        conn = pool.getconn(timeout=0)
    except PoolTimeout:
        return False
    pool.putconn(conn)
    return True


def test_connection_errors_name_the_pool_and_are_logged_once_per_outage(
    cluster: EmbeddedPostgres, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="django_pgpool")
    pool = ConnectionPool(
        PoolConfig(name="rotated", min_size=0, max_size=3, timeout=10),
        cluster.settings.connect_kwargs(),
    )
    try:
        conn = pool.getconn()
        with conn.cursor() as cursor:
            cursor.execute("ALTER ROLE postgres PASSWORD 'rotated-elsewhere'")
        pool.putconn(conn)
        pool.drain()  # the next requests need new connections, which the server refuses
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError) as caught:
                pool.getconn()
            assert time.monotonic() - started < 2
            message = str(caught.value)
            assert message.startswith("pool 'rotated' could not open a connection: ")
            assert "password authentication failed" in message
        warnings = [
            message
            for record in caplog.records
            if record.levelno >= logging.WARNING
            and "cannot open connections" in (message := record.getMessage())
        ]
        assert len(warnings) == 1, warnings
        assert pool.stats()["requests_errors"] == 5
    finally:
        pool.close()


def test_a_pool_that_never_connected_logs_nothing_its_caller_already_heard(
    cluster: EmbeddedPostgres, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="django_pgpool")
    kwargs = cluster.settings.connect_kwargs(password="not-the-password")
    pool = ConnectionPool(PoolConfig(name="denied", min_size=1, timeout=30), kwargs)
    try:
        for _ in range(3):
            with pytest.raises(psycopg2.OperationalError):
                pool.getconn()
        time.sleep(0.3)  # the background warm-up fails too
        assert [record for record in caplog.records if record.levelno >= logging.INFO] == []
    finally:
        pool.close()


# ------------------------------------------------------------------ lifetime and idle


def test_a_connection_past_its_lifetime_is_never_handed_out_even_if_it_sat_idle(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=0, max_size=2, max_lifetime=0.6)
    ages = []
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        conn = pool.getconn()
        ages.append(
            query_one(
                conn,
                "SELECT extract(epoch FROM clock_timestamp() - backend_start)::float "
                "FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            )
        )
        pool.putconn(conn)
        time.sleep(0.7 if len(ages) % 5 == 0 else 0.05)  # sometimes idle past the lifetime
    assert max(ages) < 0.6 + 0.1
    assert pool.stats()["connections_num"] >= 3


def test_lifetimes_are_jittered_so_connections_do_not_expire_together(make_pool: Any) -> None:
    pool = make_pool(min_size=0, max_size=8, max_lifetime=100.0)
    held = run_in_threads(8, lambda _: pool.getconn())
    lifetimes = [c.pool_entry.expires_at - c.pool_entry.created_at for c in held]
    for conn in held:
        pool.putconn(conn)
    assert all(95.0 <= lifetime <= 100.0 for lifetime in lifetimes)
    assert len({round(lifetime, 3) for lifetime in lifetimes}) > 1


def test_idle_connections_shrink_back_to_min_size_after_max_idle(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=1, max_size=5, max_idle=0.5)
    held = run_in_threads(5, lambda _: pool.getconn())
    for conn in held:
        pool.putconn(conn)
    assert pool.stats()["connections_num"] == 5
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 1)
    assert pool.stats()["pool_size"] == 1


def test_min_size_connections_are_opened_ahead_of_need_and_kept(make_pool: Any, admin: Any) -> None:
    pool = make_pool(min_size=3, max_size=5, max_idle=0.2)
    pool.putconn(pool.getconn())
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 3)
    time.sleep(1.5)  # several housekeeping rounds and max_idle periods
    assert backends(admin, application_name=pool.application_name) == 3


def test_housekeeping_opens_and_closes_connections_off_the_request_path(server: Any) -> None:
    opened_by: list[str] = []
    kwargs = server.connect_kwargs(application_name="pgpool-housekeeping")

    def connect_kwargs() -> dict[str, Any]:
        opened_by.append(threading.current_thread().name)
        return kwargs

    pool = ConnectionPool(
        PoolConfig(name="hk", min_size=2, max_size=3, max_lifetime=1.0), connect_kwargs
    )
    try:
        pool.open(wait=True)
        warmed_up = len(opened_by)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:
            conn = pool.getconn()
            query_one(conn, "SELECT 1")
            pool.putconn(conn)
            time.sleep(0.02)
        replacements = opened_by[warmed_up:]
        assert len(replacements) >= 4  # every connection was replaced at least twice
        assert set(replacements) == {"pgpool-hk"}  # the pool's worker, never a request
        assert pool.stats()["connections_expired"] >= 4
    finally:
        pool.close()


# ------------------------------------------------------------------ fork

FORK_SCRIPT = """
import gc, json, os, sys
import django
from django.conf import settings
settings.configure(
    DATABASES={"default": {
        "ENGINE": "django_pgpool", "NAME": os.environ["PGDATABASE"],
        "USER": os.environ["PGUSER"], "PASSWORD": os.environ.get("PGPASSWORD", ""),
        "HOST": os.environ["PGHOST"], "PORT": os.environ["PGPORT"],
        "OPTIONS": {"pool": {"min_size": 2, "max_size": 4}, "application_name": "pgpool-fork"},
    }},
)
django.setup()
from django.db import connection
import django_pgpool

def backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]

parent_pid = backend_pid()          # kept checked out across the fork
held = connection.connection
pool = connection.pool
spare = pool.getconn(); pool.putconn(spare)
child = os.fork()
if child == 0:
    try:
        child_pid = backend_pid()       # a new pool, a new server session
        connection.close()
        connection.close_pool()         # what Celery's fix-up does in a child
        django_pgpool.close_pools()
        pool.close()
        try:
            pool.getconn()
            sys.exit(3)                 # the inherited pool must refuse
        except django_pgpool.PoolClosed:
            pass
        # Closing the inherited libpq connections (as cleanup code or the
        # garbage collector would) must not reach the parent's server sessions.
        held.close()
        spare.close()
        del pool, spare, held
        gc.collect()
        sys.exit(0 if child_pid != parent_pid else 4)
    except SystemExit:
        raise
    except BaseException as exc:
        print("child failed:", repr(exc), file=sys.stderr)
        sys.exit(5)
_, status = os.waitpid(child, 0)
result = {"child_exit": os.waitstatus_to_exitcode(status)}
result["same_session"] = backend_pid() == parent_pid   # the parent's connection still works
connection.close()
conn = pool.getconn()
with conn.cursor() as cursor:
    cursor.execute("SELECT 1")
pool.putconn(conn)
result["pool_ok"] = True
print("RESULT", json.dumps(result))
"""


def test_a_forked_child_builds_its_own_pool_and_leaves_the_parents_connections_alone() -> None:
    result = run_python(FORK_SCRIPT)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(line[7:]) == {"child_exit": 0, "same_session": True, "pool_ok": True}


C_FORK_SCRIPT = FORK_SCRIPT.replace(
    "child = os.fork()",
    # A server forking its workers from C need not run Python's at-fork
    # hooks (PyOS_AfterFork_Child), so the pool never hears of it. PyDLL
    # keeps the GIL during the call, as a C server forking from the main
    # thread holds it (CDLL would release it, and the child could be left
    # waiting for a GIL held by a thread that doesn't exist there).
    # The pool's own thread is let settle first: forking while a thread is
    # waiting for the GIL leaves CPython itself inconsistent in the child
    # when nothing runs PyOS_AfterFork_Child, whatever the pool does.
    "import ctypes, time\n"
    "previous = None\n"
    "while (snapshot := pool.stats()) != previous or snapshot['pool_available'] < 1:\n"
    "    previous = snapshot\n"
    "    time.sleep(0.2)\n"
    "child = ctypes.PyDLL(None).fork()",
).replace(
    "        child_pid = backend_pid()",
    "        from django.db import close_old_connections\n"
    "        close_old_connections()         # what the first request in a worker does\n"
    "        child_pid = backend_pid()",
)


def test_a_fork_made_outside_python_is_caught_on_the_first_request() -> None:
    result = run_python(C_FORK_SCRIPT)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    assert json.loads(line[7:]) == {"child_exit": 0, "same_session": True, "pool_ok": True}


MULTIPROCESSING_SCRIPT = """
import multiprocessing, os
import django
from django.conf import settings
settings.configure(DATABASES={"default": {
    "ENGINE": "django_pgpool", "NAME": os.environ["PGDATABASE"], "USER": os.environ["PGUSER"],
    "PASSWORD": os.environ.get("PGPASSWORD", ""), "HOST": os.environ["PGHOST"],
    "PORT": os.environ["PGPORT"], "OPTIONS": {"pool": {"max_size": 2}},
}})
django.setup()
from django.db import connection

def backend_pid(_=None):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]

before = backend_pid()
with multiprocessing.get_context("fork").Pool(3) as workers:
    children = workers.map(backend_pid, range(12))
assert before not in children, "a child used the parent's server session"
assert backend_pid() == before
print("OK")
"""


def test_multiprocessing_children_never_share_the_parents_connections() -> None:
    result = run_python(MULTIPROCESSING_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


# ------------------------------------------------------------------ threads


@pytest.mark.django_db(transaction=True)
def test_threads_that_end_without_closing_give_their_connection_back(peak_sampler: Any) -> None:
    with pool_options(min_size=0, max_size=4, timeout=10, release="request"):
        pool = connection.pool

        def short_lived(_: int) -> int:
            return Author.objects.count()  # and the thread ends without closing

        database = connection.settings_dict["NAME"]
        with peak_sampler(database=database) as sampler:
            for _ in range(10):
                run_in_threads(10, short_lived)
        assert sampler.peak <= 4 + 1  # + this test's own connection
        assert eventually(lambda: pool.stats()["connections_reclaimed"] == 100)
        assert eventually(lambda: pool.stats()["pool_in_use"] == 0)
        assert Author.objects.count() == 0  # and it keeps serving


def test_a_late_take_back_never_touches_a_later_checkout_of_the_same_connection(
    make_pool: Any,
) -> None:
    # A thread's end is reported twice (its lease and its Django wrapper), and
    # the second report may arrive after the connection went to someone else.
    pool = make_pool(min_size=0, max_size=1)
    taken: list[tuple[Any, int]] = []

    def forgetful() -> None:
        conn = pool.getconn(bind_to_thread=True)
        taken.append((conn, conn.pool_entry.checkout_id))

    thread = threading.Thread(target=forgetful)
    thread.start()
    thread.join()
    conn, first_checkout = taken[0]
    assert eventually(lambda: pool.stats()["connections_reclaimed"] == 1)
    again = pool.getconn()
    assert again is conn  # the only connection, checked out anew
    pool.abandoned.reclaim(conn, first_checkout, "a late report of the first holder's end")
    time.sleep(0.3)  # the worker has handled the report
    stats = pool.stats()
    assert stats["connections_reclaimed"] == 1 and stats["pool_in_use"] == 1
    assert query_one(again, "SELECT 1") == 1
    pool.putconn(again)


# ------------------------------------------------------------------ leaks


def take_and_forget(pool: ConnectionPool) -> Any:
    return pool.getconn()


def test_a_connection_held_too_long_logs_one_warning_with_the_stack_that_took_it(
    make_pool: Any, caplog: Any
) -> None:
    pool = make_pool(max_size=2, leak_threshold=0.3)
    caplog.set_level(logging.INFO, logger="django_pgpool")
    conn = take_and_forget(pool)
    assert eventually(lambda: pool.stats()["leaks_detected"] == 1)
    time.sleep(1.2)  # more housekeeping rounds: still one warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "checked out for" in message and "leak_threshold=0.3 s" in message
    assert "take_and_forget" in message and "test_reliability.py" in message
    assert "pool.py" not in message  # the borrower's stack, not the pool's
    pool.putconn(conn)
    assert any("reported as leaked was returned" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ interrupted work


@pytest.mark.django_db(transaction=True)
def test_a_query_cancelled_by_statement_timeout_leaves_the_pool_healthy() -> None:
    with pool_options(min_size=0, max_size=1):
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = '50ms'")
            with pytest.raises(OperationalError, match="statement timeout"):
                cursor.execute("SELECT pg_sleep(2)")
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone() == ("0",)
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_a_server_side_cursor_abandoned_half_way_leaves_the_pool_healthy() -> None:
    Author.objects.bulk_create(Author(name=f"author {n}") for n in range(50))
    with pool_options(min_size=0, max_size=1):
        rows = Author.objects.iterator(chunk_size=5)  # a named WITH HOLD cursor
        next(rows)
        next(rows)
        connection.close()  # the request ends; the iterator is abandoned
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_cursors")
            assert cursor.fetchone() == (0,)
        assert Author.objects.count() == 50
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_an_exception_in_the_middle_of_a_transaction_leaves_the_pool_healthy() -> None:
    Author.objects.bulk_create(Author(name=f"author {n}") for n in range(20))
    with pool_options(min_size=0, max_size=1):
        connection.set_autocommit(False)
        rows = Author.objects.iterator(chunk_size=2)
        next(rows)
        Author.objects.create(name="half-done")
        with pytest.raises(RuntimeError):
            raise RuntimeError("a bug half-way through")
        connection.close()  # no commit, no rollback: the request just ends
        assert not Author.objects.filter(name="half-done").exists()
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_cursors")
            assert cursor.fetchone() == (0,)
        connection.close()


@pytest.mark.django_db(transaction=True)
def test_a_keyboard_interrupt_during_a_query_leaves_the_pool_healthy() -> None:
    with pool_options(min_size=0, max_size=1):
        timer = threading.Timer(0.1, _thread.interrupt_main)

        def interrupted_transaction() -> None:
            with transaction.atomic():
                Author.objects.create(name="interrupted")
                timer.start()
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_sleep(0.5)")
                time.sleep(5)  # the interrupt arrives here at the latest

        with pytest.raises(KeyboardInterrupt):
            interrupted_transaction()
        connection.close()
        assert not Author.objects.filter(name="interrupted").exists()
        with connection.cursor() as cursor:
            cursor.execute("SELECT now() = statement_timestamp()")  # no transaction left open
            assert cursor.fetchone() == (True,)
        connection.close()


# ------------------------------------------------------------------ secrets


def test_no_password_appears_in_errors_logs_or_reprs(
    cluster: EmbeddedPostgres, caplog: Any, django_db_blocker: Any
) -> None:
    password = cluster.password
    caplog.set_level(logging.DEBUG, logger="django_pgpool")
    seen: list[str] = []
    kwargs = cluster.settings.connect_kwargs(application_name="secrets")
    pool = ConnectionPool(PoolConfig(name="secrets", min_size=1, max_size=1, timeout=0.2), kwargs)
    conn = pool.getconn()
    seen += [repr(pool), str(pool.stats()), str(pool.config.as_dict()), repr(conn.__class__)]
    with pytest.raises(PoolTimeout) as timeout:
        pool.getconn()
    seen.append(str(timeout.value))
    pool.putconn(conn)

    cluster.stop()
    with pytest.raises(psycopg2.OperationalError) as refused:
        pool.getconn()  # the idle connection is dead, a new one can't be opened
    seen.append(str(refused.value))
    cluster.start()
    pool.close()
    with pytest.raises(PoolClosed) as closed:
        pool.getconn()
    seen.append(str(closed.value))

    wrong = ConnectionPool(PoolConfig(name="wrong"), {**kwargs, "password": password[::-1]})
    with pytest.raises(psycopg2.OperationalError) as denied:
        wrong.getconn()
    seen.append(str(denied.value))
    wrong.close()

    alias = "secrets-alias"
    settings_dict = alias_settings(cluster, alias, max_size=-1)
    with (
        pytest.raises(ImproperlyConfigured) as bad_option,
        django_db_blocker.unblock(),
        extra_alias(alias, settings_dict),
    ):
        connections[alias].ensure_connection()
    seen.append(str(bad_option.value))
    seen.append(repr(DatabaseWrapper(settings_dict, alias)))

    seen += [record.getMessage() for record in caplog.records]
    seen += [caplog.text]
    assert len(seen) > 10
    for text in seen:
        assert password not in text
    assert "password authentication failed" in str(denied.value)  # the error is still useful


# ------------------------------------------------------------------ shutdown

SHUTDOWN_SCRIPT = """
import os, threading
import django
from django.conf import settings
settings.configure(DATABASES={"default": {
    "ENGINE": "django_pgpool", "NAME": os.environ["PGDATABASE"], "USER": os.environ["PGUSER"],
    "PASSWORD": os.environ.get("PGPASSWORD", ""), "HOST": os.environ["PGHOST"],
    "PORT": os.environ["PGPORT"],
    "OPTIONS": {"pool": {"min_size": 2, "max_size": 6}, "application_name": "pgpool-shutdown"},
}})
django.setup()
from django.db import connection
forever = threading.Event()

def hold():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    forever.wait()                      # never gives its connection back

for _ in range(3):
    threading.Thread(target=hold, daemon=True).start()
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")          # the main thread keeps one too
print("exiting")
"""


def test_the_interpreter_exits_cleanly_while_threads_hold_connections(admin: Any) -> None:
    result = run_python(SHUTDOWN_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exiting"
    assert result.stderr == ""
    assert eventually(lambda: backends(admin, application_name="pgpool-shutdown") == 0)


@pytest.mark.django_db(transaction=True)
def test_a_connection_object_dropped_without_closing_gives_its_connection_back() -> None:
    import gc

    with pool_options(min_size=0, max_size=2):
        pool = connection.pool
        forgotten = connection.copy()  # a second wrapper, as libraries sometimes make
        forgotten.ensure_connection()
        assert pool.stats()["pool_in_use"] == 1
        del forgotten
        gc.collect()  # Django wrappers are reference cycles: collected by the GC
        assert eventually(lambda: pool.stats()["pool_in_use"] == 0)
        assert pool.stats()["connections_reclaimed"] == 1
        assert Author.objects.count() == 0


def test_closing_with_force_closes_connections_still_checked_out(
    make_pool: Any, admin: Any
) -> None:
    pool = make_pool(min_size=0, max_size=2)
    leaked = pool.getconn()
    pool.close(force=True)
    assert leaked.closed
    assert eventually(lambda: backends(admin, application_name=pool.application_name) == 0)
    pool.putconn(leaked)  # its holder returning it later is not an error
