"""System checks (``manage.py check``): each names the alias and the fix."""

from __future__ import annotations

import functools
import socket
import sys
from io import StringIO
from typing import Any

import pytest
from django.core.checks import CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections
from django.test import override_settings

import django_pgpool
from django_pgpool.config import parse_pool_options

from .aliases import temporary_alias
from .helpers import pool_options, query_one


def pgpool_messages(**kwargs: Any) -> list[CheckMessage]:
    return [
        message
        for message in run_checks(**kwargs)
        if message.id and message.id.startswith("django_pgpool.")
    ]


def only(messages: list[CheckMessage], check_id: str) -> CheckMessage:
    found = [message for message in messages if message.id == check_id]
    assert len(found) == 1, messages
    return found[0]


def ids(messages: list[CheckMessage]) -> list[str]:
    return sorted(str(message.id) for message in messages)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_testprojects_settings_pass_every_check() -> None:
    assert pgpool_messages() == []
    out = StringIO()
    call_command("check", stdout=out)
    assert "System check identified no issues" in out.getvalue()


def test_conn_max_age_on_a_pooled_alias_is_an_error_naming_the_alias_and_the_fix() -> None:
    with temporary_alias("persistent", CONN_MAX_AGE=600):
        messages = pgpool_messages()
        with pytest.raises(SystemCheckError, match=r"django_pgpool\.E001"):
            call_command("check", stdout=StringIO(), stderr=StringIO())
    error = only(messages, "django_pgpool.E001")
    assert ids(messages) == ["django_pgpool.E001"]  # not reported again as E002
    assert error.is_serious()
    assert error.msg.startswith("DATABASES['persistent'] sets CONN_MAX_AGE=600 while")
    assert "Set DATABASES['persistent']['CONN_MAX_AGE'] to 0" in str(error.hint)
    assert "OPTIONS['pool'] = False" in str(error.hint)


def test_conn_max_age_is_allowed_on_an_alias_that_does_not_pool() -> None:
    with temporary_alias("persistent", CONN_MAX_AGE=600, OPTIONS={"pool": False}):
        assert pgpool_messages() == []


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"max_size": 0}, "['max_size'] = 0 is invalid: max_size must be >= 1 connections."),
        ({"pool_size": 5}, "django_pgpool calls it 'max_size'"),
        ({"min_size": 5, "max_size": 2}, "max_size=2 below min_size=5"),
        ({"num_workers": 3}, "an option of Django's psycopg 3 pool"),
    ],
)
def test_invalid_pool_options_are_an_error_with_the_error_the_first_query_would_raise(
    pool: dict[str, Any], expected: str
) -> None:
    with temporary_alias("broken", OPTIONS={"pool": pool}) as settings_dict:
        messages = pgpool_messages()
        with pytest.raises(ImproperlyConfigured) as raised:
            parse_pool_options("broken", settings_dict)
    error = only(messages, "django_pgpool.E002")
    assert error.msg == str(raised.value)
    assert "DATABASES['broken']['OPTIONS']['pool']" in error.msg and expected in error.msg
    assert error.is_serious()


@pytest.mark.parametrize(
    ("key", "ours"),
    [("MAX_CONNS", "max_size"), ("REUSE_CONNS", "min_size"), ("pool_size", "max_size")],
)
def test_another_packages_option_left_in_options_is_an_error(key: str, ours: str) -> None:
    with temporary_alias("migrated", OPTIONS={key: 4, "pool": {"max_size": 4}}):
        error = only(pgpool_messages(), "django_pgpool.E004")
    assert error.msg == (
        f"DATABASES['migrated']['OPTIONS'] has {key!r}, an option of another pooling package: "
        f"psycopg2 would refuse it as a connection parameter."
    )
    assert f"DATABASES['migrated']['OPTIONS']['pool'] option {ours}" in str(error.hint)


def test_settings_of_other_pooling_packages_are_reported_as_ignored() -> None:
    with temporary_alias("migrated", POOL_OPTIONS={"POOL_SIZE": 10, "MAX_OVERFLOW": 10}):
        warning = only(pgpool_messages(), "django_pgpool.W008")
    assert warning.msg == (
        "DATABASES['migrated']['POOL_OPTIONS'] (django-db-connection-pool's) is ignored by "
        "django_pgpool."
    )
    assert "max_size = POOL_SIZE + MAX_OVERFLOW" in str(warning.hint)
    with override_settings(DATABASE_POOL_ARGS={"pool_size": 5, "max_overflow": 10}):
        warning = only(pgpool_messages(), "django_pgpool.W008")
    assert warning.msg.startswith("settings.DATABASE_POOL_ARGS (django-postgrespool2's) is ignored")


