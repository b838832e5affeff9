"""django_pgpool in front of PgBouncer, in transaction and session pooling modes.

Each process keeps its pool of client connections to PgBouncer, which shares
a few server connections among all of them. The database is created, migrated
and seeded directly on PostgreSQL; PgBouncer is started for it on a free port,
and ``python -m testsupport.orm_checks`` runs the ORM through PgBouncer in a
subprocess while this test counts the server connections PostgreSQL sees
(``pg_stat_activity``) and the client connections PgBouncer sees
(``SHOW POOLS``).

Pool settings by mode:

- transaction pooling: ``DISABLE_SERVER_SIDE_CURSORS = True`` and
  ``reset: False``. A session reset cannot reach the server session the next
  statement runs on, so it would only cost a server transaction per request;
  the rollback of an unfinished transaction is still done. (With ``reset:
  True`` everything still works: see the test below.)
- session pooling: the defaults. A client connection keeps its server session
  until it disconnects, and PgBouncer's own reset (``server_reset_query``)
  only runs then; the pool's reset is what cleans the session between requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_pgpool import PoolTimeout
from django_pgpool.config import PoolConfig
from django_pgpool.pool import ConnectionPool
from testsupport.orm_checks import CHECKS
from testsupport.pgbouncer import PgBouncer, executable, pgbouncer
from testsupport.pgserver import ServerSettings, ensure_server
from testsupport.servers import ConnectionSampler, Library, library_database, project_env

from .helpers import REPO, PeakSampler

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(executable() is None, reason="pgbouncer is not installed"),
]

#: PgBouncer's server connections for the database (default_pool_size).
SERVER_CONNECTIONS = 3

ALL_PASSED = dict.fromkeys(CHECKS, "ok")


@pytest.fixture(scope="module")
def library() -> Iterator[Library]:
    with library_database(ensure_server(), "pgpool_bouncer") as library:
        yield library


@pytest.fixture
def server() -> ServerSettings:
    return ensure_server()


def orm_checks(
    bouncer: PgBouncer,
    library: Library,
    *,
    pool: dict[str, Any],
    server_side_cursors: bool,
    threads: int = 16,
    seconds: float = 2.0,
    only: str = "",
) -> dict[str, Any]:
    """Run ``python -m testsupport.orm_checks`` through PgBouncer; its report."""
    settings = {**bouncer.django_settings(), "TESTPROJECT_POOL": json.dumps(pool)}
    if not server_side_cursors:
        settings["TESTPROJECT_DISABLE_SERVER_SIDE_CURSORS"] = "1"
    args = ["--threads", str(threads), "--seconds", str(seconds)]
    if only:
        args += ["--only", only]
    result = subprocess.run(
        [sys.executable, "-m", "testsupport.orm_checks", *args],
        env=project_env(library.name, **settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(lines[-1])
    report["stderr"] = result.stderr
    return report


def client_connections(bouncer: PgBouncer) -> PeakSampler:
    """Samples how many client connections PgBouncer holds for the database."""
    admin = bouncer.admin()

    def sample() -> int:
        row = bouncer.pool_row(admin)
        return row.get("cl_active", 0) + row.get("cl_waiting", 0)

    return PeakSampler(sample, on_exit=admin.close)


@pytest.mark.timeout(120)
def test_transaction_pooling_serves_the_orm_from_a_few_server_connections(
    library: Library, server: ServerSettings
) -> None:
    with (
        pgbouncer(
            server,
            library.name,
            pool_mode="transaction",
            default_pool_size=SERVER_CONNECTIONS,
            # PgBouncer accepts the time zone the pool sends as a startup
            # option and ignores it; the pool notices and sets it with SQL.
            settings={"ignore_startup_parameters": "extra_float_digits,options"},
        ) as bouncer,
        ConnectionSampler(server, database=library.name) as servers,
        client_connections(bouncer) as clients,
    ):
        report = orm_checks(
            bouncer,
            library,
            pool={"max_size": 10, "timeout": 30, "reset": False},
            server_side_cursors=False,
            threads=20,
        )
        log = bouncer.log()

    assert report["checks"] == ALL_PASSED, (report, log)
    assert report["load"]["error_count"] == 0 and report["load"]["served"] > 100, report
    # What transaction pooling does to session state: PgBouncer resets no
    # server between clients, so a SET outlives the request that ran it, on
    # that server, for whichever client runs there next.
    assert report["observed"]["same_server_session"] is True
    assert report["observed"]["statement_timeout_next_request"] == "7s"
    # Ten client connections from one process, three server connections.
    assert report["pool"]["connections_num"] == 10
    assert clients.peak >= 10
    assert servers.peaks[library.name] == SERVER_CONNECTIONS


@pytest.mark.timeout(120)
def test_transaction_pooling_with_the_pools_session_reset_still_works(
    library: Library, server: ServerSettings
) -> None:
    with (
        pgbouncer(
            server, library.name, pool_mode="transaction", default_pool_size=SERVER_CONNECTIONS
        ) as bouncer,
        ConnectionSampler(server, database=library.name) as servers,
    ):
        report = orm_checks(
            bouncer,
            library,
            pool={"max_size": 6, "timeout": 30, "reset": True},
            server_side_cursors=False,
            threads=12,
            seconds=1.0,
        )
    assert report["checks"] == ALL_PASSED, report
    assert report["load"]["error_count"] == 0, report
    assert report["pool"]["resets_num"] > 100  # every request's connection was reset
    assert servers.peaks[library.name] <= SERVER_CONNECTIONS


@pytest.mark.timeout(120)
def test_session_pooling_keeps_each_pooled_connection_on_one_server_session(
    library: Library, server: ServerSettings
) -> None:
    with (
        pgbouncer(
            server, library.name, pool_mode="session", default_pool_size=SERVER_CONNECTIONS
        ) as bouncer,
        ConnectionSampler(server, database=library.name) as servers,
        client_connections(bouncer) as clients,
    ):
        # A pooled connection holds its server session until it closes: the
        # pool's max_size must fit in PgBouncer's pool.
        report = orm_checks(
            bouncer,
            library,
            pool={"max_size": SERVER_CONNECTIONS, "timeout": 30},
            server_side_cursors=True,
            threads=16,
        )
    assert report["checks"] == ALL_PASSED, report
    assert report["load"]["error_count"] == 0 and report["load"]["served"] > 100, report
    # The pool's reset cleaned what the previous request left on the session.
    assert report["observed"]["same_server_session"] is True
    assert report["observed"]["statement_timeout_next_request"] == "0"
    assert report["observed"]["server_side_cursors"] is True
    assert clients.peak == servers.peaks[library.name] == SERVER_CONNECTIONS


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("pool_mode", "server_side_cursors", "works"),
    [("transaction", True, False), ("transaction", False, True), ("session", True, True)],
    ids=["transaction-server-side-cursors", "transaction-disabled", "session"],
)
def test_iterator_needs_server_side_cursors_disabled_in_transaction_pooling(
    library: Library, server: ServerSettings, pool_mode: str, server_side_cursors: bool, works: bool
) -> None:
    check = "iterator_while_another_client_holds_a_server"
    with pgbouncer(
        server, library.name, pool_mode=pool_mode, default_pool_size=SERVER_CONNECTIONS
    ) as bouncer:
        report = orm_checks(
            bouncer,
            library,
            pool={"max_size": 2, "timeout": 10, "reset": pool_mode == "session"},
            server_side_cursors=server_side_cursors,
            threads=0,
            only=check,
        )
    assert report["observed"]["server_side_cursors"] is server_side_cursors
    if works:
        assert report["checks"] == {check: "ok"}, report
    else:
        # The error users meet: the cursor was declared on another server.
        assert report["checks"][check].startswith("InvalidCursorName: cursor"), report
        assert "does not exist" in report["checks"][check]


def run_a_query(conn: Any) -> None:
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")


@pytest.mark.timeout(60)
def test_a_request_waits_no_longer_than_timeout_when_pgbouncer_has_no_server_left(
    library: Library, server: ServerSettings
) -> None:
    """Session pooling with more pooled connections than PgBouncer has servers.

    A new connection logs in to PgBouncer at once, but its first statement
    (here ``configure``; with Django, the session settings the pool applies)
    waits for a free server, up to PgBouncer's ``query_wait_timeout``.
    """
    with pgbouncer(
        server,
        library.name,
        pool_mode="session",
        default_pool_size=1,
        settings={"query_wait_timeout": "4"},
    ) as bouncer:
        pool = ConnectionPool(
            PoolConfig(name="beyond-pgbouncer", min_size=0, max_size=2, timeout=1.0,
                       configure=run_a_query),
            {"host": "127.0.0.1", "port": bouncer.port, "dbname": library.name,
             "user": server.user},
        )  # fmt: skip
        try:
            held = pool.getconn()  # PgBouncer's one server, for this session
            started = time.monotonic()
            with pytest.raises(PoolTimeout, match="new connection\\(s\\) were still being opened"):
                pool.getconn()  # its connection is opened in the background, not on its time
            waited = time.monotonic() - started
            pool.putconn(held)
        finally:
            pool.close()
    assert waited < 1.5, f"waited {waited:.1f} s with timeout=1 s"
