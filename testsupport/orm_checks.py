"""ORM checks against whatever the settings point at: queries, transactions,
``QuerySet.iterator()``, bulk operations, session handling and concurrent use.

    python -m testsupport.orm_checks [--threads 16] [--seconds 2] [--only NAME,...]

The tests run it through PgBouncer (``TESTPROJECT_DB_HOST`` /
``TESTPROJECT_DB_PORT``) in session and transaction pooling modes, against a
database migrated and seeded beforehand directly on PostgreSQL. It prints one
line of JSON: each check's result (``"ok"`` or what went wrong), what it
observed, and the pool's statistics; the exit status is 0 when every check
passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from decimal import Decimal
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")

Check = Callable[[dict[str, Any]], None]
CHECKS: dict[str, Check] = {}


def check(func: Check) -> Check:
    CHECKS[func.__name__] = func
    return func


def scalar(sql: str) -> Any:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def end_of_request() -> None:
    """What Django does when a request ends: the connection goes back to the pool."""
    from django.db import close_old_connections

    close_old_connections()


@check
def queries(observed: dict[str, Any]) -> None:
    from django.db.models import Count, Max

    from testproject.library.models import Author, Book

    total = Book.objects.count()
    assert total > 0, "the database is not seeded"
    book = Book.objects.select_related("author").order_by("pk").first()
    assert book is not None and book.author.name
    by_author = Author.objects.annotate(n=Count("books")).aggregate(Max("n"))
    assert by_author["n__max"] >= 1
    assert len(list(Book.objects.filter(pk__in=[book.pk]).values_list("title", flat=True))) == 1
    observed["books"] = total
    end_of_request()


@check
def time_zone(observed: dict[str, Any]) -> None:
    from django.utils import timezone

    from testproject.library.models import Book, Order

    # Django expects UTC sessions with USE_TZ; each new pooled connection and
    # each reset must leave it so, on every connection.
    zones = set()
    for _ in range(3):
        zones.add(scalar("SELECT current_setting('TimeZone')"))
        end_of_request()
    observed["time_zones"] = sorted(zones)
    assert zones == {"UTC"}, zones
    book = Book.objects.order_by("pk").first()
    assert book is not None
    order = Order.objects.create(book=book)
    fetched = Order.objects.get(pk=order.pk).created_at
    assert fetched == order.created_at and fetched.tzinfo is not None
    assert abs((timezone.now() - fetched).total_seconds()) < 60
    order.delete()
    end_of_request()


@check
def transactions(observed: dict[str, Any]) -> None:
    from django.db import DatabaseError, transaction

    from testproject.library.models import Author, Book

    tag = secrets.token_hex(4)
    with transaction.atomic():
        Author.objects.create(name=f"committed-{tag}")
    assert Author.objects.filter(name=f"committed-{tag}").exists()

    class Rollback(Exception):
        pass

    try:
        with transaction.atomic():
            Author.objects.create(name=f"rolled-back-{tag}")
            raise Rollback
    except Rollback:
        pass
    assert not Author.objects.filter(name=f"rolled-back-{tag}").exists()

    with transaction.atomic():
        outer = Author.objects.create(name=f"outer-{tag}")
        try:
            with transaction.atomic():  # a savepoint
                Book.objects.create(author=outer, title="inner", price=Decimal("1"), stock=1)
                scalar("SELECT 1/0")
        except DatabaseError:
            pass
    assert Author.objects.filter(name=f"outer-{tag}").exists()
    assert not Book.objects.filter(author=outer).exists()

    # An error inside a transaction leaves a connection the next request can use.
    try:
        with transaction.atomic():
            scalar("SELECT 1/0")
    except DatabaseError as exc:
        observed["error_in_transaction"] = type(exc).__name__
    end_of_request()
    assert scalar("SELECT 1") == 1
    Author.objects.filter(name__endswith=tag).delete()
    end_of_request()


@check
def iterator(observed: dict[str, Any]) -> None:
    from testproject.library.models import Book

    expected = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    streamed = list(Book.objects.order_by("pk").values_list("pk", flat=True).iterator(chunk_size=7))
    assert streamed == expected
    end_of_request()


@check
def iterator_while_another_client_holds_a_server(observed: dict[str, Any]) -> None:
    """Stream with ``iterator()`` while another connection holds a server in a transaction.

    In transaction pooling, each statement of an autocommit session may run on
    another server: a server-side cursor declared on one is missing on the
    next (PgBouncer hands the most recently used server to the other client).
    With ``DISABLE_SERVER_SIDE_CURSORS`` the rows come in one client-side
    result and nothing is left on the server.
    """
    from django.db import connection, transaction

    from testproject.library.models import Book

    observed["server_side_cursors"] = not connection.settings_dict.get(
        "DISABLE_SERVER_SIDE_CURSORS", False
    )
    expected = list(Book.objects.order_by("pk").values_list("pk", flat=True))
    end_of_request()
    holding = threading.Event()
    release = threading.Event()

    def hold_a_server() -> None:
        try:
            with transaction.atomic():
                scalar("SELECT 1")
                holding.set()
                release.wait(10)
        finally:
            holding.set()
            end_of_request()

    rows = Book.objects.order_by("pk").values_list("pk", flat=True).iterator(chunk_size=2)
    streamed = [next(rows), next(rows)]
    holder = threading.Thread(target=hold_a_server)
    holder.start()
    try:
        holding.wait(10)
        streamed += list(rows)
    finally:
        release.set()
        holder.join()
        end_of_request()
    assert streamed == expected


@check
def bulk_operations(observed: dict[str, Any]) -> None:
    from django.db.models import F

    from testproject.library.models import Author, Book

    tag = secrets.token_hex(4)
    author = Author.objects.create(name=f"bulk-{tag}")
    books = Book.objects.bulk_create(
        [
            Book(author=author, title=f"bulk {n}", price=Decimal("2.50"), stock=n)
            for n in range(500)
        ],
        batch_size=100,
    )
    assert len(books) == 500 and all(book.pk for book in books)
    for book in books:
        book.title = f"{book.title} (2nd edition)"
    assert Book.objects.bulk_update(books, ["title"], batch_size=100) == 500
    assert Book.objects.filter(author=author, title__endswith="(2nd edition)").count() == 500
    assert Book.objects.filter(author=author).update(stock=F("stock") + 1) == 500
    assert set(Book.objects.in_bulk([books[0].pk, books[-1].pk])) == {books[0].pk, books[-1].pk}
    deleted, _ = Book.objects.filter(author=author).delete()
    assert deleted == 500
    author.delete()
    end_of_request()


@check
def session_reset(observed: dict[str, Any]) -> None:
    """What a request leaves in its session, as a later user of the same server
    session sees it."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = '7s'")
        # The server's process, not libpq's get_backend_pid(): behind
        # PgBouncer, that is PgBouncer's number for the client connection.
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    end_of_request()
    # The pool hands out its most recently used connection first: hold each
    # one taken until the one on that server session comes out.
    # django.db.connection is typed as the base wrapper, which has no pool.
    pool = connection.pool  # type: ignore[attr-defined]
    held = []
    observed["same_server_session"] = False
    try:
        for _ in range(pool.stats()["pool_max"]):
            conn = pool.getconn()
            held.append(conn)
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), current_setting('statement_timeout')")
                backend_pid, statement_timeout = cursor.fetchone()
            if backend_pid == pid:
                observed["same_server_session"] = True
                observed["statement_timeout_next_request"] = statement_timeout
                break
    finally:
        for conn in held:
            pool.putconn(conn)


