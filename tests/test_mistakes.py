"""Mistakes are reported at once, as what they are, never as an outage.

A hook that raises, ``connect_params`` returning something that is not
parameters, a NUL byte in a password or a bad argument to the pool's own
methods: none of them is about reaching the server, so no request waits for
the server to come back, and no message says it "could not be reached".
"""

from __future__ import annotations

import math
import time
from typing import Any

import psycopg2
import pytest

from django_pgpool import PoolTimeout

from .helpers import query_one


class HookFailed(Exception):
    """What the tests' hooks raise."""


def failing_configure(conn: Any) -> None:
    raise HookFailed("the configure hook is broken")


def no_parameters() -> None:
    return None


def a_password_with_a_nul_byte() -> dict[str, str]:
    return {"password": "hunter2\x00tail"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda pool: pool.getconn(timeout=-1), "getconn(timeout=-1) is invalid: timeout must"),
        (
            lambda pool: pool.getconn(timeout=math.nan),
            "getconn(timeout=nan) is invalid: timeout must be a finite number of seconds",
        ),
        (
            lambda pool: pool.getconn(timeout=10**9),
            "getconn(timeout=1000000000) is invalid: timeout must be <= 31536000 seconds",
        ),
        (lambda pool: pool.open(wait=True, timeout=-2), "open(timeout=-2) is invalid: timeout"),
        (lambda pool: pool.close(timeout=-3), "close(timeout=-3) is invalid: timeout"),
        (
            lambda pool: pool.resize(max_size=300_000),
            "resize(max_size=300000) is invalid: max_size must be <= 262143 connections",
        ),
        (lambda pool: pool.resize(min_size=-1), "resize(min_size=-1) is invalid: min_size"),
    ],
    ids=["negative", "nan", "a-billion-seconds", "open", "close", "resize-huge", "resize-negative"],
)
def test_bad_arguments_are_refused_naming_the_pool_and_the_argument(
    make_pool: Any, call: Any, message: str
) -> None:
    pool = make_pool(name="orders", min_size=0, max_size=2)
    with pytest.raises(ValueError) as caught:
        call(pool)
    assert str(caught.value).startswith("pool 'orders': ")
    assert message in str(caught.value)
    conn = pool.getconn(timeout=1)  # and the pool is unharmed
    assert query_one(conn, "SELECT 1") == 1
    pool.putconn(conn)
    stats = pool.stats()
    assert stats["requests_num"] == 1 and stats["requests_errors"] == 0  # no request was made


@pytest.mark.parametrize(
    "call",
    [lambda pool: pool.getconn(timeout="5"), lambda pool: pool.resize(max_size="3")],
    ids=["getconn", "resize"],
)
def test_arguments_of_the_wrong_type_are_a_type_error(make_pool: Any, call: Any) -> None:
    pool = make_pool(name="orders", min_size=0)
    with pytest.raises(TypeError, match=r"pool 'orders': \w+\(\w+='\d' \(str\)\) is invalid"):
        call(pool)


def test_a_configure_hook_that_raises_fails_the_request_at_once_with_its_own_error(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, max_size=2, timeout=30, configure=failing_configure)
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(HookFailed, match="the configure hook is broken"):
            pool.getconn()
        assert time.monotonic() - started < 2
    stats = pool.stats()
    assert stats["requests_errors"] == 2 and stats["pool_size"] == 0


def test_a_hook_failing_in_the_background_warm_up_is_no_outage(make_pool: Any) -> None:
    pool = make_pool(min_size=2, max_size=4, timeout=30, configure=failing_configure)
    pool.open()  # the worker opens min_size in the background, and fails
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(HookFailed):
        pool.getconn()
    assert time.monotonic() - started < 2
    with pytest.raises(HookFailed):
        pool.open(wait=True, timeout=10)  # the warm-up fails at once too
    assert time.monotonic() - started < 4


def test_connect_params_that_returns_no_parameters_is_a_type_error_naming_it(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, name="tokens", connect_params=no_parameters, timeout=30)
    started = time.monotonic()
    with pytest.raises(TypeError) as caught:
        pool.getconn()
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert message.startswith("pool 'tokens': connect_params ")
    assert "tests.test_mistakes.no_parameters) returned None (NoneType)" in message
    assert "it must return a dict of connection parameters" in message


def test_a_nul_byte_in_a_password_from_connect_params_is_named_without_its_value(
    make_pool: Any,
) -> None:
    pool = make_pool(min_size=0, name="tokens", connect_params=a_password_with_a_nul_byte)
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        pool.getconn()
    assert time.monotonic() - started < 2
    message = str(caught.value)
    assert message.startswith(
        "pool 'tokens': the connection parameter 'password' returned by connect_params "
        "(tests.test_mistakes.a_password_with_a_nul_byte) is invalid: it must not contain a "
        "NUL byte"
    )
    assert "hunter2" not in message


def test_a_nul_byte_from_a_callable_password_fails_the_orm_at_once(
    server: Any, django_db_blocker: Any
) -> None:
    from django.db import connections

    from django_pgpool.base import DatabaseWrapper

    entry = server.django_database(PASSWORD=lambda: "hunter2\x00")
    entry = connections.configure_settings({"default": dict(entry), "rotating": entry})["rotating"]
    wrapper = DatabaseWrapper(entry, alias="rotating")
    started = time.monotonic()
    with django_db_blocker.unblock(), pytest.raises(ValueError) as caught:
        wrapper.ensure_connection()
    assert time.monotonic() - started < 2
    wrapper.close_pool()
    message = str(caught.value)
    assert "pool 'rotating': the connection parameter 'password' returned by " in message
    assert "must not contain a NUL byte" in message and "hunter2" not in message


def test_errors_that_are_not_about_the_server_never_read_as_an_outage(make_pool: Any) -> None:
    pool = make_pool(min_size=1, timeout=0.5, configure=failing_configure)
    for _ in range(4):  # each request tries, and hears the truth, however often it fails
        with pytest.raises(HookFailed):
            pool.getconn()
        time.sleep(0.2)  # meanwhile the worker fails to open min_size too


def test_a_permanent_error_is_not_a_timeout(make_pool: Any, server: Any) -> None:
    pool = make_pool(server.connect_kwargs(dbname="pgpool_no_such_database"), min_size=0)
    with pytest.raises(psycopg2.OperationalError) as caught:
        pool.getconn()
    assert not isinstance(caught.value, PoolTimeout)