def test_an_invalid_expected_processes_setting_is_an_error() -> None:
    with override_settings(PGPOOL_EXPECTED_PROCESSES=0):
        error = only(pgpool_messages(), "django_pgpool.E003")
    assert error.msg.startswith("settings.PGPOOL_EXPECTED_PROCESSES = 0 is invalid")


@pytest.mark.parametrize("timeout", [61, 0.2])
def test_a_timeout_outside_half_a_second_to_a_minute_is_a_warning(timeout: float) -> None:
    with pool_options(timeout=timeout):
        warning = only(pgpool_messages(), "django_pgpool.W003")
    assert warning.msg.startswith(
        f"DATABASES['default']['OPTIONS']['pool']['timeout'] = {timeout:g} s: "
    )
    assert not warning.is_serious()
    assert ("few seconds up to 30 s" if timeout > 1 else "Raise timeout to 0.5 s") in str(
        warning.hint
    )


def test_timeouts_within_half_a_second_to_a_minute_pass() -> None:
    for timeout in (0.5, 5, 60):
        with pool_options(timeout=timeout):
            assert pgpool_messages() == []


def test_a_max_lifetime_of_a_few_seconds_is_a_warning() -> None:
    with pool_options(max_lifetime=3):
        warning = only(pgpool_messages(), "django_pgpool.W004")
    assert "['max_lifetime'] = 3 s: connections are replaced every few seconds" in warning.msg
    with pool_options(max_lifetime=10):
        assert pgpool_messages() == []
    with pool_options(max_lifetime=None):
        assert pgpool_messages() == []


def test_a_round_trip_on_every_checkout_of_a_large_pool_is_a_warning() -> None:
    with pool_options(check_after_idle=0, max_size=20):
        warning = only(pgpool_messages(), "django_pgpool.W005")
    assert warning.msg.startswith("DATABASES['default']['OPTIONS']['pool']['check_after_idle'] = 0")
    assert "up to 20 connections costs a round trip" in warning.msg
    with pool_options(check_after_idle=0, max_size=19):
        assert pgpool_messages() == []


def test_conn_health_checks_on_a_large_pool_is_the_same_warning() -> None:
    with temporary_alias("checked", CONN_HEALTH_CHECKS=True, OPTIONS={"pool": {"max_size": 30}}):
        warning = only(pgpool_messages(), "django_pgpool.W005")
    assert warning.msg.startswith("DATABASES['checked']['CONN_HEALTH_CHECKS'] is True")


@pytest.mark.parametrize(
    ("where", "reason"),
    [
        ({"PORT": "6432"}, "PORT 6432 is PgBouncer's"),
        ({"PORT": 6432}, "PORT 6432 is PgBouncer's"),
        ({"HOST": "pgbouncer.internal"}, "HOST 'pgbouncer.internal' names PgBouncer"),
        ({"HOST": "db-bouncer-1"}, "HOST 'db-bouncer-1' names PgBouncer"),
    ],
)
def test_pgbouncer_without_disable_server_side_cursors_gets_advice(
    where: dict[str, Any], reason: str
) -> None:
    with temporary_alias("bouncer", **where):
        warning = only(pgpool_messages(), "django_pgpool.W006")
    assert warning.msg == (
        f"DATABASES['bouncer'] looks like PgBouncer ({reason}) and "
        f"DISABLE_SERVER_SIDE_CURSORS is off."
    )
    assert "set DATABASES['bouncer']['DISABLE_SERVER_SIDE_CURSORS'] = True" in str(warning.hint)
    with temporary_alias("bouncer", DISABLE_SERVER_SIDE_CURSORS=True, **where):
        assert pgpool_messages() == []


def test_the_pgbouncer_advice_can_be_silenced_for_session_mode() -> None:
    with (
        temporary_alias("bouncer", PORT="6432"),
        override_settings(SILENCED_SYSTEM_CHECKS=["django_pgpool.W006"]),
    ):
        out = StringIO()
        call_command("check", stdout=out)
    assert "no issues (1 silenced)" in out.getvalue()


