"""The benchmark's PostgreSQL: the server, the run's own database, and a monitor
that counts each strategy's server connections."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg2

from testsupport import REPO
from testsupport.pgserver import EmbeddedPostgres, ServerSettings, from_environment, is_reachable

from .load import BOOKS

# One database per run, dropped at the end: runs against the same server at
# once (two checkouts, CI beside a developer) must not share tables.
BENCH_DATABASE = f"pgpool_bench_{os.getpid()}"


def choose_server() -> tuple[ServerSettings, EmbeddedPostgres | None]:
    """PostgreSQL from the environment, else a throwaway cluster with password auth over TCP."""
    configured = from_environment()
    if configured is not None and is_reachable(configured):
        return configured, None
    if configured is not None:
        print(f"[bench] {configured.describe()} does not answer; starting a throwaway cluster")
    cluster = EmbeddedPostgres(password="bench-" + os.urandom(6).hex(), max_connections=300)
    cluster.start()
    return cluster.settings, cluster


def authentication_used(server: ServerSettings) -> str:
    """'password (TCP)' if the server checks it, else 'trust (TCP, no password checked)'."""
    try:
        conn = psycopg2.connect(**server.connect_kwargs(password="certainly-not-the-password"))
    except psycopg2.OperationalError as exc:
        if "password" in str(exc).lower():
            return "password (TCP)"
        raise
    conn.close()
    return "trust (TCP, no password checked)"


def server_version(server: ServerSettings) -> str:
    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return str(cursor.fetchone()[0])
    finally:
        conn.close()


@contextlib.contextmanager
def admin_cursor(server: ServerSettings) -> Iterator[Any]:
    """A cursor on the server's maintenance database, in autocommit mode."""
    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            yield cursor
    finally:
        admin.close()


def project_env(server: ServerSettings) -> dict[str, str]:
    """The environment of a process running the testproject on the run's database."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGUSER": server.user,
        "PGDATABASE": server.dbname,
        "TESTPROJECT_DB_NAME": BENCH_DATABASE,
    }
    env.pop("DATABASE_URL", None)
    if server.password:
        env["PGPASSWORD"] = server.password
    return env


def create_database(server: ServerSettings, env: dict[str, str]) -> None:
    """Create the run's database, migrated and seeded with :data:`BOOKS` books."""
    drop_database(server)  # a leftover of an earlier run with the same process id
    with admin_cursor(server) as cursor:
        cursor.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    for command in (
        ["migrate", "--noinput", "-v", "0"],
        ["seed", "--books", str(BOOKS), "-v", "0"],
    ):
        subprocess.run([sys.executable, "-m", "django", *command], env=env, cwd=REPO, check=True)


def drop_database(server: ServerSettings) -> None:
    with admin_cursor(server) as cursor:
        # The app servers are stopped; a monitor connection may linger briefly.
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            [BENCH_DATABASE],
        )
        cursor.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}"')


class Monitor:
    """A connection of its own that counts the server connections of one application_name."""

    def __init__(self, server: ServerSettings) -> None:
        self.conn = server.connect(dbname="postgres", application_name="bench-monitor")
        self.conn.autocommit = True

    def connections(self, application_name: str) -> int:
        with self.conn.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [application_name],
            )
            return int(cursor.fetchone()[0])

    def close(self) -> None:
        self.conn.close()
