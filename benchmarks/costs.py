"""Where a pooled request's extra time goes, piece by piece, in CPU time.

    python -m benchmarks.costs        (PG* variables name the server, else 127.0.0.1:5432)

Throughput on a small shared machine moves from run to run; CPU time per
operation, measured on the client (this process) and on the server (the
backend's own counters in ``/proc``, when the server runs on this machine),
does not move much. Each line measures one thing a pooled request does that
a persistent connection does not:

- ``pool``: one uncontended ``getconn()`` + ``putconn()`` (nothing sent);
- ``django``: Django's ``connect()`` + ``close()`` on a pooled alias, with
  and without its ``connection_created`` receivers (``django.contrib.postgres``
  registers its type handlers in one);
- ``reset``: a returned connection's ``DISCARD ALL`` sent without waiting and
  its answer read at the next checkout, against a connection that ran nothing;
- for scale, one ``SELECT 1`` round trip on the same connection.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROUNDS = 5000


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def backend_cpu_seconds(pid: int) -> float | None:
    """The server backend's CPU time, from /proc (None when it is not readable here)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_call(run: Callable[[], Any], backend_pid: int | None = None) -> dict[str, float]:
    """µs of client CPU (and of server CPU, for ``backend_pid``) per call of ``run``."""
    for _ in range(200):
        run()
    server_before = backend_cpu_seconds(backend_pid) if backend_pid else None
    client_before = cpu_seconds()
    for _ in range(ROUNDS):
        run()
    result = {"client_us": (cpu_seconds() - client_before) / ROUNDS * 1e6}
    server_after = backend_cpu_seconds(backend_pid) if backend_pid else None
    if server_before is not None and server_after is not None:
        result["server_us"] = (server_after - server_before) / ROUNDS * 1e6
    return result


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
    os.environ["TESTPROJECT_POOL"] = json.dumps({"min_size": 1, "max_size": 1})
    import django

    django.setup()
    from django.db import connection
    from django.db.backends.signals import connection_created

    results: dict[str, dict[str, float]] = {}
    from django_pgpool import get_pool

    connection.ensure_connection()
    pool = get_pool()
    pid = connection.connection.get_backend_pid()
    connection.close()

    results["pool: getconn + putconn"] = per_call(lambda: pool.putconn(pool.getconn()))

    def django_cycle() -> None:
        connection.ensure_connection()
        connection.close()

    results["django: connect + close"] = per_call(django_cycle)
    receivers = connection_created.receivers
    connection_created.receivers = []
    connection_created.sender_receivers_cache.clear()
    try:
        results["django: connect + close, no connection_created receivers"] = per_call(django_cycle)
    finally:
        connection_created.receivers = receivers
        connection_created.sender_receivers_cache.clear()

    def checkout_and_query(dirty: bool) -> Callable[[], None]:
        def run() -> None:
            conn = pool.getconn()
            if dirty:
                conn.pool_entry.dirty = True  # as if it ran a statement
            pool.putconn(conn)

        return run

    clean = per_call(checkout_and_query(False), pid)
    reset = per_call(checkout_and_query(True), pid)
    results["reset: DISCARD ALL sent on return, read on checkout (extra)"] = {
        key: reset[key] - clean.get(key, 0.0) for key in reset
    }
    # For scale: any one statement's round trip, which is what the reset adds.
    conn = pool.getconn()
    with conn.cursor() as cursor:
        results["for scale: one SELECT 1 round trip"] = per_call(
            lambda: cursor.execute("SELECT 1"), pid
        )
    pool.putconn(conn)
    pool.close()

    width = max(len(name) for name in results)
    for name, values in results.items():
        shown = ", ".join(
            f"{key.removesuffix('_us')} {value:6.1f} µs" for key, value in values.items()
        )
        print(f"{name:<{width}}  {shown}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