def test_psycopg3_installed_and_django_pgpool_not_first_is_a_warning_with_the_rule() -> None:
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "django_pgpool"]
    with override_settings(INSTALLED_APPS=apps):
        warning = only(pgpool_messages(), "django_pgpool.W001")
    assert warning.msg == (
        "psycopg 3 is installed and 'django_pgpool' is not first in INSTALLED_APPS (it comes "
        "after 'django.contrib.contenttypes', 'django.contrib.auth')."
    )
    assert "picks psycopg 3 whenever it is importable" in str(warning.hint)
    assert "Put 'django_pgpool' first in INSTALLED_APPS" in str(warning.hint)


def test_without_psycopg3_the_order_of_installed_apps_does_not_matter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what "not installed" looks like
    apps = ["django.contrib.contenttypes", "django.contrib.auth", "django_pgpool"]
    with override_settings(INSTALLED_APPS=apps):
        assert pgpool_messages() == []


def test_djangos_backend_bound_to_psycopg3_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # Unreachable with the app installed (loading it refuses that state), so
    # the loaded module's flag is flipped to see the message.
    from django.db.backends.postgresql import psycopg_any

    monkeypatch.setattr(psycopg_any, "is_psycopg3", True)
    warning = only(pgpool_messages(), "django_pgpool.W001")
    assert "was loaded with psycopg 3, but django_pgpool runs on psycopg2" in warning.msg


@pytest.mark.django_db(transaction=True)
def test_check_reports_a_pool_that_cannot_fit_the_server(admin: Any) -> None:
    max_connections = int(query_one(admin, "SHOW max_connections"))
    processes = max_connections  # 16 connections each: far too many
    with override_settings(PGPOOL_EXPECTED_PROCESSES=processes):
        # Without --database, nothing connects and nothing is reported.
        assert pgpool_messages() == []
        warning = only(pgpool_messages(databases=["default"]), "django_pgpool.W002")
        with pytest.raises(SystemCheckError, match=r"django_pgpool\.W002"):
            call_command("check", databases=["default"], fail_level="WARNING", stdout=StringIO())
    assert warning.msg.startswith("The pools do not fit the server of DATABASES['default']: ")
    assert f"{processes} process(es) x 16 connection(s)" in warning.msg
    assert f"(max_connections {max_connections} - superuser_reserved_connections" in warning.msg
    assert "settings.PGPOOL_EXPECTED_PROCESSES" in str(warning.hint)


@pytest.mark.django_db(transaction=True)
def test_check_with_database_passes_when_the_pools_fit_and_uses_the_pool() -> None:
    connection.close()
    pool = django_pgpool.get_pool("default")
    before = pool.stats()["requests_num"]
    assert pgpool_messages(databases=["default", "replica"]) == []
    assert pool.stats()["requests_num"] == before + 1  # one query, through the pool
    assert pool.stats()["pool_in_use"] == 0


@pytest.mark.django_db(transaction=True)
def test_check_with_database_says_when_the_server_cannot_be_reached() -> None:
    with temporary_alias(
        "down",
        PORT=str(free_port()),
        PASSWORD="hunter2-never-shown",
        OPTIONS={"pool": {"timeout": 0.5}},
    ):
        warning = only(pgpool_messages(databases=["down"]), "django_pgpool.W007")
    assert warning.msg.startswith(
        "Could not check whether the pools of DATABASES['down'] fit its server: "
    )
    assert "Connection refused" in warning.msg and "hunter2" not in warning.msg
    assert "'manage.py pgpool check --database down'" in str(warning.hint)


def check_output(**kwargs: Any) -> str:
    """What ``manage.py check`` prints, whether or not it fails."""
    out, err = StringIO(), StringIO()
    try:
        call_command("check", stdout=out, stderr=err, **kwargs)
    except SystemCheckError as exc:
        return f"{out.getvalue()}{err.getvalue()}{exc}"
    return out.getvalue() + err.getvalue()


@pytest.mark.parametrize("pool", [{"max_size": 4}, False])
def test_a_misspelt_connection_option_is_an_error_with_the_right_spelling(pool: Any) -> None:
    with temporary_alias("typo", OPTIONS={"sslmod": "disable", "pool": pool}):
        messages = pgpool_messages()
        output = check_output()
    error = only(messages, "django_pgpool.E005")
    assert ids(messages) == ["django_pgpool.E005"]
    assert error.msg.startswith(
        "DATABASES['typo']['OPTIONS'] has 'sslmod', which is not a connection parameter: "
        "psycopg2.connect() would refuse every connection (invalid connection option). "
        "Did you mean 'sslmode'?"
    )
    assert error.is_serious()
    assert "django_pgpool.E005" in output and "Did you mean 'sslmode'?" in output


