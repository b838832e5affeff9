"""The testproject's settings name the server from the environment and connect to
nothing; a test that needs no database needs no server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from .helpers import REPO, run_python

SETTINGS = """
import json
import testproject.settings as settings
default = settings.DATABASES["default"]
print(json.dumps({key: default[key] for key in ("HOST", "PORT", "USER", "PASSWORD", "NAME")}))
"""


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_with(**env: str) -> dict[str, str]:
    cleared = {name: "" for name in ("DATABASE_URL", "PGHOST", "PGPORT", "PGUSER", "PGPASSWORD")}
    result = run_python(SETTINGS, env={**cleared, "PGDATABASE": "", **env}, timeout=30)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_the_settings_take_the_server_from_pg_variables_without_connecting() -> None:
    port = str(closed_port())  # nothing listens: importing must not try
    assert settings_with(PGHOST="127.0.0.1", PGPORT=port, PGUSER="shop", PGDATABASE="shop") == {
        "HOST": "127.0.0.1",
        "PORT": port,
        "USER": "shop",
        "PASSWORD": "",
        "NAME": "shop",
    }


def test_the_settings_take_the_server_from_database_url() -> None:
    url = "postgres://shop:s%40cret@db.internal:6543/orders"
    assert settings_with(DATABASE_URL=url) == {
        "HOST": "db.internal",
        "PORT": "6543",
        "USER": "shop",
        "PASSWORD": "s@cret",
        "NAME": "orders",
    }


def test_without_either_the_settings_name_the_usual_local_server() -> None:
    assert settings_with() == {
        "HOST": "127.0.0.1",
        "PORT": "5432",
        "USER": "postgres",
        "PASSWORD": "",
        "NAME": "postgres",
    }


def test_configuration_tests_run_with_no_server_and_start_none() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"},
        "PYTHONPATH": str(REPO),
        # A server that isn't there: were it needed, the launcher would say so
        # and start a throwaway cluster instead.
        "PGHOST": "127.0.0.1",
        "PGPORT": str(closed_port()),
        "PGUSER": "postgres",
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_config.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "[pgserver]" not in result.stderr  # no throwaway cluster was started
