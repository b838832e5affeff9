"""Django aliases on throwaway clusters, and writers that keep them busy."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, connections, transaction

from django_pgpool import registry
from testsupport.pgserver import EmbeddedPostgres

from .helpers import run_in_threads


def multi_host_settings(
    servers: Sequence[EmbeddedPostgres],
    alias: str,
    *,
    target: str | None = "read-write",
    **pool: Any,
) -> dict[str, Any]:
    """A complete DATABASES entry for ``servers`` as one multi-host alias (HOST/PORT lists)."""
    first = servers[0]
    options: dict[str, Any] = {"pool": pool, "application_name": alias}
    if target is not None:
        options["target_session_attrs"] = target
    entry = {
        "ENGINE": "django_pgpool",
        "NAME": "postgres",
        "USER": "postgres",
        "PASSWORD": first.password,
        "HOST": ",".join("127.0.0.1" for _ in servers),
        "PORT": ",".join(str(server.port) for server in servers),
        "OPTIONS": options,
    }
    # Django's defaults filled in, as for any DATABASES entry (it wants a "default").
    return connections.configure_settings({"default": dict(entry), alias: entry})[alias]


@contextmanager
def aliases(**entries: dict[str, Any]) -> Iterator[None]:
    """Add database aliases to Django's connections for a ``with`` block."""
    for alias, entry in entries.items():
        connections.settings[alias] = entry
    try:
        yield
    finally:
        for alias in entries:
            if hasattr(connections._connections, alias):
                connections[alias].close()
                del connections[alias]
            registry.close(alias)
            del connections.settings[alias]


@dataclass(frozen=True)
class Write:
    started: float
    finished: float
    ok: bool
    #: The SQLSTATE of the error, "" for a lost connection, None if it succeeded.
    code: str | None = None
    port: int = 0


@contextmanager
def writers(
    alias: str, threads: int, *, pause: float = 0.0, transactions: bool = False
) -> Iterator[list[Write]]:
    """``threads`` threads writing one row each request on ``alias`` until the block ends.

    A request takes the thread's Django connection, runs one INSERT in
    autocommit (as ``Model.objects.create()`` does) and closes it, as a view
    does. With ``transactions``, every other thread reads, then writes, in
    one transaction (``atomic()``). Yields the list the writes are recorded in.
    """
    results: list[Write] = []
    stop = threading.Event()

    def write_loop(index: int) -> None:
        db = connections[alias]  # this thread's own wrapper, as in a request
        while not stop.is_set():
            started = time.monotonic()
            code: str | None = None
            port = 0
            try:
                if transactions and index % 2:
                    with transaction.atomic(using=alias), db.cursor() as cursor:
                        cursor.execute("SELECT count(*) FROM writes WHERE thread = %s", [index])
                        cursor.execute(
                            "INSERT INTO writes (thread) VALUES (%s) RETURNING inet_server_port()",
                            [index],
                        )
                        port = cursor.fetchone()[0]
                else:
                    with db.cursor() as cursor:
                        cursor.execute(
                            "INSERT INTO writes (thread) VALUES (%s) RETURNING inet_server_port()",
                            [index],
                        )
                        port = cursor.fetchone()[0]
            except DatabaseError as exc:
                code = getattr(exc.__cause__, "pgcode", None) or ""
            finally:
                db.close()
            results.append(Write(started, time.monotonic(), code is None, code, port))
            if code is not None:
                time.sleep(0.01)
            elif pause:
                time.sleep(pause)

    load = threading.Thread(target=run_in_threads, args=(threads, write_loop))
    load.start()
    try:
        yield results
    finally:
        stop.set()
        load.join()


CREATE_WRITES = (
    "CREATE TABLE writes (id bigserial PRIMARY KEY, thread int, at timestamptz DEFAULT "
    "clock_timestamp())"
)
