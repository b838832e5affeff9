"""The demo: the testproject served over HTTP to many client threads for a few
seconds, then what it took: requests served, server connections, pool statistics.

It runs on a database of its own, created for the run and dropped at its end.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testsupport.pgserver import ServerSettings

# A database per run: demos run at once (two checkouts) never share tables.
DEMO_DATABASE = f"pgpool_demo_{os.getpid()}"
APPLICATION_NAME = f"pgpool-demo-{os.getpid()}"


@contextmanager
def own_database(server: ServerSettings, name: str) -> Iterator[None]:
    """Create the database for the ``with`` block and drop it afterwards."""

    def admin(sql: str) -> None:
        conn = server.connect(dbname="postgres")
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    admin(f'CREATE DATABASE "{name}"')
    try:
        yield
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def count_connections(admin: Any, application_name: str) -> int:
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [application_name]
        )
        return int(cursor.fetchone()[0])


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m testproject demo", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=16, help="client threads")
    parser.add_argument("--max-size", type=int, default=4, help="the pool's max_size")
    return parser


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from testsupport.pgserver import ensure_server

    server = ensure_server()
    with own_database(server, DEMO_DATABASE):
        return serve(server, args)


def serve(server: ServerSettings, args: argparse.Namespace) -> int:
    os.environ["TESTPROJECT_DB_NAME"] = DEMO_DATABASE
    os.environ["TESTPROJECT_APPLICATION_NAME"] = APPLICATION_NAME
    os.environ["TESTPROJECT_POOL"] = json.dumps({"max_size": args.max_size, "timeout": 30})

    import django

    django.setup()
    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer
    from django.core.wsgi import get_wsgi_application
    from django.test.testcases import QuietWSGIRequestHandler

    import django_pgpool
    from testproject.library.models import Book

    call_command("migrate", verbosity=0)
    call_command("seed", books=1000, verbosity=0)
    book_ids = list(Book.objects.values_list("pk", flat=True)[:1000])
    from django.db import connections

    connections.close_all()  # give this thread's connection back before measuring
    django_pgpool.close_pools()

    httpd = ThreadedWSGIServer(("127.0.0.1", 0), QuietWSGIRequestHandler, allow_reuse_address=True)
    httpd.daemon_threads = True
    httpd.set_app(get_wsgi_application())
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()

    print(
        f"django_pgpool demo: {args.threads} client threads for {args.seconds:g} s against the "
        f"testproject on http://127.0.0.1:{port} (pool max_size={args.max_size})"
    )
    print(f"PostgreSQL: {server.describe()}, database {DEMO_DATABASE!r}")

    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    served = [0] * args.threads
    failed = [0] * args.threads
    peak = 0
    stop_at = time.monotonic() + args.seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < stop_at:
            pk = rng.choice(book_ids)
            if rng.random() < 0.2:
                conn.request("POST", f"/books/{pk}/buy/")
            else:
                conn.request("GET", f"/books/{pk}/")
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                served[index] += 1
            else:
                failed[index] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.threads)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    interactive = sys.stdout.isatty()
    last_report = 0.0
    while any(thread.is_alive() for thread in threads):
        peak = max(peak, count_connections(admin, APPLICATION_NAME))
        elapsed = time.monotonic() - started
        if interactive or elapsed - last_report >= 1.0:
            last_report = elapsed
            line = f"  {elapsed:4.1f} s  {sum(served):7d} requests  {peak} server connections"
            print(f"\r{line}" if interactive else line, end="" if interactive else "\n", flush=True)
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    if interactive:
        print()
    httpd.shutdown()

    stats = django_pgpool.stats().get("default", {})
    total = sum(served)
    print(f"requests served: {total} ({total / elapsed:.0f}/s), failed: {sum(failed)}")
    print(
        f"server connections used (peak in pg_stat_activity): {peak} "
        f"for {args.threads} client threads (max_size {args.max_size})"
    )
    print("pool statistics:")
    for name, value in stats.items():
        print(f"  {name:24s} {value}")
    django_pgpool.close_pools()
    admin.close()
    ok = sum(failed) == 0 and peak <= args.max_size and total > 0
    if not ok:
        print("demo FAILED: requests failed or the pool exceeded max_size", file=sys.stderr)
    return 0 if ok else 1
