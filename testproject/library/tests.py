"""Tests run by Django's own test runner (``python -m django test testproject.library``).

The repository's pytest suite starts that runner in a subprocess to prove that
it works unchanged with ``ENGINE: "django_pgpool"``, repeatedly, in parallel,
and without ever touching the real database.
"""

import json
import os
import threading
import urllib.request
from decimal import Decimal

from django.db import connection
from django.test import LiveServerTestCase, TestCase, TransactionTestCase, override_settings

from .models import Author, Book, Order


def current_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return cursor.fetchone()[0]


class RunsOnTheTestDatabase(TestCase):
    def test_queries_reach_the_test_database(self) -> None:
        self.assertTrue(current_database().startswith("test_"))
        self.assertEqual(current_database(), connection.settings_dict["NAME"])

    def test_a_query_made_at_start_up_saw_the_real_database(self) -> None:
        real_name = os.environ.get("TESTPROJECT_DB_NAME")
        if os.environ.get("TESTPROJECT_QUERY_IN_READY") and real_name:
            self.assertEqual(os.environ.get("TESTPROJECT_READY_SAW_DATABASE"), real_name)

    def test_the_orm_works(self) -> None:
        author = Author.objects.create(name="Octavia E. Butler")
        Book.objects.create(author=author, title="Kindred", price=Decimal("12.00"), stock=3)
        self.assertEqual(Book.objects.filter(author__name__startswith="Octavia").count(), 1)


class TransactionsAreCommittedAndFlushed(TransactionTestCase):
    def test_a_purchase_commits_its_order(self) -> None:
        author = Author.objects.create(name="N. K. Jemisin")
        book = Book.objects.create(
            author=author, title="The Fifth Season", price=Decimal("10"), stock=5
        )
        response = self.client.post(f"/books/{book.pk}/buy/")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(Order.objects.filter(book=book).count(), 1)
        book.refresh_from_db()
        self.assertEqual(book.stock, 4)


class TimeZoneOverridesReachTheConnection(TestCase):
    def time_zone(self) -> str:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('TimeZone')")
            return cursor.fetchone()[0]

    def test_use_tz(self) -> None:
        self.assertEqual(self.time_zone(), "UTC")

    @override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo")
    def test_override_time_zone(self) -> None:
        self.assertEqual(self.time_zone(), "Asia/Tokyo")


class ServedFromSeveralThreads(LiveServerTestCase):
    def test_concurrent_requests(self) -> None:
        author = Author.objects.create(name="Ted Chiang")
        books = [
            Book.objects.create(author=author, title=f"Story {n}", price=Decimal("5"), stock=1)
            for n in range(4)
        ]
        results: list[int] = []
        lock = threading.Lock()

        def fetch(pk: int) -> None:
            for _ in range(5):
                url = f"{self.live_server_url}/books/{pk}/"
                with urllib.request.urlopen(url, timeout=30) as response, lock:
                    results.append(json.loads(response.read())["id"])

        threads = [threading.Thread(target=fetch, args=(book.pk,)) for book in books]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(sorted(results), sorted([book.pk for book in books] * 5))
