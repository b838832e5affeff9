"""Reading and validating ``DATABASES[alias]["OPTIONS"]["pool"]``.

Every option the pool understands is declared once, in :data:`OPTIONS`, with
its type, default, unit and limits. :func:`parse_pool_options` turns a
project's settings into a frozen :class:`PoolConfig` or raises
``ImproperlyConfigured`` naming the alias, the option, the bad value and what
is allowed. Names and meanings follow Django's built-in (psycopg 3) pool, so
moving between the two changes only ``ENGINE``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: What the ``reset`` option accepts: ``True`` (restore a fresh session),
#: ``False`` (only roll back), SQL to run instead, or a callable taking the
#: psycopg2 connection.
ResetPolicy = bool | str | Callable[[Any], None]


@dataclass(frozen=True)
class PoolConfig:
    """The effective settings of one pool (defaults filled in, all validated)."""

    min_size: int = 1
    max_size: int = 10
    timeout: float = 30.0
    max_waiting: int = 0
    max_lifetime: float | None = 3600.0
    max_idle: float | None = 600.0
    check_after_idle: float = 0.5
    reset: ResetPolicy = True
    check: Callable[[Any], None] | None = None
    configure: Callable[[Any], None] | None = None
    connect_params: Callable[[], Mapping[str, Any]] | None = None
    leak_threshold: float = 0.0
    name: str = ""
    # Not an option: CONN_HEALTH_CHECKS=True turns every checkout into a
    # round-trip check, as Django's native pool does.
    check_every_checkout: bool = field(default=False)

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values (callables by name), for stats and logs."""
        result: dict[str, Any] = {}
        for option in fields(self):
            value = getattr(self, option.name)
            if callable(value):
                value = getattr(value, "__qualname__", repr(value))
            result[option.name] = value
        return result


@dataclass(frozen=True)
class Option:
    """One pool option: how it is documented and what it accepts."""

    name: str
    default: Any
    unit: str
    help: str
    kind: str  # "int", "seconds", "optional seconds", "reset", "callable", "name"
    minimum: float = 0.0
    minimum_is_exclusive: bool = False


OPTIONS: tuple[Option, ...] = (
    Option(
        "min_size",
        1,
        "connections",
        "Connections opened ahead of need (in the background) and kept open even when idle.",
        "int",
    ),
    Option(
        "max_size",
        10,
        "connections",
        "Most server connections this process opens for the alias. A request that finds "
        "them all in use waits, first come first served.",
        "int",
        minimum=1,
    ),
    Option(
        "timeout",
        30.0,
        "seconds",
        "How long a request waits for a connection before failing with `PoolTimeout` "
        "(a `django.db.OperationalError`).",
        "seconds",
        minimum_is_exclusive=True,
    ),
    Option(
        "max_waiting",
        0,
        "requests",
        "Most requests allowed to wait at once; more fail at once with `TooManyRequests`. "
        "0 means no limit.",
        "int",
    ),
    Option(
        "max_lifetime",
        3600.0,
        "seconds",
        "A connection older than this (minus up to 5 % random jitter) is closed and "
        "replaced; it is never handed out again, even if it sat idle. `None`: no limit.",
        "optional seconds",
        minimum_is_exclusive=True,
    ),
    Option(
        "max_idle",
        600.0,
        "seconds",
        "An idle connection above `min_size` unused for this long is closed. `None`: keep them.",
        "optional seconds",
        minimum_is_exclusive=True,
    ),
    Option(
        "check_after_idle",
        0.5,
        "seconds",
        "A connection idle longer than this is checked with a round trip before it is "
        "handed out; a fresher one only gets a local socket check. 0: check every time "
        "(what `CONN_HEALTH_CHECKS=True` selects).",
        "seconds",
    ),
    Option(
        "reset",
        True,
        "",
        "What happens to a returned connection's session: `True` restores a fresh "
        "session (roles, settings, temp tables, advisory locks, prepared statements, "
        "LISTEN) in the background after it is returned; `False` only rolls back; a SQL "
        "string or a "
        "callable(connection) replaces the built-in reset.",
        "reset",
    ),
    Option(
        "check",
        None,
        "",
        "callable(connection) that raises if the connection is unusable; replaces the "
        "built-in `SELECT 1` liveness check.",
        "callable",
    ),
    Option(
        "configure",
        None,
        "",
        "callable(connection) run once on each new connection, after Django's own "
        "session settings.",
        "callable",
    ),
    Option(
        "connect_params",
        None,
        "",
        "callable() returning connection parameters (such as a fresh password or IAM "
        "token) merged over the alias's own, for every new connection.",
        "callable",
    ),
    Option(
        "leak_threshold",
        0.0,
        "seconds",
        "A connection checked out longer than this logs one warning with the stack that "
        "took it. 0: off.",
        "seconds",
    ),
    Option(
        "name",
        None,
        "",
        "Name used in logs, errors and statistics. Default: the database alias.",
        "name",
    ),
)

