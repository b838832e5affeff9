"""``release: "transaction"``: a thread holds a connection only while it uses it.

Outside ``atomic()`` the connection goes back as soon as the statement's
cursor is closed (the ORM closes it once it has read the rows); inside, when
the outermost block ends. What needs one session across statements pins it.
Each test runs against the real test database through Django's ORM.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, ProgrammingError, connection, connections, transaction
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext

from django_pgpool.release import changes_session, connection_pinned
from testproject.library.models import Author, Book

from .helpers import eventually, pool_options, query_one, run_in_threads

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def per_transaction() -> Iterator[Any]:
    """The default alias in transaction mode, on a pool of its own; yields the pool."""
    connection.close()
    with pool_options(release="transaction", min_size=0, max_size=4, timeout=5):
        Author.objects.exists()  # build the pool
        yield connection.pool
    connection.close()


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def test_the_connection_goes_back_as_soon_as_the_query_has_read_its_rows(
    per_transaction: Any, seeded_books: list[int]
) -> None:
    book = Book.objects.get(pk=seeded_books[0])
    assert book.title
    assert connection.connection is None  # given back to the pool
    assert per_transaction.stats()["pool_in_use"] == 0
    assert Book.objects.count() == 3  # the next statement takes one again


def test_a_thread_that_queries_then_sleeps_holds_no_connection_while_it_sleeps(
    seeded_books: list[int], admin: Any
) -> None:
    connection.close()
    with pool_options(release="transaction", min_size=0, max_size=1, timeout=2):
        pool = connection.pool
        queried, woken = threading.Event(), threading.Event()
        seen: dict[str, Any] = {}

        def sleeper() -> None:
            Book.objects.get(pk=seeded_books[0])
            seen["sleeper"] = backend_pid()
            queried.set()
            woken.wait(5)  # "sleeps 5 s": woken early once the checks are done
            connection.close()

        thread = threading.Thread(target=sleeper)
        thread.start()
        assert queried.wait(5)
        # While it sleeps: the pool counts nothing in use, and its only server
        # connection serves another thread (it would time out if still held).
        assert pool.stats()["pool_in_use"] == 0
        assert backend_pid() == seen["sleeper"]
        connection.close()
        state = query_one(
            admin, "SELECT state FROM pg_stat_activity WHERE pid = %s", [seen["sleeper"]]
        )
        assert state == "idle"
        woken.set()
        thread.join()


def test_an_atomic_block_keeps_one_connection_until_the_outermost_block_ends(
    per_transaction: Any, seeded_books: list[int]
) -> None:
    with transaction.atomic():
        first = backend_pid()
        Book.objects.filter(pk=seeded_books[0]).update(stock=5)
        with transaction.atomic():
            assert backend_pid() == first
            assert per_transaction.stats()["pool_in_use"] == 1
        assert Book.objects.get(pk=seeded_books[0]).stock == 5
        assert backend_pid() == first
    assert connection.connection is None
    assert per_transaction.stats()["pool_in_use"] == 0


def test_a_rolled_back_atomic_block_leaves_nothing_behind(
    per_transaction: Any, seeded_books: list[int]
) -> None:
    class Undo(Exception):
        pass

    def change_then_fail() -> None:
        with transaction.atomic():
            Book.objects.filter(pk=seeded_books[0]).update(stock=-1)
            raise Undo

    with pytest.raises(Undo):
        change_then_fail()
    assert Book.objects.get(pk=seeded_books[0]).stock == 1_000_000
    assert per_transaction.stats()["pool_in_use"] == 0


def test_iterator_with_chunked_fetch_interleaved_with_other_queries_returns_every_row_once(
    per_transaction: Any,
) -> None:
    author = Author.objects.create(name="Prolific")
    Book.objects.bulk_create(
        Book(author=author, title=f"Volume {n}", price=Decimal("1.00")) for n in range(10_000)
    )
    seen: list[int] = []
    counts = []
    for book in Book.objects.filter(author=author).order_by("pk").iterator(chunk_size=500):
        seen.append(book.pk)
        if len(seen) % 1000 == 0:
            counts.append(Author.objects.count())  # another query, same thread
    assert len(seen) == 10_000 and len(set(seen)) == 10_000
    assert counts == [1] * 10
    # The server-side cursor held the connection while it was open, not after.
    assert per_transaction.stats()["pool_in_use"] == 0


def test_a_set_is_seen_by_the_next_statement_of_the_request_and_by_no_other_request(
    per_transaction: Any,
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SET search_path TO pg_catalog")
    with connection.cursor() as cursor:
        cursor.execute("SHOW search_path")
        assert cursor.fetchone() == ("pg_catalog",)  # pinned, not lost

    def other_request(_: int) -> Any:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SHOW search_path")
                return cursor.fetchone()
        finally:
            connection.close()

    assert run_in_threads(2, other_request) == [('"$user", public',)] * 2
    assert per_transaction.stats()["pins_num"] == 1
    connection.close()  # the end of the request: the pin ends, the reset undoes the SET
    with connection.cursor() as cursor:
        cursor.execute("SHOW search_path")
        assert cursor.fetchone() == ('"$user", public',)


@pytest.mark.parametrize(
    "sql",
    [
        "SET statement_timeout = '5s'",
        "set search_path to public",
        "SET SESSION AUTHORIZATION DEFAULT",
        "SELECT set_config('app.tenant_id', '42', false)",
        "LISTEN tenant_events",
        "PREPARE plan AS SELECT 1",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE scratch (n int)",
        "CREATE TEMPORARY TABLE scratch (n int)",
        "SELECT * INTO TEMP copy FROM pg_class",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_lock_shared(42)",
        "SELECT 1; SET work_mem = '64MB'",
    ],
)
def test_statements_that_change_the_session_pin_the_connection(sql: str) -> None:
    assert changes_session(sql)


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT "library_book"."id" FROM "library_book" WHERE "library_book"."id" = %s',
        "UPDATE library_book SET stock = stock - 1 WHERE id = %s",
        "SET LOCAL statement_timeout = '1s'",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SET CONSTRAINTS ALL IMMEDIATE",
        "SELECT set_config('app.tenant_id', '42', true)",
        "SELECT pg_advisory_xact_lock(42)",
        "INSERT INTO t (settings) VALUES ('SET x')",
    ],
)
def test_ordinary_statements_do_not_pin(sql: str) -> None:
    assert not changes_session(sql)


@pytest.fixture
def tenant_function(per_transaction: Any) -> Iterator[None]:
    """A function that sets the tenant for the session: its callers' SQL doesn't show it."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION use_tenant(id text) RETURNS text LANGUAGE sql "
            "AS $$ SELECT set_config('app.tenant_id', id, false) $$"
        )
    connection.close()
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP FUNCTION use_tenant(text)")
    connection.close()