def load(threads: int, seconds: float) -> dict[str, Any]:
    """Requests from many threads: reads and purchases, each request ending as Django's do."""
    from django.db import transaction
    from django.db.models import F

    from testproject.library.models import Book, Order

    pks = list(Book.objects.values_list("pk", flat=True)[:50])
    end_of_request()
    served = [0] * threads
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < deadline:
            pk = rng.choice(pks)
            try:
                if rng.random() < 0.3:
                    with transaction.atomic():
                        book = Book.objects.get(pk=pk)
                        Book.objects.filter(pk=pk).update(stock=F("stock") - 1)
                        Order.objects.create(book=book)
                else:
                    Book.objects.select_related("author").get(pk=pk)
                served[index] += 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                end_of_request()

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return {"served": sum(served), "errors": errors[:5], "error_count": len(errors)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testsupport.orm_checks", description=__doc__)
    parser.add_argument("--threads", type=int, default=16, help="threads of the load (0: none)")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long the load lasts")
    parser.add_argument("--only", default="", help="comma-separated checks to run")
    args = parser.parse_args(argv)

    import django

    django.setup()
    import django_pgpool

    chosen = [name for name in args.only.split(",") if name] or list(CHECKS)
    report: dict[str, Any] = {"checks": {}, "observed": {}}
    for name in chosen:
        try:
            CHECKS[name](report["observed"])
            report["checks"][name] = "ok"
        except Exception as exc:
            report["checks"][name] = f"{type(exc).__name__}: {exc}".strip()
            report.setdefault("tracebacks", {})[name] = traceback.format_exc()[-2000:]
            end_of_request()
    if args.threads:
        report["load"] = load(args.threads, args.seconds)
    report["pool"] = django_pgpool.stats().get("default", {})
    print(json.dumps(report))
    passed = all(result == "ok" for result in report["checks"].values())
    return 0 if passed and not report.get("load", {}).get("error_count") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
