"""Keep Django's PostgreSQL backend on psycopg2 when psycopg 3 is installed too.

Django's ``django.db.backends.postgresql`` imports psycopg 3 whenever it is
importable and only falls back to psycopg2 otherwise; the choice is made once
per process, when that package is first imported. django_pgpool is built on
psycopg2, so it imports Django's backend with psycopg 3 hidden for that one
import. psycopg 3 stays importable for everything else.

If something imported Django's backend with psycopg 3 before django_pgpool got
the chance (typically ``django.contrib.postgres`` listed before
``django_pgpool`` in ``INSTALLED_APPS``), the process is refused with an
``ImproperlyConfigured`` that says how to fix it: there is no safe way to
switch drivers once Django's backend has loaded one.
"""

from __future__ import annotations

import importlib
import sys

from django.core.exceptions import ImproperlyConfigured

_DJANGO_DRIVER_MODULE = "django.db.backends.postgresql.psycopg_any"
_DJANGO_BACKEND_MODULE = "django.db.backends.postgresql.base"
_MISSING = object()


def _psycopg3_version() -> str:
    try:
        from importlib.metadata import version

        return version("psycopg")
    except Exception:  # pragma: no cover - metadata missing
        return "3"


def use_psycopg2() -> None:
    """Import Django's PostgreSQL backend bound to psycopg2 (idempotent)."""
    loaded = sys.modules.get(_DJANGO_DRIVER_MODULE)
    if loaded is not None:
        if loaded.is_psycopg3:
            raise ImproperlyConfigured(
                "django_pgpool runs on psycopg2, but Django's PostgreSQL backend was already "
                f"loaded with psycopg {_psycopg3_version()} (psycopg 3 is installed, and "
                "Django prefers it). Put 'django_pgpool' first in INSTALLED_APPS (before "
                "'django.contrib.postgres' and any app that imports Django's PostgreSQL "
                "backend) so that it can load the backend on psycopg2; or uninstall psycopg 3 "
                "(pip uninstall psycopg psycopg-binary psycopg-c); or, to use psycopg 3, switch "
                "ENGINE to 'django.db.backends.postgresql' with Django's built-in pool."
            )
        importlib.import_module(_DJANGO_BACKEND_MODULE)
        return
    hidden = sys.modules.get("psycopg", _MISSING)
    # A None entry makes "import psycopg" raise ImportError, which is exactly
    # what Django's backend treats as "psycopg 3 is not installed".
    sys.modules["psycopg"] = None  # type: ignore[assignment]
    try:
        importlib.import_module(_DJANGO_BACKEND_MODULE)
    finally:
        if hidden is _MISSING:
            del sys.modules["psycopg"]
        else:
            sys.modules["psycopg"] = hidden  # type: ignore[assignment]


def psycopg3_is_installed() -> bool:
    """Whether psycopg 3 could be imported in this process."""
    from importlib.util import find_spec

    try:
        return find_spec("psycopg") is not None
    except (ImportError, ValueError):
        return False