def tenant() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT coalesce(current_setting('app.tenant_id', true), '')")
        return str(cursor.fetchone()[0])


@pytest.mark.usefixtures("tenant_function")
def test_connection_pinned_keeps_one_session_for_a_block(per_transaction: Any) -> None:
    with connection_pinned():
        with connection.cursor() as cursor:
            cursor.execute("SELECT use_tenant('42')")
        assert per_transaction.stats()["pool_in_use"] == 1
        assert tenant() == "42"
    assert per_transaction.stats()["pool_in_use"] == 0


@pytest.mark.usefixtures("tenant_function")
def test_a_session_change_the_sql_does_not_show_is_lost_not_leaked(per_transaction: Any) -> None:
    # The documented limit: without connection_pinned(), the change is undone
    # by the reset when the connection goes back; no other request sees it.
    with connection.cursor() as cursor:
        cursor.execute("SELECT use_tenant('42')")
    assert tenant() == ""


def test_a_failing_statement_gives_its_connection_back_rolled_back(
    per_transaction: Any,
) -> None:
    def bad_statement() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT * FROM no_such_table")

    with pytest.raises(ProgrammingError):
        bad_statement()
    assert per_transaction.stats()["pool_in_use"] == 0
    assert Author.objects.count() == 0


def test_a_connection_that_dies_is_not_retried_but_the_next_statement_gets_another(
    per_transaction: Any, admin: Any
) -> None:
    victim = backend_pid()
    running = threading.Event()

    def kill_when_running() -> None:
        running.wait(5)
        assert eventually(
            lambda: (
                query_one(admin, "SELECT state FROM pg_stat_activity WHERE pid = %s", [victim])
                == "active"
            )
        )
        query_one(admin, "SELECT pg_terminate_backend(%s)", [victim])

    def long_statement() -> None:
        with connection.cursor() as cursor:
            running.set()
            cursor.execute("SELECT pg_sleep(5)")

    killer = threading.Thread(target=kill_when_running)
    killer.start()
    with pytest.raises(OperationalError):
        long_statement()
    killer.join()
    assert per_transaction.stats()["pool_in_use"] == 0
    assert backend_pid() != victim


