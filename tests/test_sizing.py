"""``python -m testproject.sizing``: the connection arithmetic of a deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .helpers import REPO, query_one


def sizing(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "testproject.sizing", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_table_shows_where_direct_connections_stop_fitting() -> None:
    table = sizing(
        "--machines", "1,4", "--processes", "4", "--max-size", "10",
        "--max-connections", "100", "--reserved", "3", "--pgbouncer-pool-size", "20",
    )  # fmt: skip
    assert "PostgreSQL takes 97 application connections" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows == [
        # 4 processes x max_size 10 = 40 fit; PgBouncer needs at most 20 servers.
        "| 1 | 4 | 10 | 40 | 20 (40) | 20 (40) |",
        # 160 do not fit in 97; 4 PgBouncers of 20 do; one PgBouncer needs
        # max_client_conn raised above its default 100 for its 160 clients.
        "| 4 | 4 | 10 | 160 ! | 80 (40) | 20 (160 !) |",
    ]
    assert "max_size 10: at most 9 processes" in table


def test_every_pooled_alias_on_the_server_counts() -> None:
    args = "--machines 2 --processes 3 --max-size 5 --aliases 2 --pgbouncer-pool-size 4"
    limits = "--max-connections 50 --reserved 5 --json"
    report = json.loads(sizing(*args.split(), *limits.split()))
    assert report["available"] == 45
    assert report["rows"] == [
        {
            "machines": 2,
            "processes": 3,
            "max_size": 5,
            "direct": 60,
            "per_machine": 16,
            "per_machine_clients": 30,
            "central": 8,
            "central_clients": 60,
        }
    ]


def test_the_limits_can_be_read_from_the_server(admin: Any) -> None:
    report = json.loads(sizing("--server", "--machines", "1", "--json"))
    assert report["max_connections"] == int(query_one(admin, "SHOW max_connections"))
    reserved = int(query_one(admin, "SHOW superuser_reserved_connections"))
    if int(query_one(admin, "SHOW server_version_num")) >= 160000:
        reserved += int(query_one(admin, "SHOW reserved_connections"))
    assert report["reserved"] == reserved
    assert report["available"] == report["max_connections"] - reserved
