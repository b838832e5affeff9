"""Settings of the testproject.

The database server is the one ``DATABASE_URL`` or the ``PG*`` variables
name (``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD``, ``PGDATABASE``),
else ``127.0.0.1:5432`` as user ``postgres``. Importing the settings connects
to nothing: whoever runs the project first makes sure the server is there
(:func:`testsupport.pgserver.ensure_server`, which may start a throwaway
cluster and export its address as ``PG*`` variables). A few more environment
variables let the benchmark and the tests run the same project with other
connection strategies:

- ``TESTPROJECT_ENGINE``: ``django_pgpool`` (default) or another ENGINE;
- ``TESTPROJECT_POOL``: JSON for ``OPTIONS["pool"]`` (``false`` disables it);
- ``TESTPROJECT_CONN_MAX_AGE``: ``CONN_MAX_AGE`` (``none`` for persistent);
- ``TESTPROJECT_DB_NAME``: database name (default: the server's);
- ``TESTPROJECT_APPLICATION_NAME``: ``application_name`` of the connections;
- ``TESTPROJECT_DRIVER``: ``psycopg3`` leaves ``django_pgpool`` out of
  ``INSTALLED_APPS``, so that Django's own backend may load psycopg 3 (for
  Django's native pool in the benchmark);
- ``TESTPROJECT_DB_HOST`` / ``TESTPROJECT_DB_PORT``: connect there instead of
  the server's address (PgBouncer in front of it);
- ``TESTPROJECT_DISABLE_SERVER_SIDE_CURSORS=1``: ``DISABLE_SERVER_SIDE_CURSORS``
  (PgBouncer in transaction mode);
- ``TESTPROJECT_REPLICA_ROUTER=1``: reads go to the ``replica`` alias, writes
  to ``default`` (:mod:`testproject.routers`);
- ``TESTPROJECT_TARGET_SESSION_ATTRS``: ``OPTIONS["target_session_attrs"]``
  (with a multi-host ``TESTPROJECT_DB_HOST`` / ``TESTPROJECT_DB_PORT``);
- ``TESTPROJECT_CONTROL_FILE``: ``PGPOOL_CONTROL_FILE`` (``manage.py pgpool
  pause|resume|drain`` reach every process);
- ``TESTPROJECT_PROMETHEUS=<seconds>``: the pools' Prometheus metrics on
  ``/metrics`` (:mod:`testproject.metrics`; in multiprocess mode, written every
  that many seconds);
- ``TESTPROJECT_DEBUG_TOOLBAR=1``: ``DEBUG`` on, with django-debug-toolbar and
  django_pgpool's panel (for requests from 127.0.0.1).
"""

import json
import os
from pathlib import Path

from testsupport.pgserver import configured_server

BASE_DIR = Path(__file__).resolve().parent

SERVER = configured_server()

SECRET_KEY = "testproject-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    # First: with psycopg 3 installed too, this keeps Django's PostgreSQL
    # backend on psycopg2 (django.contrib.postgres below would load it first).
    "django_pgpool",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "testproject.library",
]
if os.environ.get("TESTPROJECT_DRIVER") == "psycopg3":
    INSTALLED_APPS.remove("django_pgpool")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "testproject.urls"
WSGI_APPLICATION = "testproject.wsgi.application"
ASGI_APPLICATION = "testproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_engine = os.environ.get("TESTPROJECT_ENGINE", "django_pgpool")
_pool = json.loads(os.environ.get("TESTPROJECT_POOL", '{"max_size": 8, "timeout": 10}'))
_conn_max_age = os.environ.get("TESTPROJECT_CONN_MAX_AGE", "0")
_options = {}
if _engine == "django_pgpool" or _pool is not False:
    _options["pool"] = _pool
if os.environ.get("TESTPROJECT_APPLICATION_NAME"):
    _options["application_name"] = os.environ["TESTPROJECT_APPLICATION_NAME"]
if os.environ.get("TESTPROJECT_TARGET_SESSION_ATTRS"):
    _options["target_session_attrs"] = os.environ["TESTPROJECT_TARGET_SESSION_ATTRS"]

_default = SERVER.django_database(
    engine=_engine,
    CONN_MAX_AGE=None if _conn_max_age.lower() == "none" else int(_conn_max_age),
)
_default["OPTIONS"].update(_options)
if os.environ.get("TESTPROJECT_DB_NAME"):
    _default["NAME"] = os.environ["TESTPROJECT_DB_NAME"]
if os.environ.get("TESTPROJECT_DB_HOST"):
    _default["HOST"] = os.environ["TESTPROJECT_DB_HOST"]
if os.environ.get("TESTPROJECT_DB_PORT"):
    _default["PORT"] = os.environ["TESTPROJECT_DB_PORT"]
if os.environ.get("TESTPROJECT_DISABLE_SERVER_SIDE_CURSORS"):
    _default["DISABLE_SERVER_SIDE_CURSORS"] = True

DATABASES = {
    "default": _default,
    # A second alias to the same database, as a read replica would be: it gets
    # a pool of its own. In tests it mirrors the default test database.
    "replica": {**_default, "OPTIONS": dict(_default["OPTIONS"]), "TEST": {"MIRROR": "default"}},
}

if os.environ.get("TESTPROJECT_REPLICA_ROUTER"):
    DATABASE_ROUTERS = ["testproject.routers.PrimaryReplicaRouter"]

if os.environ.get("TESTPROJECT_CONTROL_FILE"):
    PGPOOL_CONTROL_FILE = os.environ["TESTPROJECT_CONTROL_FILE"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "Europe/Paris"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django_pgpool": {"handlers": ["console"], "level": "WARNING"}},
}

if os.environ.get("TESTPROJECT_DEBUG_TOOLBAR"):
    from debug_toolbar.settings import PANELS_DEFAULTS

    DEBUG = True
    INTERNAL_IPS = ["127.0.0.1"]
    INSTALLED_APPS.append("debug_toolbar")
    MIDDLEWARE.insert(0, "debug_toolbar.middleware.DebugToolbarMiddleware")
    DEBUG_TOOLBAR_PANELS = [*PANELS_DEFAULTS, "django_pgpool.debug_toolbar.PoolPanel"]
    # The toolbar refuses to run under a test runner; this server only runs
    # beside one (the browser test starts it).
    DEBUG_TOOLBAR_CONFIG = {"IS_RUNNING_TESTS": False}
