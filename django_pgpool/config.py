"""Reading and validating the settings a pool is built from.

Every option the pool understands is declared once, in :data:`OPTIONS`, with
its default, unit, limits and the text of its row in the documentation
(``python -m django_pgpool.config --markdown`` prints the table the README and
docs/configuration.md carry). :func:`parse_pool_options` turns an alias's
settings into a frozen :class:`PoolConfig` or raises ``ImproperlyConfigured``
naming the alias, the setting, the bad value and what is allowed: the pool
options (validated by :mod:`django_pgpool.validation`) and the connection
settings libpq would refuse (an unknown key of ``OPTIONS``, a NUL byte).
Names and meanings follow Django's built-in (psycopg 3) pool, so moving
between the two changes only ``ENGINE``.
"""

from __future__ import annotations

import argparse
import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import psycopg2
import psycopg2.extensions
from django.core.exceptions import ImproperlyConfigured

from . import validation
from .validation import InvalidValue

# Declared with the validators; named here too, beside the options it types.
from .validation import ResetPolicy as ResetPolicy


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
    keepalive_time: float | None = 60.0
    reset: ResetPolicy = True
    check: Callable[[Any], None] | None = None
    configure: Callable[[Any], None] | None = None
    connect_params: Callable[[], Mapping[str, Any]] | None = None
    leak_threshold: float = 0.0
    release: str = "request"
    name: str = ""
    # Not an option: CONN_HEALTH_CHECKS=True turns every checkout into a
    # round-trip check, as Django's native pool does.
    check_every_checkout: bool = field(default=False)

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain values, for statistics, logs and JSON.

        A callable appears by its name only: a ``functools.partial``, a
        closure or an object's ``repr`` may hold a password.
        """
        result: dict[str, Any] = {}
        for option in fields(self):
            value = getattr(self, option.name)
            if callable(value):
                value = validation.describe_callable(value)
            result[option.name] = value
        return result

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{option.name}={validation.describe_callable(value)}"
            if callable(value)
            else f"{option.name}={value!r}"
            for option in fields(self)
            for value in [getattr(self, option.name)]
        )
        return f"{type(self).__name__}({shown})"


@dataclass(frozen=True)
class Option:
    """One pool option: how it is documented and what it accepts."""

    name: str
    default: Any
    unit: str
    #: The option's row in the documentation's table (Markdown).
    help: str
    #: "connections", "requests", "seconds", "optional seconds", "reset",
    #: "callable", "name" or "choice": which validator of :mod:`.validation` applies.
    kind: str
    minimum: float = 0.0
    minimum_is_exclusive: bool = False
    #: How a callable option is called, for messages.
    signature: str = "callable(connection)"
    #: The default as the documentation states it, when not the value itself.
    default_text: str = ""
    #: The value may hold credentials: messages never show it.
    secret: bool = False
    #: What a "choice" option accepts.
    choices: tuple[str, ...] = ()

    def validate(self, value: Any) -> Any:
        """The value, normalised; raises :class:`~.validation.InvalidValue` saying why not."""
        if self.kind == "connections":
            return validation.connection_count(
                value, minimum=int(self.minimum), example=self.default
            )
        if self.kind == "requests":
            return validation.whole_number(
                value, unit=self.unit, minimum=int(self.minimum), example=self.default
            )
        if self.kind in ("seconds", "optional seconds"):
            validate = validation.seconds if self.kind == "seconds" else validation.optional_seconds
            return validate(
                value,
                minimum=self.minimum,
                exclusive=self.minimum_is_exclusive,
                example=self.default,
            )
        if self.kind == "reset":
            return validation.reset_policy(value)
        if self.kind == "callable":
            return validation.optional_callable(value, signature=self.signature)
        if self.kind == "name":
            return None if value is None else validation.pool_name(value)
        if self.kind == "choice":
            return validation.choice(value, self.choices)
        raise AssertionError(f"unknown option kind {self.kind!r}")  # pragma: no cover

    @property
    def documented_default(self) -> str:
        return self.default_text or f"`{self.default!r}`"


OPTIONS: tuple[Option, ...] = (
    Option(
        "min_size",
        1,
        "connections",
        "Opened ahead of need (in the background, once the pool is first used) and kept "
        "open even when idle.",
        "connections",
    ),
    Option(
        "max_size",
        10,
        "connections",
        "Most server connections this process opens for the alias. A request that finds "
        "them all in use waits, first come first served.",
        "connections",
        minimum=1,
    ),
    Option(
        "timeout",
        30.0,
        "seconds",
        "How long a request waits for a connection before failing with `PoolTimeout`, a "
        "`django.db.OperationalError`.",
        "seconds",
        minimum_is_exclusive=True,
    ),
    Option(
        "max_waiting",
        0,
        "requests",
        "Most requests allowed to wait at once; more fail at once with `TooManyRequests`. "
        "`0`: no limit.",
        "requests",
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
        "A connection idle longer than this is checked with a round trip (`SELECT 1`) "
        "before it is handed out; a fresher one only gets a local socket check. `0`: check "
        "every time.",
        "seconds",
    ),
    Option(
        "keepalive_time",
        60.0,
        "seconds",
        "An idle connection that has not heard from the server for this long is checked in "
        "the background (`SELECT 1`): it stays alive through NATs and firewalls that drop "
        "quiet connections, and a dead one is found before a request finds it. `None`: off.",
        "optional seconds",
        minimum_is_exclusive=True,
    ),
    Option(
        "reset",
        True,
        "",
        "What happens to a returned connection's session. `True`: a fresh session is "
        "restored (`DISCARD ALL`, see below), sent as the connection is returned and "
        "finished before its next use, at no round trip of its own. `False`: only roll "
        "back. A SQL string or a `callable(connection)` replaces the built-in reset.",
        "reset",
    ),
    Option(
        "check",
        None,
        "",
        "`callable(connection)` that raises if the connection is unusable; replaces the "
        "built-in `SELECT 1`.",
        "callable",
    ),
    Option(
        "configure",
        None,
        "",
        "`callable(connection)` run once on each new connection, after Django's own "
        "session settings.",
        "callable",
    ),
    Option(
        "connect_params",
        None,
        "",
        "`callable()` returning connection parameters merged over the alias's own for "
        "every new connection (rotating credentials: a fresh password, an IAM token, a "
        "new host).",
        "callable",
        signature="callable()",
        secret=True,
    ),
    Option(
        "leak_threshold",
        0.0,
        "seconds",
        "A connection checked out longer than this logs one warning with the stack that "
        "took it. `0`: off.",
        "seconds",
    ),
    Option(
        "release",
        "request",
        "",
        'When a thread gives its connection back. `"request"`: when Django closes it, at '
        'the end of the request (Django\'s model). `"transaction"`: as soon as the thread '
        "has no open cursor and no open transaction, so a connection is held only while "
        "it is used; what needs the same session across statements pins it (see "
        "docs/configuration.md).",
        "choice",
        choices=("request", "transaction"),
    ),
    Option(
        "name",
        None,
        "",
        "Name used in logs, errors and statistics.",
        "name",
        default_text="the alias",
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


#: Keys of OPTIONS that Django's PostgreSQL backend reads itself: they never
#: reach libpq. ("pool" is ours.)
DJANGO_OPTIONS = frozenset(("isolation_level", "assume_role", "server_side_binding", "pool"))

#: Keys of OPTIONS that psycopg2.connect() takes itself rather than pass to libpq.
PSYCOPG2_CONNECT_ARGUMENTS = frozenset(
    ("dsn", "connection_factory", "cursor_factory", "async", "async_")
)

# Options Django's backend reads only on psycopg 3: on psycopg2 it passes them
# on to psycopg2.connect(), which refuses them.
_PSYCOPG3_ONLY_OPTIONS = {
    "prepare_threshold": "psycopg2 does not prepare statements on its own; remove it",
}

#: libpq's connection keywords, only to suggest a spelling: libpq itself
#: decides what it accepts (see :func:`is_libpq_keyword`).
LIBPQ_KEYWORDS = (
    "host", "hostaddr", "port", "dbname", "user", "password", "passfile", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name",
    "fallback_application_name", "keepalives", "keepalives_idle", "keepalives_interval",
    "keepalives_count", "tcp_user_timeout", "sslmode", "sslcompression", "sslcert", "sslkey",
    "sslpassword", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer",
    "ssl_min_protocol_version", "ssl_max_protocol_version", "gssencmode", "krbsrvname",
    "gsslib", "gssdelegation", "service", "target_session_attrs", "load_balance_hosts",
    "require_auth", "sslnegotiation", "sslcertmode",
)  # fmt: skip

#: The settings of an alias that become connection parameters.
CONNECTION_SETTINGS = ("NAME", "USER", "PASSWORD", "HOST", "PORT")


def _where(alias: str, option: str | None = None) -> str:
    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    return f"{where}[{option!r}]" if option else where


def _validate(alias: str, option: Option, value: Any) -> Any:
    try:
        return option.validate(value)
    except InvalidValue as exc:
        if option.secret and value is not None:
            shown = f"<{type(value).__name__}>"
        else:
            shown = validation.describe(value, with_type=exc.wrong_type)
        raise ImproperlyConfigured(
            f"{_where(alias, option.name)} = {shown} is invalid: {option.name} {exc}."
        ) from None


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
    shown = repr(key) if isinstance(key, str) else validation.describe(key)
    return f"{where} has an unknown option {shown}.{hint} Valid options: {', '.join(OPTION_NAMES)}."


def pool_is_enabled(settings_dict: Mapping[str, Any]) -> bool:
    """Whether the alias pools (it does unless ``OPTIONS["pool"]`` is ``False``)."""
    return (settings_dict.get("OPTIONS") or {}).get("pool", True) is not False


def parse_pool_options(alias: str, settings_dict: Mapping[str, Any]) -> PoolConfig:
    """Validate the settings a pool is built from and return its :class:`PoolConfig`.

    The pool options (:func:`pool_config`) first, then the connection
    settings (:func:`check_connection_settings`): the pool is built from
    both, so a mistake in either is an ``ImproperlyConfigured`` now rather
    than a failing connection later.
    """
    config = pool_config(alias, settings_dict)
    check_connection_settings(alias, settings_dict)
    return config


def pool_config(alias: str, settings_dict: Mapping[str, Any]) -> PoolConfig:
    """Validate an alias's pool options alone and return its :class:`PoolConfig`.

    ``OPTIONS["pool"]`` may be missing or ``True`` (defaults) or a dict of
    options. ``CONN_MAX_AGE`` must be 0: with a pool, the pool owns the
    connections, not the thread.
    """
    raw = (settings_dict.get("OPTIONS") or {}).get("pool", True)
    if raw is True or raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{_where(alias)} = {validation.describe(raw, with_type=True)} is invalid: it must "
            f"be True (pool with the defaults), False (no pool), or a dict of pool options "
            f"such as {{'max_size': 10, 'timeout': 30}}."
        )
    for key in raw:
        if key not in OPTION_NAMES:
            raise ImproperlyConfigured(_unknown_option_message(alias, key))

    conn_max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if conn_max_age != 0:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] sets CONN_MAX_AGE={validation.describe(conn_max_age)} while "
            f"django_pgpool pools its connections. With a pool, the pool owns the connections, "
            f"not the thread: every request takes one and gives it back when Django closes "
            f"it, so there is nothing left for CONN_MAX_AGE to keep. Set CONN_MAX_AGE to 0 "
            f"(the default) and tune OPTIONS['pool']['max_lifetime'] / ['max_idle'] instead, "
            f"or set OPTIONS['pool'] = False to keep persistent connections without the pool."
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


# ---------------------------------------------------------------- connection settings


@functools.lru_cache(maxsize=256)
def is_libpq_keyword(key: str) -> bool:
    """Whether libpq (the one psycopg2 runs on) takes ``key`` as a connection parameter."""
    try:
        psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(**{key: "x"}))
    except psycopg2.ProgrammingError:
        return False
    return True


def suggest_connection_option(key: str) -> str:
    """`` Did you mean 'sslmode'?`` for a misspelt key of OPTIONS, or ``""``."""
    known = (*LIBPQ_KEYWORDS, *sorted(DJANGO_OPTIONS), *sorted(PSYCOPG2_CONNECT_ARGUMENTS))
    close = difflib.get_close_matches(key.lower(), known, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def connection_option_errors(alias: str, options: Mapping[Any, Any]) -> dict[Any, str]:
    """The keys of ``OPTIONS`` that ``psycopg2.connect()`` would refuse, each with a message.

    A key is fine if Django's backend reads it (``isolation_level``...),
    ``psycopg2.connect()`` takes it (``cursor_factory``...), or libpq knows it
    as a connection parameter (``sslmode``...; libpq itself is asked).
    """
    where = f"DATABASES[{alias!r}]['OPTIONS']"
    errors: dict[Any, str] = {}
    for key in options:
        if key in DJANGO_OPTIONS or key in PSYCOPG2_CONNECT_ARGUMENTS:
            continue
        if not isinstance(key, str):
            errors[key] = (
                f"{where} has the key {validation.describe(key, with_type=True)}: the keys of "
                f"OPTIONS are names of connection parameters, strings such as 'sslmode'."
            )
        elif key in _PSYCOPG3_ONLY_OPTIONS:
            errors[key] = (
                f"{where} has {key!r}, an option of Django's backend on psycopg 3 that "
                f"psycopg2.connect() refuses: {_PSYCOPG3_ONLY_OPTIONS[key]}."
            )
        elif key.lower() in PEER_OPTION_NAMES:
            errors[key] = (
                f"{where} has {key!r}, an option of another pooling package, which "
                f"psycopg2.connect() refuses. Remove it; django_pgpool's equivalent is "
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] option {PEER_OPTION_NAMES[key.lower()]}."
            )
        elif not is_libpq_keyword(key):
            hint = suggest_connection_option(key)
            errors[key] = (
                f"{where} has {key!r}, which is not a connection parameter: psycopg2.connect() "
                f"would refuse every connection (invalid connection option).{hint} "
                f"The keys of OPTIONS are libpq's connection parameters (sslmode, "
                f"connect_timeout, application_name, options...), those Django's backend reads "
                f"(isolation_level, assume_role), psycopg2's connection_factory and "
                f"cursor_factory, and 'pool'."
            )
    return errors


def _is_secret(setting: str) -> bool:
    lowered = setting.lower()
    return "password" in lowered or lowered == "dsn"


def nul_byte_errors(alias: str, settings_dict: Mapping[str, Any]) -> dict[str, str]:
    """The connection settings holding a NUL byte, each with a message.

    libpq's strings end at a NUL byte, so psycopg2 refuses such a value on
    every connection; a value read from a file or a C program may carry one.
    A password's value is never shown.
    """
    candidates: list[tuple[str, str, Any]] = [
        (f"DATABASES[{alias!r}][{setting!r}]", setting, settings_dict.get(setting))
        for setting in CONNECTION_SETTINGS
    ]
    options = settings_dict.get("OPTIONS") or {}
    candidates += [
        (f"DATABASES[{alias!r}]['OPTIONS'][{key!r}]", key, value)
        for key, value in options.items()
        if isinstance(key, str) and key != "pool"
    ]
    errors: dict[str, str] = {}
    for where, setting, value in candidates:
        try:
            validation.connection_parameter(value)
        except InvalidValue as exc:
            shown = "" if _is_secret(setting) else f" = {validation.describe(value)}"
            errors[where] = f"{where}{shown} is invalid: it {exc}."
    return errors


def check_connection_settings(alias: str, settings_dict: Mapping[str, Any]) -> None:
    """Raise ``ImproperlyConfigured`` for a connection setting libpq would refuse.

    An unknown key of ``OPTIONS`` (``sslmod``) or a NUL byte in ``NAME``,
    ``USER``, ``PASSWORD``, ``HOST``, ``PORT`` or a value of ``OPTIONS``:
    otherwise each connection attempt fails, and the pool waits for a server
    that is not the problem. Callables (rotating credentials) are checked
    when called, not here.
    """
    options = settings_dict.get("OPTIONS") or {}
    for message in (
        *connection_option_errors(alias, options).values(),
        *nul_byte_errors(alias, settings_dict).values(),
    ):
        raise ImproperlyConfigured(message)


# ---------------------------------------------------------------- documentation


def options_table() -> str:
    """The Markdown table of every option, as the README and docs/configuration.md show it."""
    lines = ["| option | default | unit | meaning |", "|---|---|---|---|"]
    for option in OPTIONS:
        lines.append(
            f"| `{option.name}` | {option.documented_default} | {option.unit or '—'} "
            f"| {option.help} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m django_pgpool.config --markdown``: print the options table."""
    parser = argparse.ArgumentParser(
        prog="python -m django_pgpool.config",
        description="Print the table of pool options for the documentation.",
    )
    parser.add_argument("--markdown", action="store_true", required=True, help="as Markdown")
    parser.parse_args(argv)
    print(options_table(), end="")


if __name__ == "__main__":
    main()
