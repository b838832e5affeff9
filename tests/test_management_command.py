"""``manage.py pgpool``: the process's pools, and ``pgpool check`` against the real server."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import override_settings

import django_pgpool
from testproject.library.models import Author

from .aliases import temporary_alias
from .helpers import REPO, backends, eventually, query_one

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _orm_connection_given_back() -> None:
    # The test database set-up leaves the ORM holding a connection; give it
    # back so that the statistics count only what each test does.
    connection.close()


def pgpool(*args: str) -> str:
    out = StringIO()
    call_command("pgpool", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def pgpool_json(*args: str) -> Any:
    return json.loads(pgpool(*args, "--json"))


def pgpool_error(*args: str) -> CommandError:
    with pytest.raises(CommandError) as caught:
        pgpool(*args)
    return caught.value


def table_rows(output: str) -> dict[str, list[str]]:
    lines = [line.split() for line in output.splitlines() if line.strip()]
    return {cells[0]: cells for cells in lines[1:] if cells[0] in ("default", "replica")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_setting(admin: Any, name: str) -> int:
    return int(query_one(admin, f"SELECT current_setting('{name}')"))


def test_pgpool_shows_every_pooled_alias_as_not_opened_in_a_process_without_pools(
    fresh_pools: None,
) -> None:
    output = pgpool()
    rows = table_rows(output)
    assert set(rows) == {"default", "replica"}
    for row in rows.values():
        # alias, state (3 words), min, max, then "-" for everything only a live pool knows
        assert row[1:4] == ["not", "opened", "yet"]
        assert row[4:6] == ["1", "8"]
        assert row[6:12] == ["-"] * 6
    assert "use --open to build them" in output


def test_pgpool_shows_the_live_statistics_of_the_pools_this_process_uses(
    fresh_pools: None,
) -> None:
    for _ in range(3):
        Author.objects.count()
        connection.close()
    row = table_rows(pgpool("--database", "default"))["default"]
    # alias, state, min, max, open, in use, idle, waiting, requests, timeouts, database
    assert row[:4] == ["default", "open", "1", "8"]
    assert (row[5], row[7], row[8], row[9]) == ("0", "0", "3", "0")
    settings = connection.settings_dict
    assert row[10] == f"{settings['USER']}@{settings['HOST']}:{settings['PORT']}/{settings['NAME']}"


def test_pgpool_open_builds_each_pool_with_its_min_size_connections(
    fresh_pools: None, admin: Any
) -> None:
    database = connection.settings_dict["NAME"]
    assert backends(admin, database=database) == 0
    report = pgpool_json("--open")
    assert report["process"] == os.getpid()
    for alias in ("default", "replica"):
        entry = report["aliases"][alias]
        assert entry["state"] == "open"
        assert entry["stats"]["pool_size"] == entry["config"]["min_size"] == 1
        assert entry["stats"]["pool_available"] == 1
    assert backends(admin, database=database) == 2


def test_pgpool_json_carries_the_pools_own_statistics(fresh_pools: None) -> None:
    Author.objects.count()
    connection.close()
    entry = pgpool_json("--database", "default")["aliases"]["default"]
    assert entry["stats"] == django_pgpool.stats()["default"]
    assert entry["config"]["max_size"] == 8 and entry["config"]["timeout"] == 10.0
    assert "PASSWORD" not in json.dumps(entry) and "password" not in json.dumps(entry)


def test_pgpool_refuses_an_alias_that_does_not_use_django_pgpool() -> None:
    with temporary_alias("plain", ENGINE="django.db.backends.sqlite3", NAME=":memory:"):
        error = pgpool_error("--database", "plain")
        assert "ENGINE is 'django.db.backends.sqlite3'" in str(error)
        error = pgpool_error("check", "--database", "plain")
        assert "set ENGINE to 'django_pgpool'" in str(error)
    assert "no database alias 'nope'" in str(pgpool_error("--database", "nope"))


def test_pgpool_check_reports_the_servers_limits_and_that_the_pools_fit(admin: Any) -> None:
    report = pgpool_json("check")
    max_connections = server_setting(admin, "max_connections")
    superuser_reserved = server_setting(admin, "superuser_reserved_connections")
    server = report["server"]
    assert report["reachable"] and report["alias"] == "default"
    assert server["max_connections"] == max_connections
    assert server["superuser_reserved_connections"] == superuser_reserved
    assert server["available"] == max_connections - superuser_reserved - (
        server["reserved_connections"] or 0
    )
    assert server["connections_in_use"] >= 2  # the admin connection and the pool's
    # Both pooled aliases point at this server: each process may open 8 + 8.
    assert report["max_size"] == {"default": 8, "replica": 8}
    assert report["processes"] == 1 and report["needed"] == 16
    assert report["fits"] is True
    assert report["largest_max_size"] == server["available"] - 8


def test_pgpool_check_on_postgresql_16_and_later_reports_reserved_connections(
    admin: Any,
) -> None:
    version = int(query_one(admin, "SELECT current_setting('server_version_num')"))
    reserved = pgpool_json("check")["server"]["reserved_connections"]
    if version >= 160000:
        assert reserved == server_setting(admin, "reserved_connections")
    else:
        assert reserved is None


def test_pgpool_check_prints_a_readable_report() -> None:
    output = pgpool("check", "--database", "replica")
    assert output.startswith("alias 'replica': ")
    assert "query through the pool           ok" in output
    assert "max_size 8 for 'replica' + 8 for 'default'" in output
    assert "needed at most                   1 x 16 = 16" in output
    assert "fits                             yes" in output


def test_pgpool_check_reports_a_pool_that_cannot_fit_the_server(admin: Any) -> None:
    max_connections = server_setting(admin, "max_connections")
    processes = max_connections // 8  # (8 + 8) connections per process: twice too many
    with override_settings(PGPOOL_EXPECTED_PROCESSES=processes):
        error = pgpool_error("check")
    message = str(error)
    assert error.returncode == 1
    assert message.startswith("The pools do not fit the server of alias 'default': ")
    assert f"{processes} process(es) x 16 connection(s)" in message
    assert f"max_connections {max_connections} - superuser_reserved_connections" in message
    assert "Lower DATABASES['default']['OPTIONS']['pool']['max_size'] to" not in message
    assert "Even max_size=1 for 'default' does not fit: lower max_size of 'replica'" in message


def test_pgpool_check_suggests_the_largest_max_size_that_fits(admin: Any) -> None:
    available = server_setting(admin, "max_connections") - server_setting(
        admin, "superuser_reserved_connections"
    )
    # With (8 + 8) x processes about 4/3 of what the server takes, 'default'
    # fits with a smaller max_size.
    processes = available // 12
    largest = available // processes - 8
    error = pgpool_error("check", "--processes", str(processes))
    assert f"Lower DATABASES['default']['OPTIONS']['pool']['max_size'] to {largest} or less" in (
        str(error)
    )
    assert (largest + 8) * processes <= available < (largest + 9) * processes


def test_the_processes_option_overrides_the_setting() -> None:
    with override_settings(PGPOOL_EXPECTED_PROCESSES=1000):
        assert pgpool_json("check", "--processes", "2")["needed"] == 32
        assert "1000 process(es)" in str(pgpool_error("check"))


def test_pgpool_check_counts_every_pooled_alias_on_the_same_server_only() -> None:
    other_server = {"HOST": "10.255.255.1", "PORT": "6543"}
    with (
        temporary_alias("analytics", OPTIONS={"pool": {"max_size": 30}}),
        temporary_alias("elsewhere", OPTIONS={"pool": {"max_size": 50}}, **other_server),
        temporary_alias("unpooled", OPTIONS={"pool": False}),
    ):
        report = pgpool_json("check", "--processes", "2")
    assert report["max_size"] == {"default": 8, "replica": 8, "analytics": 30}
    assert report["needed"] == 2 * 46


def test_pgpool_check_refuses_an_invalid_expected_processes_setting() -> None:
    with override_settings(PGPOOL_EXPECTED_PROCESSES="4"):
        message = str(pgpool_error("check"))
    assert message.startswith("settings.PGPOOL_EXPECTED_PROCESSES = '4' is invalid")
    assert "--processes must be a whole number >= 1" in str(pgpool_error("check", "--processes=0"))


def test_pgpool_check_says_when_the_database_cannot_be_reached_without_showing_the_password() -> (
    None
):
    with temporary_alias("down", PORT=str(free_port()), PASSWORD="hunter2-never-printed"):
        started = time.monotonic()
        error = pgpool_error("check", "--database", "down", "--timeout", "30")
    # A pool that never reached its server has nothing to wait out.
    assert time.monotonic() - started < 3
    message = str(error)
    assert error.returncode == 2
    assert message.startswith("Alias 'down' cannot reach its database ")
    assert "pool 'down' could not open a connection" in message
    assert "Connection refused. Check that the server runs" in message
    assert "HOST, PORT, NAME, USER and PASSWORD in DATABASES['down']" in message
    assert "hunter2" not in message


def test_pgpool_check_of_a_database_that_does_not_exist_fails_at_once() -> None:
    with temporary_alias("missing", NAME="pgpool_no_such_database"):
        started = time.monotonic()
        error = pgpool_error("check", "--database", "missing", "--timeout", "30")
    assert time.monotonic() - started < 10  # waiting can't create the database
    assert error.returncode == 2
    assert 'database "pgpool_no_such_database" does not exist' in str(error)


def run_manage(*args: str, database: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "TESTPROJECT_DB_NAME": database or connection.settings_dict["NAME"],
    }
    return subprocess.run(
        [sys.executable, "-m", "django", "pgpool", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_pgpool_check_exit_status_tells_a_deploy_script_whether_the_pools_fit() -> None:
    fits = run_manage("check", "--processes", "1")
    assert fits.returncode == 0, fits.stderr
    assert "fits                             yes" in fits.stdout
    too_many = run_manage("check", "--processes", "100000")
    assert too_many.returncode == 1
    assert "CommandError: The pools do not fit the server of alias 'default'" in too_many.stderr
    unreachable = run_manage("check", database="pgpool_no_such_database")
    assert unreachable.returncode == 2
    assert "Alias 'default' cannot reach its database" in unreachable.stderr


def test_pgpool_open_fails_at_once_when_the_server_refuses_and_the_table_says_so(
    fresh_pools: None,
) -> None:
    out = StringIO()
    with temporary_alias("missing", NAME="pgpool_no_such_database"):
        started = time.monotonic()
        with pytest.raises(CommandError) as raised:
            call_command("pgpool", "--open", "--database", "missing", stdout=out, stderr=StringIO())
        elapsed = time.monotonic() - started
    assert elapsed < 3  # not the 10 s of --timeout: waiting can't create the database
    assert 'database "pgpool_no_such_database" does not exist' in str(raised.value)
    assert "pool 'missing' could not open a connection" in str(raised.value)
    row = next(line for line in out.getvalue().splitlines() if line.startswith("missing "))
    assert "cannot connect" in row and " open " not in row


def test_pgpool_json_shows_a_pool_that_cannot_connect_with_its_statistics(
    fresh_pools: None,
) -> None:
    out = StringIO()
    with (
        temporary_alias("missing", NAME="pgpool_no_such_database"),
        pytest.raises(CommandError),
    ):
        call_command("pgpool", "--open", "--database", "missing", "--json", stdout=out)
    entry = json.loads(out.getvalue())["aliases"]["missing"]
    assert entry["state"] == "cannot connect"
    assert entry["stats"]["pool_size"] == 0
    assert entry["stats"]["connections_errors"] >= 1


def test_pgpool_json_always_carries_a_stats_key(fresh_pools: None) -> None:
    with temporary_alias("unpooled", OPTIONS={"pool": False}):
        report = pgpool_json()
    entries = report["aliases"]
    assert all("stats" in entry for entry in entries.values())
    assert entries["default"]["state"] == "not opened yet" and entries["default"]["stats"] is None
    assert entries["unpooled"]["state"] == "not pooled" and entries["unpooled"]["stats"] is None
    Author.objects.count()
    connection.close()
    assert pgpool_json("--database", "default")["aliases"]["default"]["stats"]["requests_num"] == 1


def run_django(*args: str, **settings: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m django <args>`` on the testproject; (the result, the seconds it took)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "TESTPROJECT_DB_NAME": connection.settings_dict["NAME"],
        **settings,
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "django", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    return result, time.monotonic() - started


@pytest.mark.parametrize(
    "command", [["migrate", "--noinput"], ["showmigrations"]], ids=["migrate", "showmigrations"]
)
def test_management_commands_fail_at_once_when_the_database_is_down(command: list[str]) -> None:
    # The testproject's pool waits up to 10 s; a command that never reached
    # its server has nothing to wait for, as with Django's own backend.
    result, elapsed = run_django(*command, TESTPROJECT_DB_PORT=str(free_port()))
    assert result.returncode != 0
    assert elapsed < 8
    assert "pool 'default' could not open a connection" in result.stderr
    assert "Connection refused" in result.stderr
    assert "cannot open connections" not in result.stderr  # said once, by the error


def test_check_database_prints_a_connection_error_once() -> None:
    result, _ = run_django("check", "--database", "default", TESTPROJECT_DB_NAME="pgpool_missing")
    output = result.stdout + result.stderr
    assert "django_pgpool.W007" in output
    assert output.count('database "pgpool_missing" does not exist') == 1, output
    assert "cannot open connections" not in output
    pgpool_check, _ = run_django("pgpool", "check", TESTPROJECT_DB_NAME="pgpool_missing")
    assert pgpool_check.returncode == 2
    assert pgpool_check.stderr.count('database "pgpool_missing" does not exist') == 1
    assert pgpool_check.stderr.startswith("CommandError: Alias 'default' cannot reach")


SECRET = "hunter2-Wm9#"


def fresh_credentials(password: str) -> dict[str, str]:
    return {"password": password}


class Revealing:
    """A callable whose repr is the password it holds."""

    def __call__(self, conn: Any) -> None:
        return None

    def __repr__(self) -> str:
        return SECRET


def test_pgpool_shows_callables_by_name_never_the_password_they_hold(fresh_pools: None) -> None:
    pool = {
        "connect_params": functools.partial(fresh_credentials, password=SECRET),
        "configure": lambda conn: SECRET,
        "check": Revealing(),
        "reset": Revealing(),
    }
    with temporary_alias("secretive", PASSWORD=lambda: SECRET, OPTIONS={"pool": pool}):
        as_json = pgpool("--database", "secretive", "--json")
        table = pgpool("--database", "secretive")
        config = django_pgpool.get_pool("secretive").config
        check = StringIO()
        call_command("check", stdout=check, stderr=check)
    assert SECRET not in as_json + table + check.getvalue() + repr(config)
    shown = json.loads(as_json)["aliases"]["secretive"]["config"]
    assert shown["connect_params"] == (
        "functools.partial(tests.test_management_command.fresh_credentials)"
    )
    assert shown["check"] == shown["reset"] == "<tests.test_management_command.Revealing object>"
    assert shown["configure"].endswith("<lambda>")


def test_pgpool_shows_a_misconfigured_alias_without_the_password_its_options_hold() -> None:
    pool = {"connect_params": {"password": SECRET}}
    out = StringIO()
    with (
        temporary_alias("secretive", OPTIONS={"pool": pool}),
        pytest.raises(CommandError) as raised,
    ):
        call_command("pgpool", "--json", stdout=out, stderr=StringIO())
    assert json.loads(out.getvalue())["aliases"]["secretive"]["state"] == "misconfigured"
    assert "['connect_params'] = <dict> is invalid" in str(raised.value)
    assert SECRET not in out.getvalue() + str(raised.value)


def test_pgpool_check_names_a_misspelt_connection_option_instead_of_blaming_the_server() -> None:
    with temporary_alias("typo", OPTIONS={"sslmod": "disable", "pool": {"max_size": 2}}):
        error = pgpool_error("check", "--database", "typo")
    message = str(error)
    assert error.returncode == 1
    assert "DATABASES['typo']['OPTIONS'] has 'sslmod'" in message
    assert "Did you mean 'sslmode'?" in message
    assert "HOST, PORT, NAME, USER and PASSWORD" not in message


def watch_blocks(output: str) -> list[list[str]]:
    """The refreshes of ``pgpool --watch``, each as its lines."""
    blocks: list[list[str]] = []
    for line in output.splitlines():
        if line.startswith("django_pgpool  process "):
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def test_pgpool_watch_refreshes_the_pools_rates_and_acquire_percentiles(
    fresh_pools: None,
) -> None:
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            Author.objects.count()
            connection.close()

    worker = threading.Thread(target=load)
    worker.start()
    try:
        assert eventually(lambda: "default" in django_pgpool.stats())
        output = pgpool("--watch", "--count", "3", "--interval", "0.3", "--server")
    finally:
        stop.set()
        worker.join()
    blocks = watch_blocks(output)
    assert len(blocks) == 3, output
    for block in blocks:
        assert block[0].endswith("every 0.3 s")
        assert block[1].split("  ")[0] == "alias" and "acquire p99" in block[1]
        rows = {line.split()[0]: line.split() for line in block[2:4]}
        # alias, in use, idle, waiting, requests/s, resets/s, p50 ms, p99 ms
        default = rows["default"]
        assert float(default[4]) > 10 and float(default[5]) > 10, block
        p50, p99 = float(default[6]), float(default[8])
        assert default[7] == default[9] == "ms" and 0 < p50 <= p99 < 1000, block
        assert rows["replica"][1:] == ["-"] * 7  # not built in this process
        server = block[block.index(next(line for line in block if line.startswith("server: ")))]
        assert server.endswith(f"/{connection.settings_dict['NAME']} (pg_stat_activity)")
        assert any(line.split()[-1].isdigit() for line in block[block.index(server) + 2 :])
        assert "django_pgpool watch" not in "\n".join(block)  # the watcher's own connection


def test_pgpool_watch_refuses_what_it_cannot_do() -> None:
    assert "--interval must be" in str(pgpool_error("--watch", "--interval", "0"))
    assert "--count must be" in str(pgpool_error("--watch", "--count", "0"))
    assert "--watch prints a table" in str(pgpool_error("--watch", "--json"))