def test_options_that_django_and_psycopg2_read_themselves_pass_the_check() -> None:
    options = {
        "isolation_level": 3,
        "assume_role": "shop_reader",
        "server_side_binding": False,
        "cursor_factory": object,
        "connection_factory": object,
        "sslmode": "prefer",
        "connect_timeout": "5",
        "pool": {"max_size": 4},
    }
    with temporary_alias("full", OPTIONS=options):
        assert pgpool_messages() == []


def test_another_packages_option_is_reported_once_as_e004() -> None:
    with temporary_alias("migrated", OPTIONS={"MAX_CONNS": 4, "pool": {"max_size": 4}}):
        assert ids(pgpool_messages()) == ["django_pgpool.E004"]


def test_the_misspelt_option_is_refused_when_the_pool_is_built_not_blamed_on_the_server(
    django_db_blocker: Any,
) -> None:
    with (
        django_db_blocker.unblock(),
        temporary_alias("typo", OPTIONS={"sslmod": "disable", "pool": {"max_size": 2}}),
    ):
        with pytest.raises(ImproperlyConfigured, match="Did you mean 'sslmode'"):
            connections["typo"].ensure_connection()
        with pytest.raises(ImproperlyConfigured, match="has 'sslmod', which is not a connection"):
            django_pgpool.get_pool("typo")
        assert "typo" not in django_pgpool.stats()


SECRET = "hunter2-Pz4?"


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ({"PASSWORD": f"{SECRET}\x00"}, "DATABASES['nul']['PASSWORD'] is invalid: it must not"),
        ({"NAME": "shop\x00"}, "DATABASES['nul']['NAME'] = 'shop\\x00' is invalid: it must not"),
        (
            {"OPTIONS": {"options": "-c search_path=app\x00", "pool": True}},
            "DATABASES['nul']['OPTIONS']['options'] = '-c search_path=app\\x00' is invalid",
        ),
    ],
)
def test_a_nul_byte_in_a_connection_setting_is_an_error_naming_the_setting(
    setting: dict[str, Any], shown: str, django_db_blocker: Any
) -> None:
    with django_db_blocker.unblock(), temporary_alias("nul", **setting):
        messages = pgpool_messages()
        output = check_output()
        with pytest.raises(ImproperlyConfigured) as raised:
            connections["nul"].ensure_connection()
    error = only(messages, "django_pgpool.E006")
    assert error.msg.startswith(shown) and error.msg == str(raised.value)
    assert "NUL byte" in error.msg
    assert SECRET not in output and SECRET not in str(raised.value)


@pytest.mark.parametrize("reset", ["false", " True ", "0", "off"])
def test_a_boolean_looking_reset_string_fails_manage_py_check(reset: str) -> None:
    with pool_options(reset=reset), pytest.raises(SystemCheckError) as raised:
        call_command("check", stdout=StringIO(), stderr=StringIO())
    message = str(raised.value)
    assert "django_pgpool.E002" in message
    assert "must be the Python value True or False" in message
    assert "convert them first" in message


def fresh_credentials(password: str) -> dict[str, str]:
    return {"password": password}


class Revealing:
    def __call__(self, *args: Any) -> Any:
        return None

    def __repr__(self) -> str:
        return SECRET


@pytest.mark.parametrize(
    "broken",
    [
        {"timeout": 0.2},  # a warning next to the callables
        {"max_size": 0},  # an error next to them
        {"connect_params": {"password": SECRET}},  # the password where a callable belongs
        {"reset": "false"},
    ],
)
def test_check_never_shows_a_password_held_by_a_pool_option(broken: dict[str, Any]) -> None:
    pool = {
        "connect_params": functools.partial(fresh_credentials, password=SECRET),
        "configure": lambda conn: SECRET,
        "check": Revealing(),
        **broken,
    }
    with temporary_alias("secretive", PASSWORD=lambda: SECRET, OPTIONS={"pool": pool}):
        output = check_output()
    assert "django_pgpool." in output and SECRET not in output
