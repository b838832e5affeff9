"""psycopg 3 installed next to psycopg2.

Django's PostgreSQL backend imports psycopg 3 whenever it can. django_pgpool
keeps it on psycopg2 (it is built on psycopg2's pool) as long as it gets to
load the backend first, and otherwise refuses to start with an error that says
what to do. Each case runs in a fresh interpreter: the choice is per process.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any

import pytest

from .helpers import run_python

SETUP = """
import json, os, sys
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS={apps!r},
    DATABASES={{"default": {{
        "ENGINE": "django_pgpool",
        "NAME": os.environ["PGDATABASE"], "USER": os.environ["PGUSER"],
        "PASSWORD": os.environ.get("PGPASSWORD", ""), "HOST": os.environ["PGHOST"],
        "PORT": os.environ["PGPORT"], "OPTIONS": {{"pool": {{"max_size": 2}}}},
    }}}},
    USE_TZ=True,
)
django.setup()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
import psycopg2
from django.db.backends.postgresql.psycopg_any import is_psycopg3
result = {{
    "driver": type(connection.connection).__mro__[1].__module__,
    "is_psycopg2": isinstance(connection.connection, psycopg2.extensions.connection),
    "django_is_psycopg3": is_psycopg3,
    "pooled": hasattr(connection.connection, "pool_entry"),
}}
try:
    import psycopg
    result["psycopg3_still_importable"] = psycopg.__version__
except ImportError:
    result["psycopg3_still_importable"] = None
print("RESULT", json.dumps(result))
"""


def run_django(apps: list[str], prelude: str = "") -> Any:
    result = run_python(prelude + SETUP.format(apps=apps))
    return result


def parse(result: Any) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_psycopg3_is_installed_in_the_test_environment() -> None:
    # Without it, the tests below would prove nothing.
    assert importlib.util.find_spec("psycopg") is not None, (
        "install the test extras: pip install -e '.[test]'"
    )


@pytest.mark.parametrize(
    "apps",
    [
        ["django.contrib.contenttypes", "django.contrib.auth"],
        ["django_pgpool", "django.contrib.postgres", "django.contrib.contenttypes"],
    ],
    ids=["backend-loaded-by-the-engine", "app-listed-before-contrib-postgres"],
)
@pytest.mark.usefixtures("server")  # its address, exported as PG* variables
def test_with_psycopg3_installed_the_engine_still_runs_on_psycopg2(apps: list[str]) -> None:
    result = parse(run_django(apps))
    assert result["is_psycopg2"] and result["pooled"]
    assert result["django_is_psycopg3"] is False
    assert result["psycopg3_still_importable"]  # hidden only while Django's backend loaded


def test_when_something_loaded_djangos_backend_on_psycopg3_first_startup_is_refused() -> None:
    result = run_django(["django.contrib.postgres", "django_pgpool", "django.contrib.contenttypes"])
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "django_pgpool runs on psycopg2" in result.stderr
    assert "Put 'django_pgpool' first in INSTALLED_APPS" in result.stderr
    assert "pip uninstall psycopg" in result.stderr


@pytest.mark.usefixtures("server")
def test_without_psycopg3_the_engine_runs_on_psycopg2() -> None:
    hide_psycopg3 = "import sys; sys.modules['psycopg'] = None\n"
    result = parse(
        run_django(["django.contrib.postgres", "django.contrib.contenttypes"], hide_psycopg3)
    )
    assert result["is_psycopg2"] and result["pooled"]
    assert result["django_is_psycopg3"] is False
    assert result["psycopg3_still_importable"] is None