def test_djangos_per_connection_state_is_right_on_every_take(
    per_transaction: Any, seeded_books: list[int]
) -> None:
    created: list[int] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        created.append(connection.connection.get_backend_pid())

    connection_created.connect(receiver)
    try:
        with CaptureQueriesContext(connection) as captured:
            for pk in seeded_books:
                Book.objects.get(pk=pk)
            with connection.cursor() as cursor:
                cursor.execute("SHOW TimeZone")
                assert cursor.fetchone() == ("UTC",)
    finally:
        connection_created.disconnect(receiver)
    assert len(captured.captured_queries) == 4  # the log spans the releases
    assert len(created) == 4  # each take is a new connection, as far as Django knows


def test_code_run_by_sync_to_async_in_executor_threads_holds_no_connection(
    seeded_books: list[int],
) -> None:
    # Without transaction mode, 8 executor threads each keep one of 2
    # connections and the rest time out (tests/test_asgi_threads.py).
    connection.close()
    with pool_options(release="transaction", min_size=0, max_size=2, timeout=5):
        pool = connection.pool

        def read(pk: int) -> str:
            return Book.objects.get(pk=pk).title

        async def main() -> list[str]:
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(8, thread_name_prefix="asyncio")
            )
            calls = [
                sync_to_async(read, thread_sensitive=False)(seeded_books[n % 3]) for n in range(200)
            ]
            return await asyncio.gather(*calls)

        titles = asyncio.run(main())
        assert len(titles) == 200 and all(titles)
        stats = pool.stats()
        assert stats["pool_in_use"] == 0 and stats["requests_timeouts"] == 0
        assert stats["connections_num"] <= 2


def test_a_transaction_opened_with_a_literal_begin_holds_the_connection_until_it_ends(
    per_transaction: Any,
) -> None:
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    assert per_transaction.stats()["pool_in_use"] == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] == pid
        cursor.execute("COMMIT")
    assert per_transaction.stats()["pool_in_use"] == 0


def test_a_wrapper_used_by_another_thread_against_the_rules_still_closes_cleanly(
    per_transaction: Any, seeded_books: list[int]
) -> None:
    # Django's backends.tests.ThreadTests.test_pass_connection_between_threads:
    # another thread takes a connection for this thread's wrapper, Django
    # refuses the query there, and that thread ends still holding it.
    Book.objects.get(pk=seeded_books[0])  # released: the wrapper has no connection
    refused: list[Exception] = []

    def other_thread(wrapper: Any) -> None:
        from django.db import connections

        connections["default"] = wrapper
        try:
            Book.objects.get(pk=seeded_books[0])
        except Exception as exc:
            refused.append(exc)

    thread = threading.Thread(target=other_thread, args=[connections["default"]])
    thread.start()
    thread.join()
    assert refused and "thread" in str(refused[0])
    # The pool took that connection back when the thread ended.
    assert eventually(lambda: per_transaction.stats()["pool_in_use"] == 0)
    connection.close()
    assert Book.objects.count() == 3
