"""System checks for the django_pgpool aliases.

The checks on settings run with every ``manage.py check`` (and before
``runserver``, ``migrate``...), so a mistake shows up at deploy time rather
than at the first query. The check that needs the server (do the pools fit
its ``max_connections``?) is tagged ``database``: Django runs it only for
``manage.py check --database ALIAS`` and for ``migrate``.

======================  ==================================================================
``django_pgpool.E001``  ``CONN_MAX_AGE`` is not 0 on a pooled alias.
``django_pgpool.E002``  ``OPTIONS["pool"]`` is invalid (the error the first query would raise).
``django_pgpool.E003``  ``PGPOOL_EXPECTED_PROCESSES`` is not a whole number >= 1.
``django_pgpool.E004``  ``OPTIONS`` holds another pooling package's option (``MAX_CONNS``...),
                        which psycopg2 would refuse as a connection parameter.
``django_pgpool.E005``  ``OPTIONS`` holds a key that is not a connection parameter
                        (``sslmod``): psycopg2 would refuse every connection.
``django_pgpool.E006``  ``NAME``, ``USER``, ``PASSWORD``, ``HOST``, ``PORT`` or a value of
                        ``OPTIONS`` holds a NUL byte, which libpq can't take.
``django_pgpool.W001``  psycopg 3 is installed and ``django_pgpool`` is not first in
                        ``INSTALLED_APPS`` (or Django's backend is on psycopg 3).
``django_pgpool.W002``  ``max_size`` x ``PGPOOL_EXPECTED_PROCESSES`` does not fit the server
                        (``--database`` only).
``django_pgpool.W003``  ``timeout`` above 60 s or below 0.5 s.
``django_pgpool.W004``  ``max_lifetime`` below 10 s.
``django_pgpool.W005``  a round trip on every checkout (``check_after_idle = 0`` or
                        ``CONN_HEALTH_CHECKS``) with ``max_size`` of 20 or more.
``django_pgpool.W006``  the host looks like PgBouncer and ``DISABLE_SERVER_SIDE_CURSORS``
                        is off.
``django_pgpool.W007``  the server could not be queried for W002 (``--database`` only).
``django_pgpool.W008``  another pooling package's settings (``POOL_OPTIONS``,
                        ``DATABASE_POOL_ARGS``), which django_pgpool ignores.
======================  ==================================================================
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psycopg2
from django.core import checks
from django.core.checks import CheckMessage
from django.core.exceptions import ImproperlyConfigured
from django.db import Error as DjangoDatabaseError

from . import capacity, driver
from .config import (
    PEER_OPTION_NAMES,
    PoolConfig,
    connection_option_errors,
    nul_byte_errors,
    parse_pool_options,
    pool_config,
    pool_is_enabled,
)

#: The tag of the checks that read settings only (``manage.py check --tag django_pgpool``).
TAG = "django_pgpool"

#: Thresholds of the warnings about suspicious values.
LONGEST_SENSIBLE_TIMEOUT = 60.0
SHORTEST_SENSIBLE_TIMEOUT = 0.5
SHORTEST_SENSIBLE_LIFETIME = 10.0
LARGE_POOL = 20
PGBOUNCER_PORT = "6432"

#: How long W002 waits for a connection at most.
SERVER_CHECK_TIMEOUT = 5.0

_APP_NAMES = ("django_pgpool", "django_pgpool.apps.PgPoolConfig")


def _pooling_aliases() -> list[tuple[str, Mapping[str, Any]]]:
    from django.db import connections

    return [
        (alias, settings_dict)
        for alias, settings_dict in connections.settings.items()
        if capacity.is_pgpool_engine(settings_dict)
    ]


def _where(alias: str, option: str) -> str:
    return f"DATABASES[{alias!r}]['OPTIONS']['pool'][{option!r}]"


def check_settings(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """E001 to E006, W003 to W006 and W008: the settings of every django_pgpool alias."""
    from django.conf import settings

    messages: list[CheckMessage] = []
    for alias, settings_dict in _pooling_aliases():
        messages.extend(_check_pgbouncer(alias, settings_dict))
        messages.extend(_check_other_packages_settings(alias, settings_dict))
        messages.extend(_check_connection_settings(alias, settings_dict))
        if pool_is_enabled(settings_dict):
            messages.extend(_check_pool(alias, settings_dict))
    if hasattr(settings, "DATABASE_POOL_ARGS"):
        messages.append(
            checks.Warning(
                "settings.DATABASE_POOL_ARGS (django-postgrespool2's) is ignored by django_pgpool.",
                hint="Set the pool of each alias in DATABASES[alias]['OPTIONS']['pool'] "
                "instead: max_size = pool_size + max_overflow, max_lifetime = recycle, "
                "timeout = timeout; then remove DATABASE_POOL_ARGS.",
                id="django_pgpool.W008",
            )
        )
    try:
        capacity.expected_processes()
    except ImproperlyConfigured as exc:
        messages.append(
            checks.Error(
                str(exc),
                hint=f"Set {capacity.EXPECTED_PROCESSES_SETTING} to an int, or remove it "
                f"(the default is 1).",
                id="django_pgpool.E003",
            )
        )
    return messages


def _check_other_packages_settings(
    alias: str, settings_dict: Mapping[str, Any]
) -> Iterable[CheckMessage]:
    for key in settings_dict.get("OPTIONS") or {}:
        ours = PEER_OPTION_NAMES.get(str(key).lower())
        if ours is not None:
            yield checks.Error(
                f"DATABASES[{alias!r}]['OPTIONS'] has {key!r}, an option of another pooling "
                f"package: psycopg2 would refuse it as a connection parameter.",
                hint=f"Remove it; django_pgpool's equivalent is "
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] option {ours}.",
                id="django_pgpool.E004",
            )
    if "POOL_OPTIONS" in settings_dict:
        yield checks.Warning(
            f"DATABASES[{alias!r}]['POOL_OPTIONS'] (django-db-connection-pool's) is ignored "
            f"by django_pgpool.",
            hint=f"Move its values into DATABASES[{alias!r}]['OPTIONS']['pool']: max_size = "
            f"POOL_SIZE + MAX_OVERFLOW, max_lifetime = RECYCLE, timeout = TIMEOUT; then "
            f"remove POOL_OPTIONS.",
            id="django_pgpool.W008",
        )


def _check_connection_settings(
    alias: str, settings_dict: Mapping[str, Any]
) -> Iterable[CheckMessage]:
    # Pooled or not, these settings go to psycopg2.connect().
    options = settings_dict.get("OPTIONS") or {}
    for key, message in connection_option_errors(alias, options).items():
        if str(key).lower() in PEER_OPTION_NAMES:
            continue  # E004
        yield checks.Error(
            message,
            hint="Until this is fixed, every connection on this alias fails; with the pool, "
            "building it raises this ImproperlyConfigured.",
            id="django_pgpool.E005",
        )
    for message in nul_byte_errors(alias, settings_dict).values():
        yield checks.Error(
            message,
            hint="Remove the NUL byte: a value read from a file or produced by a C program "
            "may end with one.",
            id="django_pgpool.E006",
        )


def _check_pool(alias: str, settings_dict: Mapping[str, Any]) -> Iterable[CheckMessage]:
    conn_max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if conn_max_age != 0:
        yield checks.Error(
            f"DATABASES[{alias!r}] sets CONN_MAX_AGE={conn_max_age!r} while django_pgpool "
            f"pools its connections: the pool, not the thread, owns them.",
            hint=f"Set DATABASES[{alias!r}]['CONN_MAX_AGE'] to 0 (the default) and tune "
            f"OPTIONS['pool']['max_lifetime'] / ['max_idle'] instead, or set "
            f"OPTIONS['pool'] = False to keep persistent connections without a pool.",
            id="django_pgpool.E001",
        )
    try:
        # CONN_MAX_AGE is E001's business, the connection settings E004 to
        # E006's: look at the pool options alone.
        config = pool_config(alias, {**settings_dict, "CONN_MAX_AGE": 0})
    except ImproperlyConfigured as exc:
        yield checks.Error(
            str(exc),
            hint="Until this is fixed, the first query on this alias raises this "
            "ImproperlyConfigured.",
            id="django_pgpool.E002",
        )
        return
    yield from _check_values(alias, config)


def _check_values(alias: str, config: PoolConfig) -> Iterable[CheckMessage]:
    if config.timeout > LONGEST_SENSIBLE_TIMEOUT:
        yield checks.Warning(
            f"{_where(alias, 'timeout')} = {config.timeout:g} s: a request may wait more than "
            f"{LONGEST_SENSIBLE_TIMEOUT:g} s for a connection.",
            hint="By then the client has usually given up and the worker has been killed "
            "(gunicorn's default timeout is 30 s), while the request still holds its place "
            "in the queue. A timeout of a few seconds up to 30 s (the default) fails such "
            "requests early with a PoolTimeout that says the pool is exhausted.",
            id="django_pgpool.W003",
        )
    elif config.timeout < SHORTEST_SENSIBLE_TIMEOUT:
        yield checks.Warning(
            f"{_where(alias, 'timeout')} = {config.timeout:g} s: a short burst of requests, "
            f"or a single slow connect, makes requests fail with PoolTimeout.",
            hint=f"Raise timeout to {SHORTEST_SENSIBLE_TIMEOUT:g} s or more (the default is "
            f"30 s). To shed load when the pool is exhausted, limit the queue with "
            f"max_waiting instead.",
            id="django_pgpool.W003",
        )
    if config.max_lifetime is not None and config.max_lifetime < SHORTEST_SENSIBLE_LIFETIME:
        yield checks.Warning(
            f"{_where(alias, 'max_lifetime')} = {config.max_lifetime:g} s: connections are "
            f"replaced every few seconds.",
            hint="Each replacement costs a new connection (authentication, TLS) and a new "
            "server process, which is what the pool is there to avoid. Use minutes or hours "
            "(the default is 3600 s), or None for no limit.",
            id="django_pgpool.W004",
        )
    round_trip_every_time = config.check_every_checkout or not config.check_after_idle
    if config.max_size >= LARGE_POOL and round_trip_every_time:
        cause = (
            f"DATABASES[{alias!r}]['CONN_HEALTH_CHECKS'] is True"
            if config.check_every_checkout
            else f"{_where(alias, 'check_after_idle')} = 0"
        )
        yield checks.Warning(
            f"{cause}: every checkout from this pool of up to {config.max_size} connections "
            f"costs a round trip (SELECT 1) before the first query.",
            hint="Leave check_after_idle at its default (0.5 s) and CONN_HEALTH_CHECKS off: "
            "a connection used that recently only gets a local socket check, which still "
            "notices a server that closed the session, and older ones get the round trip.",
            id="django_pgpool.W005",
        )


def _check_pgbouncer(alias: str, settings_dict: Mapping[str, Any]) -> Iterable[CheckMessage]:
    if settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):
        return
    host = str(settings_dict.get("HOST") or "")
    port = str(settings_dict.get("PORT") or "")
    if port == PGBOUNCER_PORT:
        looks_like = f"PORT {port} is PgBouncer's"
    elif "bouncer" in host.lower():
        looks_like = f"HOST {host!r} names PgBouncer"
    else:
        return
    yield checks.Warning(
        f"DATABASES[{alias!r}] looks like PgBouncer ({looks_like}) and "
        f"DISABLE_SERVER_SIDE_CURSORS is off.",
        hint=f"With PgBouncer in transaction pooling mode, QuerySet.iterator() fails with "
        f"'cursor ... does not exist': set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] "
        f"= True. If PgBouncer runs in session mode, silence this with "
        f"SILENCED_SYSTEM_CHECKS = ['django_pgpool.W006'].",
        id="django_pgpool.W006",
    )


def check_driver(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """W001: psycopg 3 is installed and django_pgpool may not get to load Django's backend first."""
    from django.conf import settings

    if not driver.psycopg3_is_installed():
        return []
    loaded = sys.modules.get("django.db.backends.postgresql.psycopg_any")
    on_psycopg3 = loaded is not None and bool(getattr(loaded, "is_psycopg3", False))
    installed = list(settings.INSTALLED_APPS)
    first = bool(installed) and installed[0] in _APP_NAMES
    if first and not on_psycopg3:
        return []
    rule = (
        "Django's PostgreSQL backend picks psycopg 3 whenever it is importable, once per "
        "process; django_pgpool keeps it on psycopg2 only if it loads the backend first."
    )
    fix = (
        "Put 'django_pgpool' first in INSTALLED_APPS (before 'django.contrib.postgres' and "
        "any app that imports Django's PostgreSQL backend), or uninstall psycopg 3 "
        "(pip uninstall psycopg psycopg-binary psycopg-c)."
    )
    if on_psycopg3:
        problem = (
            "Django's PostgreSQL backend was loaded with psycopg 3, but django_pgpool runs on "
            "psycopg2: its aliases cannot connect."
        )
    elif installed and any(name in _APP_NAMES for name in installed):
        position = next(i for i, name in enumerate(installed) if name in _APP_NAMES)
        problem = (
            f"psycopg 3 is installed and 'django_pgpool' is not first in INSTALLED_APPS "
            f"(it comes after {', '.join(repr(name) for name in installed[:position])})."
        )
    else:
        problem = "psycopg 3 is installed and 'django_pgpool' is not in INSTALLED_APPS."
    return [checks.Warning(problem, hint=f"{rule} {fix}", id="django_pgpool.W001")]


