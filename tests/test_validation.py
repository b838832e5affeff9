"""django_pgpool.validation: one validator per kind of value, messages that fit any subject."""

from __future__ import annotations

import ast
import functools
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from django_pgpool import validation
from django_pgpool.validation import InvalidValue

from .helpers import run_python

SECRET = "hunter2-Zq8"


def why(validator: Any, value: Any, **kwargs: Any) -> InvalidValue:
    with pytest.raises(InvalidValue) as caught:
        validator(value, **kwargs)
    assert isinstance(caught.value, ValueError)
    return caught.value


def test_the_module_imports_nothing_but_the_standard_library() -> None:
    # The pool validates its own arguments with it, and the pool imports no Django.
    source = Path(validation.__file__).read_text()
    imported = {
        name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
        )
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
    result = run_python(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('v', {validation.__file__!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('django', 'psycopg2')))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_messages_say_why_in_words_that_follow_any_name() -> None:
    cases: list[tuple[Any, Any, dict[str, Any], str]] = [
        (validation.connection_count, 0, {"minimum": 1}, "must be >= 1 connections"),
        (validation.seconds, 0, {"exclusive": True}, "must be > 0 seconds"),
        (validation.seconds, "30s", {"example": 30}, "must be a number of seconds, for example 30"),
        (validation.optional_seconds, "x", {}, "must be a number of seconds or None"),
        (validation.pool_name, "", {}, "must be a non-empty string"),
        (validation.optional_callable, 3, {"signature": "callable()"}, "must be a callable() or"),
    ]
    for validator, value, kwargs, expected in cases:
        assert str(why(validator, value, **kwargs)).startswith(expected)


def test_validators_return_the_normalised_value() -> None:
    assert validation.connection_count(5, minimum=1) == 5
    assert validation.seconds(5) == 5.0 and isinstance(validation.seconds(5), float)
    assert validation.optional_seconds(None) is None
    assert validation.reset_policy("DISCARD ALL") == "DISCARD ALL"
    assert validation.reset_policy(False) is False
    assert validation.optional_callable(None) is None
    assert validation.pool_name("reads") == "reads"


def test_a_wrong_type_is_flagged_so_that_a_message_can_show_it() -> None:
    assert why(validation.connection_count, "10").wrong_type
    assert why(validation.connection_count, True).wrong_type
    assert why(validation.connection_count, 2.5).wrong_type
    assert not why(validation.connection_count, -1).wrong_type
    assert why(validation.seconds, None).wrong_type
    assert not why(validation.seconds, -1).wrong_type


@pytest.mark.parametrize(
    "value",
    [sys.maxsize, 10**400, threading.TIMEOUT_MAX, 1e300, validation.MAX_SECONDS + 1],
)
def test_seconds_beyond_what_a_lock_can_wait_are_refused_not_overflowed(value: Any) -> None:
    message = str(why(validation.seconds, value))
    assert message == f"must be <= {validation.MAX_SECONDS:.0f} seconds (365 days)"


def test_the_longest_duration_allowed_is_one_every_wait_can_honour() -> None:
    assert validation.MAX_SECONDS == 365 * 24 * 3600
    assert validation.seconds(validation.MAX_SECONDS) == validation.MAX_SECONDS
    lock = threading.Lock()
    assert lock.acquire(timeout=validation.MAX_SECONDS)  # free: no wait, but no overflow
    lock.release()
    with pytest.raises(OverflowError):
        lock.acquire(timeout=threading.TIMEOUT_MAX * 2)  # what a bigger timeout would do


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_seconds_must_be_finite(value: float) -> None:
    assert str(why(validation.seconds, value)) == "must be a finite number of seconds"


@pytest.mark.parametrize("value", [validation.MAX_CONNECTIONS + 1, 10**400])
def test_sizes_beyond_postgresqls_own_limit_are_refused(value: int) -> None:
    message = str(why(validation.connection_count, value, minimum=1))
    assert message == "must be <= 262143 connections (PostgreSQL's own limit)"
    assert validation.connection_count(validation.MAX_CONNECTIONS) == 262_143


@pytest.mark.parametrize(
    "text", ["false", "True", "0", "1", "yes", "off", "1.5", " FALSE ", "None", "-1", "1e3"]
)
def test_a_boolean_looking_reset_string_is_refused_with_the_fix(text: str) -> None:
    error = why(validation.reset_policy, text)
    message = str(error)
    assert message.startswith(
        f"must be the Python value True or False, not the string {text.strip()!r}: "
    )
    assert "every reset would fail" in message
    assert "environment variables are strings: convert them first" in message
    assert error.wrong_type


@pytest.mark.parametrize("sql", ["DISCARD ALL", "RESET ALL", "SELECT 1", "ROLLBACK; DISCARD TEMP"])
def test_reset_sql_is_accepted(sql: str) -> None:
    assert validation.reset_policy(sql) == sql


def test_a_nul_byte_in_a_connection_parameter_is_refused() -> None:
    assert validation.connection_parameter("shop") == "shop"
    assert validation.connection_parameter(None) is None
    assert "must not contain a NUL byte" in str(why(validation.connection_parameter, "sh\x00op"))


def fresh_credentials(password: str) -> dict[str, str]:
    return {"password": password}


class Token:
    def __call__(self) -> str:
        return SECRET

    def __repr__(self) -> str:
        return SECRET


def test_a_callable_is_described_by_its_name_never_by_its_arguments_or_repr() -> None:
    closure = lambda: SECRET  # noqa: E731
    cases = {
        functools.partial(fresh_credentials, password=SECRET): (
            "functools.partial(tests.test_validation.fresh_credentials)"
        ),
        closure: "tests.test_validation.test_a_callable_is_described_by_its_name_never_by_its_"
        "arguments_or_repr.<locals>.<lambda>",
        Token(): "<tests.test_validation.Token object>",
        Token: "tests.test_validation.Token",
        Token().__call__: "tests.test_validation.Token.__call__",
        len: "len",
        functools.partial(Token()): "functools.partial(<tests.test_validation.Token object>)",
    }
    for value, expected in cases.items():
        assert validation.describe_callable(value) == expected
        assert SECRET not in validation.describe(value)


def test_values_that_may_hide_a_password_are_described_by_their_type() -> None:
    assert validation.describe({"password": SECRET}) == "<dict>"
    assert validation.describe([SECRET]) == "<list>"
    assert validation.describe("30s", with_type=True) == "'30s' (str)"
    assert validation.describe(10**400) == "an integer of 401 digits"
    assert validation.describe(10**5000) == "an integer of 5001 digits"  # repr() would refuse
    assert len(validation.describe("x" * 1000)) <= 80
