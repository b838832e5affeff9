"""OPTIONS["pool"]: defaults, and an error naming alias, option, value and fix for bad input."""

from __future__ import annotations

import functools
import sys
import threading
import time
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_pgpool import validation
from django_pgpool.config import (
    OPTIONS,
    PoolConfig,
    check_connection_settings,
    parse_pool_options,
    pool_is_enabled,
)


def settings(pool: Any = True, **extra: Any) -> dict[str, Any]:
    options = {} if pool is ... else {"pool": pool}
    return {"OPTIONS": options, "CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False, **extra}


def error(pool: Any, alias: str = "default", **extra: Any) -> str:
    with pytest.raises(ImproperlyConfigured) as caught:
        parse_pool_options(alias, settings(pool, **extra))
    return str(caught.value)


@pytest.mark.parametrize("pool", [..., True, None, {}])
def test_no_options_means_the_documented_defaults(pool: Any) -> None:
    config = parse_pool_options("default", settings(pool))
    assert config == PoolConfig(name="default")
    assert (config.min_size, config.max_size, config.timeout) == (1, 10, 30.0)
    assert (config.max_lifetime, config.max_idle, config.check_after_idle) == (3600.0, 600.0, 0.5)
    assert config.reset is True and config.leak_threshold == 0.0 and config.max_waiting == 0


def test_every_option_is_declared_with_the_default_the_config_uses() -> None:
    defaults = PoolConfig()
    for option in OPTIONS:
        expected = option.default if option.name != "name" else ""
        assert getattr(defaults, option.name) == expected, option.name


def test_options_are_read_with_their_values() -> None:
    config = parse_pool_options(
        "replica",
        settings(
            {
                "min_size": 2,
                "max_size": 20,
                "timeout": 5,
                "max_waiting": 50,
                "max_lifetime": None,
                "max_idle": 60.5,
                "check_after_idle": 0,
                "reset": "DISCARD TEMP",
                "leak_threshold": 30,
                "name": "reads",
            }
        ),
    )
    assert config.max_size == 20 and config.timeout == 5.0 and isinstance(config.timeout, float)
    assert config.max_lifetime is None and config.reset == "DISCARD TEMP" and config.name == "reads"


def test_the_pool_can_be_switched_off() -> None:
    assert pool_is_enabled(settings(...))
    assert pool_is_enabled(settings(True))
    assert not pool_is_enabled(settings(False))


def test_an_unknown_option_is_named_with_the_closest_valid_one() -> None:
    message = error({"max_sise": 5}, alias="reports")
    assert "DATABASES['reports']['OPTIONS']['pool'] has an unknown option 'max_sise'" in message
    assert "Did you mean 'max_size'?" in message
    assert "Valid options: min_size, max_size" in message


@pytest.mark.parametrize(
    ("peer_name", "ours"),
    [
        ("MAX_CONNS", "max_size"),
        ("RECYCLE", "max_lifetime"),
        ("POOL_SIZE", "max_size"),
        ("pre_ping", "check_after_idle"),
    ],
)
def test_option_names_of_other_pooling_backends_are_translated(peer_name: str, ours: str) -> None:
    assert f"django_pgpool calls it '{ours}" in error({peer_name: 1})


def test_options_of_djangos_native_pool_without_meaning_here_say_what_to_do() -> None:
    message = error({"num_workers": 3})
    assert "'num_workers', an option of Django's psycopg 3 pool" in message
    assert "remove it" in message


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"max_size": -2}, "['max_size'] = -2 is invalid: max_size must be >= 1 connections"),
        ({"max_size": 0}, "max_size must be >= 1 connections"),
        ({"min_size": -1}, "['min_size'] = -1 is invalid: min_size must be >= 0 connections"),
        (
            {"max_size": "10"},
            "['max_size'] = '10' (str) is invalid: max_size must be a whole number",
        ),
        ({"max_size": 2.5}, "'max_size'] = 2.5 (float) is invalid"),
        ({"max_size": True}, "'max_size'] = True (bool) is invalid"),
        ({"timeout": 0}, "['timeout'] = 0 is invalid: timeout must be > 0 seconds"),
        ({"timeout": -1}, "timeout must be > 0 seconds"),
        (
            {"timeout": "30s"},
            "['timeout'] = '30s' (str) is invalid: timeout must be a number of seconds",
        ),
        ({"timeout": float("nan")}, "timeout must be a finite number of seconds"),
        ({"max_lifetime": 0}, "max_lifetime must be > 0 seconds"),
        ({"max_idle": "never"}, "max_idle must be a number of seconds or None"),
        ({"check_after_idle": -0.1}, "check_after_idle must be >= 0 seconds"),
        ({"leak_threshold": None}, "leak_threshold must be a number of seconds,"),
        ({"reset": ""}, "reset must be True (restore a fresh session), False (roll back only)"),
        ({"reset": 1}, "reset must be True"),
        ({"check": "SELECT 1"}, "check must be a callable(connection) or None"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"min_size": 5, "max_size": 3}, "max_size=3 below min_size=5"),
        ("yes", "['pool'] = 'yes' (str) is invalid: it must be True (pool with the defaults)"),
    ],
)
def test_bad_values_name_the_alias_option_value_and_what_is_allowed(
    pool: Any, expected: str
) -> None:
    message = error(pool)
    assert message.startswith("DATABASES['default']")
    assert expected in message


