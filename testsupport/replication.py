"""A primary and a streaming standby on loopback, for the failover and router tests.

The primary is an :class:`~testsupport.pgserver.EmbeddedPostgres`; the standby
is a copy made with ``pg_basebackup -R`` (which writes ``primary_conninfo``
and ``standby.signal``), started on a port of its own. Both live in temporary
directories and are removed when the block ends, whatever happened.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg2

from testsupport.pgserver import EmbeddedPostgres


def base_backup(primary: EmbeddedPostgres, standby: EmbeddedPostgres) -> None:
    """Make ``standby``'s data directory a streaming copy of ``primary`` (``pg_basebackup -R``)."""
    standby._chown(standby.directory)
    env = {**os.environ, "PGPASSWORD": primary.password} if primary.password else dict(os.environ)
    env.pop("PGSERVICE", None)
    result = subprocess.run(
        [
            os.path.join(primary.bindir, "pg_basebackup"),
            "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", standby.datadir, "-R", "-X", "stream", "--no-sync",
        ],
        capture_output=True,
        text=True,
        env=env,
        user=standby.run_as,
        cwd=standby.directory,
        stdin=subprocess.DEVNULL,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"pg_basebackup failed: {result.stdout}{result.stderr}")


def promote(server: EmbeddedPostgres) -> None:
    """Promote a standby to primary and wait until it takes writes."""
    server._run("pg_ctl", "-D", server.datadir, "-w", "promote")


def execute(server: EmbeddedPostgres, sql: str, params: Any = None) -> Any:
    """Run one statement on ``server`` (its ``postgres`` database) in autocommit; the first row."""
    conn = server.settings.connect(application_name="pgpool-test-admin")
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone() if cursor.description else None
    finally:
        conn.close()


def make_read_only(server: EmbeddedPostgres) -> None:
    """Fence a primary: new transactions are read-only (``default_transaction_read_only``).

    The server keeps its sessions; each applies the setting at its next
    statement. Returns once the server has reloaded and signalled them.
    """
    execute(server, "ALTER SYSTEM SET default_transaction_read_only = on")
    execute(server, "SELECT pg_reload_conf()")
    # A new session sees the setting once the server has reloaded; it
    # signalled its sessions in the same step (delivery takes a moment more).
    deadline = time.monotonic() + 10
    while execute(server, "SHOW default_transaction_read_only") != ("on",):
        if time.monotonic() >= deadline:  # pragma: no cover - a broken server
            raise RuntimeError("the server did not reload its configuration")
        time.sleep(0.01)
    time.sleep(0.1)


def wait_until_replayed(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, timeout: float = 10.0
) -> None:
    """Wait until ``standby`` replayed everything ``primary`` wrote so far."""
    target = execute(primary, "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")[0]
    deadline = time.monotonic() + timeout
    while True:
        replayed = execute(standby, "SELECT pg_last_wal_replay_lsn() - '0/0'::pg_lsn")[0]
        if replayed is not None and replayed >= target:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the standby replayed {replayed} of {target} in {timeout:g} s")
        time.sleep(0.02)


@contextmanager
def primary_and_standby(
    password: str | None = None,
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    """A primary and a standby streaming from it, both stopped and removed afterwards."""
    with ExitStack() as stack:
        # Commits flushed at once (as in production), so that what a test
        # wrote reaches the standby without waiting for the WAL writer.
        primary = EmbeddedPostgres(password=password, settings={"synchronous_commit": "on"})
        stack.callback(primary.destroy)
        primary.start()
        standby = EmbeddedPostgres(password=password)
        stack.callback(standby.destroy)
        base_backup(primary, standby)
        standby.start()
        deadline = time.monotonic() + 30
        while execute(standby, "SELECT pg_is_in_recovery()") != (True,):
            if time.monotonic() >= deadline:  # pragma: no cover - a broken set-up
                raise RuntimeError("the standby did not start in recovery")
            time.sleep(0.05)
        yield primary, standby


def is_standby(server: EmbeddedPostgres) -> bool:
    try:
        return bool(execute(server, "SELECT pg_is_in_recovery()")[0])
    except psycopg2.Error:
        return False
