"""One validator per kind of value the pool takes, and safe ways to show values.

Each validator returns the value, normalised (seconds become a ``float``), or
raises :class:`InvalidValue`, whose message says why in words that fit after
any subject: ``f"timeout {exc}"`` reads "timeout must be > 0 seconds". The
callers name the subject: :mod:`django_pgpool.config` names the setting
(``DATABASES['default']['OPTIONS']['pool']['timeout']``),
:mod:`django_pgpool.url` the URL parameter, the pool its own arguments.

Ranges are those the runtime can honour: a wait longer than
:data:`MAX_SECONDS` would overflow the lock timeouts of some platforms (and
means a mistake anyway), and no server accepts more than
:data:`MAX_CONNECTIONS` connections.

This module imports nothing from Django, so the pool can use it too.
"""

from __future__ import annotations

import functools
import math
import re
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, cast

#: What the ``reset`` option accepts: ``True`` (restore a fresh session),
#: ``False`` (only roll back), SQL to run instead, or a callable taking the
#: psycopg2 connection.
ResetPolicy = bool | str | Callable[[Any], None]

#: The most connections a pool may be sized for: PostgreSQL's own upper limit
#: of ``max_connections`` (2**18 - 1 backends).
MAX_CONNECTIONS = 262_143

#: The longest duration an option may give: 365 days, or less on a platform
#: whose lock timeouts can't wait that long (``threading.TIMEOUT_MAX``).
MAX_SECONDS = min(365 * 24 * 60 * 60.0, threading.TIMEOUT_MAX)

# How people write a boolean or a number as text. None of these is SQL, so a
# reset "SQL" string that looks like one is a boolean that was never converted.
_BOOLEAN_WORDS = frozenset(
    ("true", "false", "t", "f", "yes", "no", "y", "n", "on", "off", "none", "null")
)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

# Longest text shown of a value in a message.
_SHOWN_LENGTH = 80


class InvalidValue(ValueError):
    """A value that can't be used; the message says why, after the value's name.

    ``wrong_type`` is true when the value's type is what is wrong (a string
    for a number), so that a message can show the type next to the value.
    """

    def __init__(self, why: str, *, wrong_type: bool = False) -> None:
        super().__init__(why)
        self.wrong_type = wrong_type


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _for_example(example: Any) -> str:
    return "" if example is None else f", for example {example}"


def whole_number(
    value: Any,
    *,
    unit: str,
    minimum: int = 0,
    maximum: int | None = sys.maxsize,
    example: Any = None,
) -> int:
    """An ``int`` (not a ``bool``) from ``minimum`` to ``maximum`` (``None``: any) ``unit``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidValue(
            f"must be a whole number of {unit} >= {minimum}{_for_example(example)}",
            wrong_type=True,
        )
    if value < minimum:
        raise InvalidValue(f"must be >= {minimum} {unit}")
    if maximum is not None and value > maximum:
        raise InvalidValue(f"must be <= {maximum} {unit}")
    return int(value)


def connection_count(value: Any, *, minimum: int = 0, example: Any = None) -> int:
    """A number of connections from ``minimum`` to :data:`MAX_CONNECTIONS`."""
    count = whole_number(value, unit="connections", minimum=minimum, maximum=None, example=example)
    if count > MAX_CONNECTIONS:
        raise InvalidValue(f"must be <= {MAX_CONNECTIONS} connections (PostgreSQL's own limit)")
    return count


def seconds(
    value: Any,
    *,
    minimum: float = 0.0,
    exclusive: bool = False,
    maximum: float = MAX_SECONDS,
    example: Any = None,
) -> float:
    """A finite number of seconds, above (``exclusive``) or from ``minimum``, up to ``maximum``."""
    return _seconds(
        value,
        minimum=minimum,
        exclusive=exclusive,
        maximum=maximum,
        example=example,
        optional=False,
    )


_SECONDS_LIMITS: dict[str, Any] = {
    "minimum": 0.0,
    "exclusive": False,
    "maximum": MAX_SECONDS,
    "example": None,
}


def optional_seconds(value: Any, **limits: Any) -> float | None:
    """As :func:`seconds` (with the same keyword arguments), or ``None`` (no limit)."""
    if value is None:
        return None
    return _seconds(value, **{**_SECONDS_LIMITS, **limits}, optional=True)


def _seconds(
    value: Any, *, minimum: float, exclusive: bool, maximum: float, example: Any, optional: bool
) -> float:
    or_none = " or None" if optional else ""
    if not _is_number(value):
        raise InvalidValue(
            f"must be a number of seconds{or_none}{_for_example(example)}", wrong_type=True
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValue(f"must be a finite number of seconds{or_none}")
    if value < minimum or (exclusive and value == minimum):
        raise InvalidValue(f"must be {'>' if exclusive else '>='} {minimum:g} seconds")
    # Compared before float(), which would overflow on an int like 10**400.
    if value > maximum:
        raise InvalidValue(f"must be <= {maximum:.0f} seconds ({maximum / 86400:g} days){or_none}")
    return float(value)


def reset_policy(value: Any) -> ResetPolicy:
    """``True``, ``False``, a callable, or SQL: a non-empty string, not a boolean in disguise."""
    if isinstance(value, bool):
        return value
    if callable(value):
        return cast("Callable[[Any], None]", value)
    if isinstance(value, str) and value.strip():
        text = value.strip()
        if text.lower() in _BOOLEAN_WORDS or _NUMBER.fullmatch(text):
            raise InvalidValue(
                f"must be the Python value True or False, not the string {text!r}: a string "
                f"is SQL run on every returned connection, and {text!r} is not SQL, so every "
                f"reset would fail and each request would pay for a new connection. Values "
                f"read from environment variables are strings: convert them first, for "
                f"example os.environ['POOL_RESET'].lower() in ('1', 'true')",
                wrong_type=True,
            )
        return value
    raise InvalidValue(
        "must be True (restore a fresh session), False (roll back only), a non-empty SQL "
        "string, or a callable(connection)",
        wrong_type=True,
    )


def choice(value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (strings), exactly."""
    if isinstance(value, str) and value in choices:
        return value
    listed = " or ".join(repr(c) for c in choices)
    raise InvalidValue(f"must be {listed}", wrong_type=not isinstance(value, str))


