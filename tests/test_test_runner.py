"""Django's test runner, unchanged, on ENGINE "django_pgpool" (run in subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from .helpers import REPO, query_one

REAL_DATABASE = "pgpool_runner_real"
MARKER = "real-data-marker"


def django_admin(
    *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "TESTPROJECT_DB_NAME": REAL_DATABASE,
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


@pytest.fixture(scope="module")
def real_database(server: Any) -> Any:
    """A migrated 'production' database holding a row that no test may delete."""
    admin = server.connect(dbname="postgres")
    admin.autocommit = True
    for name in (REAL_DATABASE, f"test_{REAL_DATABASE}"):
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.cursor().execute(f'CREATE DATABASE "{REAL_DATABASE}"')
    migrated = django_admin("migrate", "--noinput")
    assert migrated.returncode == 0, migrated.stderr
    real = server.connect(dbname=REAL_DATABASE)
    real.autocommit = True
    real.cursor().execute("INSERT INTO library_author (name) VALUES (%s)", [MARKER])
    yield real
    real.close()
    admin.cursor().execute(f'DROP DATABASE IF EXISTS "{REAL_DATABASE}"')
    admin.close()


def test_djangos_test_runner_works_repeatedly_and_in_parallel(
    real_database: Any, admin: Any
) -> None:
    for extra in ([], [], ["--parallel", "2"]):
        result = django_admin("test", "testproject.library", "--noinput", "-v", "2", *extra)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "being accessed by other users" not in output
        assert "Ran 7 tests" in output
        assert not query_one(
            admin,
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
            [f"test_{REAL_DATABASE}%"],
        )
    assert (
        query_one(real_database, "SELECT count(*) FROM library_author WHERE name = %s", [MARKER])
        == 1
    )


def test_a_pool_opened_at_start_up_never_serves_the_test_run(real_database: Any) -> None:
    # AppConfig.ready() queries the real database before the runner switches
    # NAME to the test database. With Django's native pool and with
    # django-db-connection-pool, that pool then serves the tests, and the
    # TransactionTestCase flush wipes the real data.
    result = django_admin(
        "test",
        "testproject.library",
        "--noinput",
        "-v",
        "2",
        extra_env={"TESTPROJECT_QUERY_IN_READY": "1"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(
        r"test_a_query_made_at_start_up_saw_the_real_database \(.*\) \.\.\. ok", output
    )
    assert (
        query_one(real_database, "SELECT count(*) FROM library_author WHERE name = %s", [MARKER])
        == 1
    )


def test_djangos_test_runner_works_in_transaction_mode(real_database: Any, admin: Any) -> None:
    pool = {"max_size": 8, "timeout": 10, "release": "transaction"}
    for extra in ([], ["--parallel", "2"]):
        result = django_admin(
            "test",
            "testproject.library",
            "--noinput",
            "-v",
            "2",
            *extra,
            extra_env={"TESTPROJECT_POOL": json.dumps(pool)},
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Ran 7 tests" in output
    assert (
        query_one(real_database, "SELECT count(*) FROM library_author WHERE name = %s", [MARKER])
        == 1
    )
