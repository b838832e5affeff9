"""OPTIONS["pool"]: defaults, and an error naming alias, option, value and fix for bad input."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_pgpool.config import OPTIONS, PoolConfig, parse_pool_options, pool_is_enabled


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