def optional_callable(
    value: Any, *, signature: str = "callable(connection)"
) -> Callable[..., Any] | None:
    """A callable, or ``None``; ``signature`` says how it is called, for the message."""
    if value is None or callable(value):
        return cast("Callable[..., Any] | None", value)
    raise InvalidValue(f"must be a {signature} or None", wrong_type=True)


def pool_name(value: Any) -> str:
    """A non-empty string."""
    if isinstance(value, str) and value:
        return value
    raise InvalidValue("must be a non-empty string", wrong_type=not isinstance(value, str))


def connection_parameter(value: Any) -> Any:
    """A value for libpq: text without a NUL byte (libpq's strings end at one)."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidValue(
            "must not contain a NUL byte (\\x00): libpq can't take one, so psycopg2 would "
            "refuse every connection with 'embedded null character'"
        )
    if isinstance(value, bytes) and b"\x00" in value:
        raise InvalidValue("must not contain a NUL byte (\\x00)")
    return value


# Callables that have a name of their own; other callables are named by their class.
_NAMED_CALLABLES = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
)


def describe_callable(value: Any) -> str:
    """A callable by its module and qualified name: never its repr, arguments or closure.

    A function or class is ``module.qualname``; a ``functools.partial`` shows
    the function it wraps (not its arguments, which may hold a password); any
    other callable object is ``<module.Class object>``.
    """
    if isinstance(value, functools.partial):
        return f"functools.partial({describe_callable(value.func)})"
    if isinstance(value, types.MethodType):
        value = value.__func__
    named = isinstance(value, _NAMED_CALLABLES)
    target = value if named else type(value)
    name = _text_attribute(target, "__qualname__")
    module = _text_attribute(target, "__module__")
    qualified = name if module in ("builtins", "") else f"{module}.{name}"
    return qualified if named else f"<{qualified} object>"


def _text_attribute(target: Any, name: str) -> str:
    value = getattr(target, name, None)
    return value if isinstance(value, str) else ""


def describe(value: Any, *, with_type: bool = False) -> str:
    """A value for an error message, without anything it might hide.

    Plain values (``None``, booleans, numbers, short strings) are shown as
    Python would write them; a callable by its name; anything else only by
    its type, since its repr could show a password (a dict of connection
    parameters, an object with a custom ``__repr__``).
    """
    if value is None or isinstance(value, bool | int | float | str):
        if isinstance(value, int) and abs(value) > 10**30:
            # Too long to read, and beyond a few thousand digits repr() refuses.
            shown = f"an integer of {int(math.log10(abs(value))) + 1} digits"
        else:
            shown = repr(value)
            if len(shown) > _SHOWN_LENGTH:
                shown = shown[: _SHOWN_LENGTH - 4] + "...'"
        return f"{shown} ({type(value).__name__})" if with_type else shown
    if callable(value):
        return describe_callable(value)
    return f"<{type(value).__name__}>"


def argument(call: str, name: str, value: Any, validate: Callable[[Any], Any]) -> Any:
    """``validate(value)`` for an argument of ``call``; a ``ValueError`` (or a
    ``TypeError``, for a value of the wrong type) naming the call otherwise."""
    try:
        return validate(value)
    except InvalidValue as exc:
        shown = describe(value, with_type=exc.wrong_type)
        error = TypeError if exc.wrong_type else ValueError
        raise error(f"{call}({name}={shown}) is invalid: {name} {exc}.") from None