OPTION_NAMES = tuple(option.name for option in OPTIONS)

# psycopg_pool options that Django's native pool accepts but that have no
# meaning here, with what to do instead. A project switching ENGINE gets told.
_NATIVE_ONLY_OPTIONS = {
    "num_workers": "the pool runs its maintenance in one background thread; remove it",
    "kwargs": "connection parameters come from DATABASES (NAME, USER, HOST, OPTIONS...); remove it",
    "connection_class": "use OPTIONS['connection_factory'] (psycopg2) instead",
    "open": "the pool opens on first use; call connection.pool.open(wait=True) to warm it up",
    "reconnect_timeout": "the pool retries connecting in the background with backoff; remove it",
    "reconnect_failed": "remove it; failures are logged on the 'django_pgpool' logger",
}

#: Option names of other pooling packages (lower-cased), with the name
#: django_pgpool uses, so that a migrating project is told what to write.
PEER_OPTION_NAMES = {
    "max_conns": "max_size",
    "min_conns": "min_size",
    "pool_size": "max_size",
    "max_overflow": "max_size",
    "recycle": "max_lifetime",
    "pre_ping": "check_after_idle (or CONN_HEALTH_CHECKS=True)",
    "reuse_conns": "min_size",
    "pool_timeout": "timeout",
    "maxconn": "max_size",
    "minconn": "min_size",
}


def _where(alias: str, option: str | None = None) -> str:
    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    return f"{where}[{option!r}]" if option else where


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _validate(alias: str, option: Option, value: Any) -> Any:
    where = _where(alias, option.name)
    if option.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ImproperlyConfigured(
                f"{where} = {_describe(value)} is invalid: {option.name} must be a whole "
                f"number of {option.unit} >= {int(option.minimum)}, "
                f"for example {option.default}."
            )
        if value < option.minimum:
            raise ImproperlyConfigured(
                f"{where} = {value} is invalid: {option.name} must be >= "
                f"{int(option.minimum)} {option.unit}."
            )
        return value
    if option.kind in ("seconds", "optional seconds"):
        if value is None and option.kind == "optional seconds":
            return None
        allowed = "a number of seconds" + (" or None" if option.kind == "optional seconds" else "")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ImproperlyConfigured(
                f"{where} = {_describe(value)} is invalid: {option.name} must be {allowed}, "
                f"for example {option.default}."
            )
        if math.isnan(value) or math.isinf(value):
            raise ImproperlyConfigured(
                f"{where} = {value!r} is invalid: {option.name} must be a finite number of seconds."
            )
        too_small = (
            value <= option.minimum if option.minimum_is_exclusive else value < option.minimum
        )
        if too_small:
            bound = ">" if option.minimum_is_exclusive else ">="
            raise ImproperlyConfigured(
                f"{where} = {value!r} is invalid: {option.name} must be {bound} 0 seconds."
            )
        return float(value)
    if option.kind == "reset":
        if isinstance(value, bool) or callable(value):
            return value
        if isinstance(value, str) and value.strip():
            return value
        raise ImproperlyConfigured(
            f"{where} = {_describe(value)} is invalid: reset must be True (restore a fresh "
            f"session), False (roll back only), a non-empty SQL string, or a "
            f"callable(connection)."
        )
    if option.kind == "callable":
        if value is None or callable(value):
            return value
        raise ImproperlyConfigured(
            f"{where} = {_describe(value)} is invalid: {option.name} must be a "
            f"{'callable()' if option.name == 'connect_params' else 'callable(connection)'} "
            f"or None."
        )
    if option.kind == "name":
        if value is None or (isinstance(value, str) and value):
            return value
        raise ImproperlyConfigured(
            f"{where} = {_describe(value)} is invalid: name must be a non-empty string."
        )
    raise AssertionError(f"unknown option kind {option.kind!r}")  # pragma: no cover


