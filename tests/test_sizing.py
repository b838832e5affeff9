"""``manage.py pgpool size``: the connections of a deployment, directly and through PgBouncer."""

from __future__ import annotations

import json
import socket
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from .aliases import temporary_alias, unpooled
from .helpers import query_one


def size(*args: str) -> str:
    out = StringIO()
    call_command("pgpool", "size", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def size_json(*args: str) -> Any:
    return json.loads(size(*args, "--json"))


def table_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("| ") and line[2].isdigit()]


def test_the_table_shows_where_direct_connections_stop_fitting() -> None:
    with unpooled("replica"):
        table = size(
            "--machines", "1,4", "--processes", "4", "--max-size", "10",
            "--max-connections", "100", "--reserved", "3", "--pgbouncer-pool-size", "20",
        )  # fmt: skip
    assert "PostgreSQL takes 97 connections from the application" in table
    assert "as given" in table
    assert table_rows(table) == [
        # 4 processes x max_size 10 = 40 fit; PgBouncer needs at most 20 servers.
        "| 1 | 4 | 10 | 40 | 20 (40) | 20 (40) |",
        # 160 do not fit in 97; 4 PgBouncers of 20 do; one PgBouncer needs
        # max_client_conn raised above its default 100 for its 160 clients.
        "| 4 | 4 | 10 | 160 ! | 80 (40) | 20 (160 !) |",
    ]
    assert "with max_size 10: at most 9 processes" in table


def test_every_pooled_alias_on_the_server_counts_with_its_own_max_size() -> None:
    # The testproject's 'replica' alias points at the same server (max_size 8).
    report = size_json(
        "--machines", "2", "--processes", "3", "--max-size", "5",
        "--max-connections", "50", "--reserved", "5", "--pgbouncer-pool-size", "4",
    )  # fmt: skip
    assert report["other_aliases"] == {"replica": 8}
    assert report["available"] == 45
    assert report["rows"] == [
        {
            "machines": 2,
            "processes": 3,
            "max_size": 5,
            "direct": 2 * 3 * (5 + 8),
            # Each PgBouncer has a pool of 4 server connections for each alias.
            "per_machine": 2 * (4 + 4),
            "per_machine_clients": 3 * (5 + 8),
            "central": 4 + 4,
            "central_clients": 78,
        }
    ]


def test_an_alias_on_another_server_does_not_count() -> None:
    with temporary_alias("elsewhere", HOST="10.255.255.1", PORT="6543"):
        report = size_json("--machines", "1", "--processes", "1", "--max-connections", "100")
    assert report["other_aliases"] == {"replica": 8}


def test_the_processes_default_to_the_expected_processes_setting() -> None:
    with override_settings(PGPOOL_EXPECTED_PROCESSES=3):
        report = size_json("--max-connections", "100")
    assert [(row["machines"], row["processes"]) for row in report["rows"]] == [(1, 3)]


@pytest.mark.django_db(transaction=True)
def test_the_limits_are_read_from_the_server_through_the_pool(admin: Any) -> None:
    report = size_json("--machines", "1", "--processes", "2")
    assert report["limits"] == "server"
    assert report["max_connections"] == int(query_one(admin, "SHOW max_connections"))
    reserved = int(query_one(admin, "SHOW superuser_reserved_connections"))
    if int(query_one(admin, "SHOW server_version_num")) >= 160000:
        reserved += int(query_one(admin, "SHOW reserved_connections"))
    assert report["reserved"] == reserved
    assert report["available"] == report["max_connections"] - reserved
    assert report["rows"][0]["direct"] == 2 * (8 + 8)
    assert "read from the server (PostgreSQL " in size("--machines", "1", "--processes", "2")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.django_db(transaction=True)
def test_without_a_reachable_server_it_says_what_it_assumed() -> None:
    with temporary_alias("down", HOST="127.0.0.1", PORT=str(closed_port())):
        output = size("--database", "down", "--machines", "2", "--processes", "4", "--timeout", "1")
        report = size_json("--database", "down", "--processes", "4", "--timeout", "1")
    assert "PostgreSQL takes 97 connections from the application" in output
    assert "ASSUMED, PostgreSQL's defaults" in output
    assert "alias 'down' cannot reach its database" in output
    assert report["limits"] == "assumed" and report["max_connections"] == 100
    assert "Connection refused" in report["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--machines", "0"], "--machines takes whole numbers >= 1, comma-separated"),
        (["--processes", "4,x"], "--processes takes whole numbers >= 1, comma-separated"),
        (["--max-connections", "3"], "leave no connection to the application"),
        (["--pgbouncer-pool-size", "0", "--max-connections", "100"], "--pgbouncer-pool-size"),
    ],
)
def test_invalid_numbers_are_refused_with_the_option_named(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        size(*args)
