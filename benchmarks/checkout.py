"""The checkout micro-benchmark: one uncontended checkout and return, in µs,
for django_pgpool's pool beside psycopg2's ``ThreadedConnectionPool`` and
psycopg 3's ``psycopg_pool`` (best of 5 runs of 100 000; nothing is sent to
the server on this path).

    python -m benchmarks.checkout     (the full benchmark runs it at its end too)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

RUNS = 5
ROUNDS = 100_000

# psycopg 3 in an interpreter of its own: where django_pgpool is loaded,
# Django's backend is bound to psycopg2.
PSYCOPG_POOL = f"""
import json, sys, time
import psycopg_pool
pool = psycopg_pool.ConnectionPool(kwargs=json.loads(sys.argv[1]), min_size=1, max_size=4,
                                   open=True)
pool.putconn(pool.getconn())
runs = []
for _ in range({RUNS}):
    started = time.perf_counter()
    for _ in range({ROUNDS}):
        pool.putconn(pool.getconn())
    runs.append((time.perf_counter() - started) / {ROUNDS} * 1e6)
pool.close()
print(min(runs))
"""


def best(get: Callable[[], Any], put: Callable[[Any], None]) -> float:
    """µs per checkout and return: the best of :data:`RUNS` runs of :data:`ROUNDS`."""
    put(get())
    runs = []
    for _ in range(RUNS):
        started = time.perf_counter()
        for _ in range(ROUNDS):
            put(get())
        runs.append((time.perf_counter() - started) / ROUNDS * 1e6)
    return min(runs)


def measure(connect_kwargs: dict[str, Any]) -> dict[str, float]:
    """µs per uncontended checkout and return, by pool."""
    import psycopg2.pool

    from django_pgpool.config import PoolConfig
    from django_pgpool.pool import ConnectionPool

    results = {}
    ours = ConnectionPool(PoolConfig(name="micro", min_size=1, max_size=4), connect_kwargs)
    results["django_pgpool"] = best(ours.getconn, ours.putconn)
    ours.close()
    plain = psycopg2.pool.ThreadedConnectionPool(1, 4, **connect_kwargs)
    results["psycopg2 ThreadedConnectionPool"] = best(plain.getconn, plain.putconn)
    plain.closeall()
    if find_spec("psycopg_pool") and find_spec("psycopg"):
        native = subprocess.run(
            [sys.executable, "-c", PSYCOPG_POOL, json.dumps(connect_kwargs)],
            capture_output=True,
            text=True,
        )
        if native.returncode == 0:
            results["psycopg_pool"] = float(native.stdout.strip())
    return results


def main() -> int:
    from testsupport.pgserver import ensure_server

    kwargs = ensure_server(quiet=True).connect_kwargs(application_name="pgpool-micro")
    for name, microseconds in measure(kwargs).items():
        print(f"{name}: {microseconds:.2f} µs per checkout + return")
    return 0


if __name__ == "__main__":
    sys.exit(main())