def _unknown_option_message(alias: str, key: Any) -> str:
    where = _where(alias)
    if isinstance(key, str) and key in _NATIVE_ONLY_OPTIONS:
        return (
            f"{where} has {key!r}, an option of Django's psycopg 3 pool that django_pgpool "
            f"does not use: {_NATIVE_ONLY_OPTIONS[key]}."
        )
    hint = ""
    if isinstance(key, str):
        if key.lower() in PEER_OPTION_NAMES:
            hint = f" django_pgpool calls it {PEER_OPTION_NAMES[key.lower()]!r}."
        else:
            close = difflib.get_close_matches(key.lower(), OPTION_NAMES, n=1)
            if close:
                hint = f" Did you mean {close[0]!r}?"
    return f"{where} has an unknown option {key!r}.{hint} Valid options: {', '.join(OPTION_NAMES)}."


def pool_is_enabled(settings_dict: Mapping[str, Any]) -> bool:
    """Whether the alias pools (it does unless ``OPTIONS["pool"]`` is ``False``)."""
    return (settings_dict.get("OPTIONS") or {}).get("pool", True) is not False


def parse_pool_options(alias: str, settings_dict: Mapping[str, Any]) -> PoolConfig:
    """Validate an alias's pool settings and return its :class:`PoolConfig`.

    ``OPTIONS["pool"]`` may be missing or ``True`` (defaults) or a dict of
    options. ``CONN_MAX_AGE`` must be 0: with a pool, the pool owns the
    connections, not the thread.
    """
    raw = (settings_dict.get("OPTIONS") or {}).get("pool", True)
    if raw is True or raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{_where(alias)} = {_describe(raw)} is invalid: it must be True (pool with the "
            f"defaults), False (no pool), or a dict of pool options such as "
            f"{{'max_size': 10, 'timeout': 30}}."
        )
    for key in raw:
        if key not in OPTION_NAMES:
            raise ImproperlyConfigured(_unknown_option_message(alias, key))

    conn_max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if conn_max_age != 0:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] sets CONN_MAX_AGE={conn_max_age!r} while django_pgpool "
            f"pools its connections. With a pool, the pool owns the connections, not the "
            f"thread: every request takes one and gives it back when Django closes it, so "
            f"there is nothing left for CONN_MAX_AGE to keep. Set CONN_MAX_AGE to 0 (the "
            f"default) and tune OPTIONS['pool']['max_lifetime'] / ['max_idle'] instead, or "
            f"set OPTIONS['pool'] = False to keep persistent connections without the pool."
        )

    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.name in raw:
            values[option.name] = _validate(alias, option, raw[option.name])
    if values.get("name") is None:
        values["name"] = alias

    config = PoolConfig(
        **values, check_every_checkout=bool(settings_dict.get("CONN_HEALTH_CHECKS", False))
    )
    if config.max_size < config.min_size:
        raise ImproperlyConfigured(
            f"{_where(alias)} has max_size={config.max_size} below "
            f"min_size={config.min_size}: max_size must be >= min_size. Raise max_size or "
            f"lower min_size."
        )
    return config