@pytest.mark.parametrize("conn_max_age", [60, None])
def test_conn_max_age_with_the_pool_is_an_error_that_explains_why(conn_max_age: Any) -> None:
    message = error(True, CONN_MAX_AGE=conn_max_age)
    assert f"CONN_MAX_AGE={conn_max_age!r}" in message
    assert "the pool owns the connections, not the thread" in message
    assert "OPTIONS['pool'] = False" in message


def test_conn_health_checks_is_honoured() -> None:
    config = parse_pool_options("default", settings(True, CONN_HEALTH_CHECKS=True))
    assert config.check_every_checkout


def test_a_callable_reset_and_check_are_accepted() -> None:
    def check(conn: Any) -> None:
        pass

    config = parse_pool_options("default", settings({"reset": check, "check": check}))
    assert config.reset is check and config.check is check
    assert config.as_dict()["check"].endswith("check")


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"timeout": sys.maxsize}, "['timeout'] = 9223372036854775807 is invalid: timeout must be"),
        ({"timeout": 10**400}, "['timeout'] = an integer of 401 digits is invalid: timeout must"),
        ({"timeout": threading.TIMEOUT_MAX}, "timeout must be <= 31536000 seconds (365 days)."),
        ({"max_lifetime": 1e300}, "max_lifetime must be <= 31536000 seconds (365 days) or None."),
        ({"max_idle": 10**400}, "max_idle must be <= 31536000 seconds (365 days) or None."),
        ({"check_after_idle": 10**20}, "check_after_idle must be <= 31536000 seconds"),
        ({"leak_threshold": float("inf")}, "leak_threshold must be a finite number of seconds."),
        ({"max_size": 10**400}, "max_size must be <= 262143 connections (PostgreSQL's own limit)."),
        ({"max_size": 262_144}, "['max_size'] = 262144 is invalid: max_size must be <= 262143"),
        ({"min_size": 300_000, "max_size": 300_000}, "min_size must be <= 262143 connections"),
        ({"max_waiting": 10**400}, "max_waiting must be <= 9223372036854775807 requests."),
    ],
)
def test_values_the_runtime_cannot_honour_are_refused_with_the_limit(
    pool: Any, expected: str
) -> None:
    assert expected in error(pool)


def test_the_limits_themselves_are_accepted() -> None:
    config = parse_pool_options(
        "default",
        settings({"max_size": 262_143, "timeout": 365 * 24 * 3600, "max_lifetime": None}),
    )
    assert config.max_size == 262_143 and config.timeout == 31_536_000.0


@pytest.mark.parametrize("text", ["false", "True", "0", "yes", "off", "1.5", "  FALSE\n", "On"])
def test_a_boolean_looking_reset_string_is_refused_with_the_fix(text: str) -> None:
    message = error({"reset": text})
    assert message.startswith(
        f"DATABASES['default']['OPTIONS']['pool']['reset'] = {text!r} (str) is invalid: reset "
        f"must be the Python value True or False, not the string {text.strip()!r}: a string is "
        f"SQL run on every returned connection"
    )
    assert "Values read from environment variables are strings: convert them first" in message


@pytest.mark.parametrize("sql", ["DISCARD ALL", "RESET ALL; DISCARD TEMP", "select 1"])
def test_a_reset_sql_string_is_still_accepted(sql: str) -> None:
    assert parse_pool_options("default", settings({"reset": sql})).reset == sql


SECRET = "s3cr3t-Kq7!"


def fresh_credentials(password: str) -> dict[str, str]:
    return {"password": password}


class Revealing:
    """A callable whose repr is the password it holds."""

    def __call__(self, *args: Any) -> Any:
        return {"password": SECRET}

    def __repr__(self) -> str:
        return SECRET


def test_the_config_names_callables_without_their_arguments_closure_or_repr() -> None:
    config = parse_pool_options(
        "default",
        settings(
            {
                "connect_params": functools.partial(fresh_credentials, password=SECRET),
                "configure": lambda conn: SECRET,
                "check": Revealing(),
                "reset": Revealing(),
            }
        ),
    )
    assert SECRET not in repr(config) and SECRET not in str(config.as_dict())
    assert config.as_dict()["connect_params"] == (
        "functools.partial(tests.test_config.fresh_credentials)"
    )
    assert config.as_dict()["check"] == "<tests.test_config.Revealing object>"
    assert "configure=tests.test_config." in repr(config) and "<lambda>" in repr(config)


