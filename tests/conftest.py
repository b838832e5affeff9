"""Shared fixtures. Every test that uses the database runs against a real
PostgreSQL server: the one :mod:`testsupport.pgserver` found or started (see
the README's "embedded default"), found or started the first time a test needs
it. Tests that need no database (configuration, documentation) need no server."""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import django_pgpool
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testsupport.pgserver import ServerSettings, ensure_server

from .helpers import PeakSampler, backends


@pytest.fixture(scope="session")
def server() -> ServerSettings:
    return ensure_server()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(request: pytest.FixtureRequest, server: ServerSettings) -> None:
    """Point every alias at the session's server before the test databases are made.

    pytest-django imports the settings before any fixture runs, and they only
    name a server (from the environment, without connecting); the launcher may
    have started a throwaway cluster elsewhere since. ``connections.settings``
    is ``settings.DATABASES`` itself, and each connection's ``settings_dict``
    one of its entries, so changing the entries in place reaches them all.
    """
    from django.db import connections

    for entry in connections.settings.values():
        entry.update(
            HOST=server.host,
            PORT=str(server.port),
            USER=server.user,
            PASSWORD=server.password,
            NAME=server.dbname,
        )
        entry["OPTIONS"] = {**entry.get("OPTIONS", {}), **dict(server.options)}
    # The suffixes pytest-django gives the test databases' names under tox and
    # xdist are made from NAME: only now is it the server's.
    request.getfixturevalue("django_db_modify_db_settings_parallel_suffix")


@pytest.fixture
def admin(server: ServerSettings) -> Iterator[Any]:
    """A plain psycopg2 connection (not pooled) for looking at the server from outside."""
    conn = server.connect(dbname="postgres", application_name="pgpool-test-admin")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def pools_database(server: ServerSettings) -> Iterator[Any]:
    """A plain connection to the database that ``make_pool``'s pools use (the
    server's own, which is not always ``postgres``), in autocommit mode."""
    conn = server.connect(application_name="pgpool-test-admin")
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def peak_sampler(server: ServerSettings) -> Callable[..., PeakSampler]:
    def make(**filters: Any) -> PeakSampler:
        conn = server.connect(dbname="postgres", application_name="pgpool-test-sampler")
        conn.autocommit = True
        lock = threading.Lock()

        def sample() -> int:
            with lock:
                return backends(conn, **filters)

        return PeakSampler(sample, on_exit=conn.close)

    return make


_names = itertools.count()


@pytest.fixture
def make_pool(server: ServerSettings) -> Iterator[Callable[..., ConnectionPool]]:
    """Build standalone pools (no Django) on the server's database, each with its own
    application_name so that its server connections can be counted."""
    pools: list[ConnectionPool] = []

    def make(connect_kwargs: Any = None, **options: Any) -> ConnectionPool:
        name = f"pgpool-test-{os.getpid()}-{next(_names)}-{uuid.uuid4().hex[:6]}"
        options.setdefault("name", name)
        if connect_kwargs is None:
            connect_kwargs = server.connect_kwargs(application_name=name)
        pool = ConnectionPool(PoolConfig(**options), connect_kwargs)
        pool.application_name = name
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def fresh_pools() -> Iterator[None]:
    """Close every Django pool before and after the test (for tests that count connections)."""
    django_pgpool.close_pools()
    yield
    django_pgpool.close_pools()


@pytest.fixture
def seeded_books(transactional_db: Any) -> list[int]:
    """Primary keys of a few books, committed in the test database (visible to all threads)."""
    from decimal import Decimal

    from django.db import connection

    from testproject.library.models import Author, Book

    author = Author.objects.create(name="Ursula K. Le Guin")
    books = Book.objects.bulk_create(
        Book(title=title, author=author, price=Decimal("9.50"), stock=1_000_000)
        for title in ("The Dispossessed", "The Lathe of Heaven", "A Wizard of Earthsea")
    )
    connection.close()
    return [book.pk for book in books]
