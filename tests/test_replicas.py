"""Read replicas: a router sends reads to the ``replica`` alias and writes to
``default``; each alias has a pool and statistics of its own.

In the tests ``replica`` is a test mirror of ``default`` (the same database,
reached through its own pool), as the testproject's settings declare.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection, connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import django_pgpool
from testproject.library.models import Author, Book, Order

from .helpers import run_python, serve

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "replica"])

ROUTER = "testproject.routers.PrimaryReplicaRouter"


@pytest.fixture
def routed(seeded_books: list[int], fresh_pools: None) -> Iterator[list[int]]:
    with override_settings(DATABASE_ROUTERS=[ROUTER]):
        yield seeded_books


def requests_taken() -> dict[str, int]:
    """Connections each alias's pool has handed out so far."""
    return {alias: stats["requests_num"] for alias, stats in django_pgpool.stats().items()}


def test_each_alias_has_a_pool_of_its_own() -> None:
    with connections["default"].cursor(), connections["replica"].cursor():
        default_pool, replica_pool = connections["default"].pool, connections["replica"].pool
        assert default_pool is not replica_pool
        assert (default_pool.name, replica_pool.name) == ("default", "replica")
    for alias in ("default", "replica"):
        connections[alias].close()
    assert set(django_pgpool.stats()) >= {"default", "replica"}


def test_requests_read_through_the_replica_pool_and_write_through_the_default_pool(
    routed: list[int],
) -> None:
    before = requests_taken()
    for pk in routed * 3:
        status, body = serve(f"/books/{pk}/")
        assert status == 200 and json.loads(body)["id"] == pk
    after_reads = requests_taken()
    assert after_reads["replica"] - before.get("replica", 0) == 9
    assert after_reads.get("default", 0) == before.get("default", 0)

    for pk in routed:
        status, body = serve(f"/books/{pk}/buy/", "POST")
        assert status == 200 and json.loads(body)["book"] == pk
    after_writes = requests_taken()
    # The purchase reads its book inside its transaction, from the primary.
    assert after_writes["default"] - after_reads.get("default", 0) == 3
    assert after_writes["replica"] == after_reads["replica"]
    stats = django_pgpool.stats()
    assert stats["default"]["pool_in_use"] == 0 and stats["replica"]["pool_in_use"] == 0
    assert Order.objects.filter(book_id__in=routed).count() == 3


def test_the_orm_reads_from_the_replica_and_writes_to_the_primary(routed: list[int]) -> None:
    with (
        CaptureQueriesContext(connections["default"]) as on_default,
        CaptureQueriesContext(connections["replica"]) as on_replica,
    ):
        author = Author.objects.create(name="Becky Chambers")
        assert Author.objects.filter(name="Becky Chambers").count() == 1
        Book.objects.filter(pk=routed[0]).update(stock=7)
        assert Book.objects.get(pk=routed[0]).stock == 7
    assert [q["sql"].split()[0] for q in on_default.captured_queries] == ["INSERT", "UPDATE"]
    assert [q["sql"].split()[0] for q in on_replica.captured_queries] == ["SELECT", "SELECT"]
    assert connections["replica"].pool is not connections["default"].pool
    author.delete()


def test_reads_inside_a_transaction_stay_on_the_primary(routed: list[int]) -> None:
    with transaction.atomic():
        author = Author.objects.create(name="Ann Leckie")
        book = Book.objects.create(author=author, title="Ancillary Justice", price=Decimal("9"))
        # The replica's session cannot see the uncommitted row; the router
        # reads it from the primary, which can.
        assert not Book.objects.using("replica").filter(pk=book.pk).exists()
        assert Book.objects.get(pk=book.pk).title == "Ancillary Justice"
    assert Book.objects.filter(pk=book.pk).exists()  # committed: the replica sees it now


ROUTED_PROCESS = """
import json, django
django.setup()
import django_pgpool
from tests.helpers import serve
from testproject.library.models import Book
pk = Book.objects.using("default").values_list("pk", flat=True).first()
from django.db import connections
connections.close_all()
for _ in range(4):
    assert serve(f"/books/{pk}/")[0] == 200
assert serve(f"/books/{pk}/buy/", "POST")[0] == 200
print(json.dumps({alias: s["requests_num"] for alias, s in django_pgpool.stats().items()}))
"""


@pytest.mark.parametrize(
    ("switch", "expected"),
    [("1", {"default": 2, "replica": 4}), ("", {"default": 6})],
    ids=["TESTPROJECT_REPLICA_ROUTER=1", "off by default"],
)
def test_the_settings_switch_turns_the_router_on_in_a_real_process(
    seeded_books: list[int], switch: str, expected: dict[str, Any]
) -> None:
    result = run_python(
        ROUTED_PROCESS,
        env={
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            "TESTPROJECT_DB_NAME": connection.settings_dict["NAME"],
            "TESTPROJECT_REPLICA_ROUTER": switch,
        },
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
