"""Uncontended checkout + return, beside psycopg2's and psycopg 3's own pools.

Run with ``python -m pytest benchmarks -p no:cacheprovider`` (not part of the
test suite: speed is reported, never asserted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg2.pool
import pytest

from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testsupport.pgserver import ensure_server


@pytest.fixture(scope="module")
def connect_kwargs() -> dict[str, Any]:
    return ensure_server(quiet=True).connect_kwargs(application_name="pgpool-micro")


@pytest.fixture
def django_pgpool_pool(connect_kwargs: dict[str, Any]) -> Iterator[ConnectionPool]:
    pool = ConnectionPool(PoolConfig(name="micro", min_size=1, max_size=4), connect_kwargs)
    pool.putconn(pool.getconn())
    yield pool
    pool.close()


def test_django_pgpool(benchmark: Any, django_pgpool_pool: ConnectionPool) -> None:
    pool = django_pgpool_pool
    benchmark(lambda: pool.putconn(pool.getconn()))


def test_psycopg2_threaded_connection_pool(benchmark: Any, connect_kwargs: dict[str, Any]) -> None:
    pool = psycopg2.pool.ThreadedConnectionPool(1, 4, **connect_kwargs)
    benchmark(lambda: pool.putconn(pool.getconn()))
    pool.closeall()


PSYCOPG_POOL = """
import json, sys, timeit
import psycopg_pool
kwargs = json.loads(sys.argv[1])
pool = psycopg_pool.ConnectionPool(kwargs=kwargs, min_size=1, max_size=4, open=True)
pool.putconn(pool.getconn())
runs = timeit.repeat(lambda: pool.putconn(pool.getconn()), number=20000, repeat=5)
pool.close()
print(min(runs) / 20000 * 1e6)
"""


def test_psycopg_pool(connect_kwargs: dict[str, Any], record_property: Any) -> None:
    # psycopg 3 in its own interpreter: in this one Django's backend is bound to psycopg2.
    pytest.importorskip("psycopg_pool")
    result = subprocess.run(
        [sys.executable, "-c", PSYCOPG_POOL, json.dumps(connect_kwargs)],
        capture_output=True,
        text=True,
        check=True,
    )
    microseconds = float(result.stdout)
    record_property("psycopg_pool_us", microseconds)
    print(f"\npsycopg_pool ConnectionPool: {microseconds:.2f} µs per checkout + return")
