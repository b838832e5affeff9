"""ORM code run by ``sync_to_async(thread_sensitive=False)``, in-process.

Such code runs in a thread of the event loop's default executor. Django gives
connections back at the end of a request only in the request's own thread, so
a connection taken in an executor thread stays with that thread (as with
Django's own backend) until the thread ends. With a pool, that connection is
taken out of it meanwhile. ``tests/test_servers.py`` shows the same under
uvicorn; docs/deployment.md says what to do.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from django_pgpool import PoolTimeout, closing_connections
from testproject.library.models import Book

from .helpers import eventually, pool_options

pytestmark = pytest.mark.django_db(transaction=True)

T = TypeVar("T")


def run_with_executor(threads: int, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` in an event loop whose default executor has ``threads`` threads.

    ``asyncio.run`` shuts the executor down on its way out, so its threads end.
    """

    async def with_executor() -> T:
        executor = ThreadPoolExecutor(threads, thread_name_prefix="asyncio")
        asyncio.get_running_loop().set_default_executor(executor)
        return await main()

    return asyncio.run(with_executor())


def test_a_connection_taken_in_an_executor_thread_stays_with_it_until_the_thread_ends(
    seeded_books: list[int],
) -> None:
    threads = 4
    with pool_options(min_size=0, max_size=2, timeout=0.5, release="request"):
        pool = connection.pool
        together = threading.Barrier(threads)

        def read(pk: int) -> str:
            together.wait()  # one call per executor thread
            return Book.objects.get(pk=pk).title

        held_after_the_calls: list[int] = []

        async def main() -> list[Any]:
            calls = [
                sync_to_async(read, thread_sensitive=False)(seeded_books[n % 3])
                for n in range(threads)
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            held_after_the_calls.append(pool.stats()["pool_in_use"])
            return results

        results = run_with_executor(threads, main)
        # Two threads got the two connections and kept them: the other two waited
        # out the timeout, although nothing was running any more.
        assert sorted(type(result).__name__ for result in results) == [
            "PoolTimeout", "PoolTimeout", "str", "str",
        ]  # fmt: skip
        # The error says who holds the connections, and what to do.
        message = str(next(r for r in results if isinstance(r, PoolTimeout)))
        assert "Held by: asyncio_" in message
        assert ", idle" in message
        assert "django_pgpool.closing_connections" in message
        assert held_after_the_calls == [2]
        # The executor's threads ended: the pool took their connections back.
        assert eventually(lambda: pool.stats()["pool_in_use"] == 0)
        assert pool.stats()["connections_reclaimed"] == 2


def test_closing_connections_in_thread_sensitive_false_code_keeps_a_small_pool_serving(
    seeded_books: list[int],
) -> None:
    threads = 4
    with pool_options(min_size=0, max_size=2, timeout=5):
        pool = connection.pool
        together = threading.Barrier(threads)

        @closing_connections
        def read(pk: int) -> str:
            together.wait()  # four threads want the two connections at once
            return Book.objects.get(pk=pk).title

        held_after_each_round: list[int] = []

        async def main() -> list[str]:
            titles: list[str] = []
            for _ in range(5):
                calls = [
                    sync_to_async(read, thread_sensitive=False)(seeded_books[n % 3])
                    for n in range(threads)
                ]
                titles += await asyncio.gather(*calls)
                held_after_each_round.append(pool.stats()["pool_in_use"])
            return titles

        titles = run_with_executor(threads, main)
        expected = {pk: Book.objects.get(pk=pk).title for pk in seeded_books}
        connection.close()
        assert titles == [expected[seeded_books[n % 3]] for n in range(threads)] * 5
        assert held_after_each_round == [0] * 5
        assert pool.stats()["pool_size"] <= 2
        assert pool.stats()["requests_queued"] > 0  # the pool was the bottleneck, and coped


def test_taking_a_connection_in_an_executor_thread_is_warned_about_once(
    seeded_books: list[int], caplog: Any
) -> None:
    from django_pgpool import base

    caplog.set_level(logging.WARNING, logger="django_pgpool")
    base._warned_about_executor_threads = False
    with pool_options(min_size=0, max_size=4, release="request"):

        def read(pk: int) -> str:
            return Book.objects.get(pk=pk).title

        async def main() -> None:
            for pk in seeded_books:
                await sync_to_async(read, thread_sensitive=False)(pk)
            await sync_to_async(closing_connections(read), thread_sensitive=False)(pk)

        run_with_executor(2, main)
    warnings = [r.getMessage() for r in caplog.records if "event loop executor" in r.getMessage()]
    assert len(warnings) == 1
    assert "wrap such code with django_pgpool.closing_connections" in warnings[0]


def test_closing_connections_does_not_warn(seeded_books: list[int], caplog: Any) -> None:
    from django_pgpool import base

    caplog.set_level(logging.WARNING, logger="django_pgpool")
    base._warned_about_executor_threads = False
    with pool_options(min_size=0, max_size=2):

        @closing_connections
        def read(pk: int) -> str:
            return Book.objects.get(pk=pk).title

        async def main() -> None:
            for pk in seeded_books:
                await sync_to_async(read, thread_sensitive=False)(pk)

        run_with_executor(2, main)
    assert "event loop executor" not in caplog.text