def check_server(
    app_configs: Sequence[Any] | None = None,
    databases: Sequence[str] | None = None,
    **kwargs: Any,
) -> list[CheckMessage]:
    """W002 / W007: the pools of each ``--database`` alias against its server's limits."""
    from django.db import connections

    import django_pgpool

    if not databases:
        return []
    try:
        processes = capacity.expected_processes()
    except ImproperlyConfigured:
        return []  # E003
    messages: list[CheckMessage] = []
    for alias in databases:
        settings_dict = connections.settings.get(alias)
        if (
            settings_dict is None
            or not capacity.is_pgpool_engine(settings_dict)
            or not pool_is_enabled(settings_dict)
        ):
            continue
        try:
            demand = capacity.demand(alias, processes)
            timeout = min(parse_pool_options(alias, settings_dict).timeout, SERVER_CHECK_TIMEOUT)
            with django_pgpool.connection(alias, timeout=timeout) as conn:
                limits = capacity.read_server_limits(conn)
        except ImproperlyConfigured:
            continue  # E001 / E002
        except (psycopg2.Error, DjangoDatabaseError) as exc:
            lines = str(exc).strip().splitlines()
            messages.append(
                checks.Warning(
                    f"Could not check whether the pools of DATABASES[{alias!r}] fit its "
                    f"server: {lines[0] if lines else type(exc).__name__}",
                    hint=f"Make sure the database can be reached; 'manage.py pgpool check "
                    f"--database {alias}' reports the server's limits.",
                    id="django_pgpool.W007",
                )
            )
            continue
        fit = capacity.Fit(limits, demand)
        if not fit.fits:
            messages.append(
                checks.Warning(
                    f"The pools do not fit the server of DATABASES[{alias!r}]: {fit.summary()}.",
                    hint=f"{fit.advice()} The number of processes is "
                    f"settings.{capacity.EXPECTED_PROCESSES_SETTING}.",
                    id="django_pgpool.W002",
                )
            )
    return messages