@pytest.mark.parametrize(
    "pool",
    [
        {"connect_params": {"password": SECRET}},
        {"connect_params": f"password={SECRET}"},
        {"reset": [SECRET]},
        {"check": {"password": SECRET}},
        {"name": {"password": SECRET}},
        {"max_size": Revealing},
    ],
)
def test_a_bad_value_that_may_hold_a_password_is_not_shown(pool: Any) -> None:
    message = error(pool)
    assert " is invalid: " in message and SECRET not in message


def entry(**settings_dict: Any) -> dict[str, Any]:
    return {
        "NAME": "shop",
        "USER": "shop",
        "PASSWORD": "",
        "HOST": "db.internal",
        "PORT": "5432",
        **settings(True),
        **settings_dict,
    }


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("sslmod", "sslmode"), ("SSLMODE", "sslmode"), ("aplication_name", "application_name")],
)
def test_a_misspelt_connection_option_is_refused_with_the_right_spelling(
    key: str, suggestion: str
) -> None:
    options = {key: "x", "pool": True}
    with pytest.raises(ImproperlyConfigured) as caught:
        parse_pool_options("default", entry(OPTIONS=options))
    message = str(caught.value)
    assert message.startswith(
        f"DATABASES['default']['OPTIONS'] has {key!r}, which is not a connection parameter: "
        f"psycopg2.connect() would refuse every connection"
    )
    assert f"Did you mean {suggestion!r}?" in message
    with pytest.raises(ImproperlyConfigured, match=f"Did you mean {suggestion!r}"):
        check_connection_settings("default", entry(OPTIONS=options))


def test_options_that_django_or_psycopg2_read_themselves_are_accepted() -> None:
    options = {
        "isolation_level": 2,
        "assume_role": "reader",
        "server_side_binding": False,
        "cursor_factory": object,
        "connection_factory": object,
        "async_": False,
        "sslmode": "require",
        "application_name": "shop-{pid}",
        "options": "-c statement_timeout=5000",
        "service": "shop",
        "pool": {"max_size": 3},
    }
    assert parse_pool_options("default", entry(OPTIONS=options)).max_size == 3


def test_a_psycopg3_only_option_is_refused_on_psycopg2() -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        check_connection_settings("default", entry(OPTIONS={"prepare_threshold": None}))
    assert "'prepare_threshold', an option of Django's backend on psycopg 3" in str(caught.value)


def test_another_packages_option_in_options_is_refused_with_ours() -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        check_connection_settings("default", entry(OPTIONS={"MAX_CONNS": 20}))
    assert "'MAX_CONNS', an option of another pooling package" in str(caught.value)
    assert "['OPTIONS']['pool'] option max_size" in str(caught.value)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"PASSWORD": f"{SECRET}\x00"}, "DATABASES['default']['PASSWORD'] is invalid: it must"),
        ({"NAME": "sh\x00op"}, "DATABASES['default']['NAME'] = 'sh\\x00op' is invalid: it must"),
        ({"USER": "\x00"}, "DATABASES['default']['USER'] = '\\x00' is invalid"),
        ({"HOST": "db\x00"}, "DATABASES['default']['HOST'] = 'db\\x00' is invalid"),
        ({"PORT": "5432\x00"}, "DATABASES['default']['PORT'] = '5432\\x00' is invalid"),
        (
            {"OPTIONS": {"sslpassword": f"{SECRET}\x00"}},
            "DATABASES['default']['OPTIONS']['sslpassword'] is invalid",
        ),
        (
            {"OPTIONS": {"application_name": "web\x00"}},
            "DATABASES['default']['OPTIONS']['application_name'] = 'web\\x00' is invalid",
        ),
    ],
)
def test_a_nul_byte_in_a_connection_setting_is_refused_without_showing_a_password(
    setting: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        parse_pool_options("default", entry(**setting))
    message = str(caught.value)
    assert expected in message
    assert "must not contain a NUL byte (\\x00)" in message
    assert SECRET not in message


def test_a_callable_connection_setting_is_left_for_when_it_is_called() -> None:
    # Rotating credentials: calling them now would fetch a token for nothing.
    calls: list[int] = []

    def password() -> str:
        calls.append(1)
        return "x\x00"

    check_connection_settings("default", entry(PASSWORD=password))
    assert calls == []


def test_the_longest_durations_allowed_are_ones_the_pool_can_wait_for(make_pool: Any) -> None:
    longest = validation.MAX_SECONDS
    config = parse_pool_options(
        "default",
        settings({"max_size": 1, "timeout": longest, "max_idle": longest, "max_lifetime": longest}),
    )
    pool = make_pool(**{key: getattr(config, key) for key in ("max_size", "timeout", "max_idle")})
    held = pool.getconn()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.getconn()))
    waiter.start()
    time.sleep(0.2)  # the waiter waits with the longest timeout: no OverflowError
    pool.putconn(held)
    waiter.join(10)
    assert got and got[0] is held
    pool.putconn(got[0])
