"""``DATABASES`` entries from a database URL, pool options included.

::

    # settings.py
    from django_pgpool.url import database_from_url

    DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}

    # DATABASE_URL=postgres://shop:secret@db.internal:5432/shop?pool_max_size=20&pool_timeout=5&sslmode=require

Query parameters:

- ``pool_<option>`` sets ``OPTIONS["pool"][<option>]``, converted with the
  option table of :mod:`django_pgpool.config`: whole numbers for sizes,
  seconds for times (``none`` where ``None`` is allowed), ``true``/``false``
  for ``reset``. Options that take a callable (``check``, ``configure``,
  ``connect_params``) or a SQL ``reset`` can't be written in a URL: pass them
  in Python with ``OPTIONS={"pool": {...}}`` among the overrides.
- ``pool=false`` turns pooling off for the alias (``pool=true``: the defaults).
- ``isolation_level`` takes a name (``read_committed``, ``repeatable_read``,
  ``serializable``, ``read_uncommitted``) or psycopg2's number;
  ``assume_role`` is passed to Django; ``currentSchema=s`` becomes
  ``options=-c search_path=s``, as dj-database-url does.
- Any other parameter must be a libpq connection parameter (``sslmode``,
  ``sslrootcert``, ``application_name``, ``connect_timeout``, ``options``,
  ``target_session_attrs``...) and goes to ``OPTIONS`` as it is.

A parameter that is none of these, a value of the wrong type or out of range,
a repeated parameter or an invalid combination raises ``ImproperlyConfigured``
naming the parameter. No message contains the URL or its password: a URL
whose user name or password holds a character that should have been
percent-encoded (``/ ? # @``) is refused as a whole, before any of its
parts is named.

Importing this module loads neither Django's database backend nor psycopg 3,
so it is safe to use in a settings module.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg2.extensions
from django.core.exceptions import ImproperlyConfigured

from .config import (
    OPTIONS,
    PEER_OPTION_NAMES,
    Option,
    check_connection_settings,
    is_libpq_keyword,
    parse_pool_options,
    pool_is_enabled,
    suggest_connection_option,
)
from .validation import InvalidValue, describe

ENGINE = "django_pgpool"

#: URL schemes read as PostgreSQL.
SCHEMES = ("postgres", "postgresql", "pgsql", "pgpool", "django-pgpool")

#: The prefix of the query parameters that hold pool options.
POOL_PREFIX = "pool_"

_TRUE = frozenset(("true", "1", "yes", "on"))
_FALSE = frozenset(("false", "0", "no", "off"))
_NONE = frozenset(("none", "null"))

_ISOLATION_LEVELS = {
    "read_uncommitted": psycopg2.extensions.ISOLATION_LEVEL_READ_UNCOMMITTED,
    "read_committed": psycopg2.extensions.ISOLATION_LEVEL_READ_COMMITTED,
    "repeatable_read": psycopg2.extensions.ISOLATION_LEVEL_REPEATABLE_READ,
    "serializable": psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
}

# Keys of OPTIONS that Django's PostgreSQL backend reads itself, written in a
# URL as text.
_DJANGO_OPTIONS = frozenset(("isolation_level", "assume_role"))

# Numbers as a URL writes them: ASCII digits only (Python's int() and float()
# would also take "²", Arabic-Indic digits and "1_000").
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")

_URL_OPTIONS = {option.name: option for option in OPTIONS if option.kind != "callable"}
_POOL_PARAMETERS = tuple(POOL_PREFIX + name for name in _URL_OPTIONS)


def database_from_url(url: str, *, alias: str = "default", **overrides: Any) -> dict[str, Any]:
    """A full ``DATABASES`` entry (ENGINE ``django_pgpool``) for a PostgreSQL URL.

    ``overrides`` are keys of the entry (``CONN_HEALTH_CHECKS``,
    ``DISABLE_SERVER_SIDE_CURSORS``, ``TEST``...) that replace the URL's;
    ``OPTIONS`` is merged over the URL's options, and its ``"pool"`` dict over
    the URL's pool options. ``alias`` is only used in error messages.
    """
    try:
        parts = urlsplit(url)
        # A user name or password holding an unencoded "/", "?" or "#" ends
        # the host part early, and the rest of it reads as the database name
        # or the query: any message naming those would show the password.
        if "@" in parts.path + parts.query + parts.fragment:
            raise ImproperlyConfigured(
                "The database URL is not valid: it has an '@' after its host part. A user "
                "name or password holding '@', '/', '?', '#' or ':' must be percent-encoded "
                "(urllib.parse.quote(password, safe='')), and so must an '@' in the database "
                "name or a query value (%40)."
            )
        port = parts.port
    except ValueError:
        raise ImproperlyConfigured(
            "The database URL is not valid: its parts (user, password, host, port, "
            "database) must be percent-encoded and the port a number from 1 to 65535."
        ) from None
    if parts.scheme not in SCHEMES:
        raise ImproperlyConfigured(
            f"The database URL has the scheme {parts.scheme + '://' if parts.scheme else 'none'}; "
            f"django_pgpool needs a PostgreSQL URL: {', '.join(s + '://' for s in SCHEMES)}."
        )
    entry: dict[str, Any] = {
        "ENGINE": ENGINE,
        "NAME": unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": unquote(parts.hostname or ""),
        "PORT": str(port) if port else "",
        "CONN_MAX_AGE": 0,
    }
    params = parse_qsl(parts.query, keep_blank_values=True)
    entry["OPTIONS"] = _options_from_parameters(params)
    return _finish(alias, entry, overrides)


def from_dj_database_url(config: Mapping[str, Any], *, alias: str = "default") -> dict[str, Any]:
    """Adapt what ``dj_database_url.parse()`` / ``.config()`` returns to django_pgpool.

    ENGINE becomes ``django_pgpool`` and the ``pool_*`` parameters dj-database-url
    left in ``OPTIONS`` become ``OPTIONS["pool"]``, converted and checked as
    :func:`database_from_url` does. Everything else is kept, ``CONN_MAX_AGE``
    included (it must be 0 while pooling: dj-database-url's default).
    """
    engine = config.get("ENGINE")
    if engine not in (None, ENGINE, "django.db.backends.postgresql"):
        raise ImproperlyConfigured(
            f"from_dj_database_url() needs the settings of a PostgreSQL URL, but ENGINE is "
            f"{engine!r}; use a postgres:// URL."
        )
    entry = {key: value for key, value in config.items() if key != "OPTIONS"}
    entry["ENGINE"] = ENGINE
    entry.setdefault("CONN_MAX_AGE", 0)
    options = config.get("OPTIONS") or {}
    entry["OPTIONS"] = _options_from_parameters(options.items())
    return _finish(alias, entry, {})


def _finish(alias: str, entry: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    overrides = dict(overrides)
    extra_options = dict(overrides.pop("OPTIONS", None) or {})
    entry.update(overrides)
    options = entry["OPTIONS"]
    extra_pool = extra_options.pop("pool", None)
    options.update(extra_options)
    if isinstance(extra_pool, Mapping) and isinstance(options.get("pool"), Mapping):
        options["pool"] = {**options["pool"], **extra_pool}
    elif extra_pool is not None:
        options["pool"] = extra_pool
    # Now rather than at the first query: CONN_MAX_AGE, max_size < min_size,
    # a NUL byte in the password...
    if pool_is_enabled(entry):
        parse_pool_options(alias, entry)
    else:
        check_connection_settings(alias, entry)
    return entry


def _options_from_parameters(params: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    pool: dict[str, Any] = {}
    seen: set[str] = set()
    for name, value in params:
        if name in seen:
            raise ImproperlyConfigured(
                f"Database URL parameter {name!r} is given twice; give it once."
            )
        seen.add(name)
        if isinstance(value, list):
            # dj-database-url turns a repeated parameter into a list.
            raise ImproperlyConfigured(
                f"Database URL parameter {name!r} is given {len(value)} times; give it once."
            )
        if name == "pool":
            options["pool"] = _pool_switch(value)
        elif name.startswith(POOL_PREFIX):
            option = _URL_OPTIONS.get(name[len(POOL_PREFIX) :])
            if option is None:
                raise ImproperlyConfigured(_unknown_pool_parameter(name))
            pool[option.name] = _pool_value(name, option, value)
        elif name == "isolation_level":
            options[name] = _isolation_level(value)
        elif name == "currentSchema":
            options["options"] = f"-c search_path={value}"
        elif name in _DJANGO_OPTIONS:
            options[name] = value
        else:
            _check_libpq_parameter(name)
            options[name] = value
    if pool:
        min_size = pool.get("min_size", _URL_OPTIONS["min_size"].default)
        max_size = pool.get("max_size", _URL_OPTIONS["max_size"].default)
        if max_size < min_size:
            raise ImproperlyConfigured(
                f"Database URL parameters give min_size={min_size} and max_size={max_size} "
                f"(pool_min_size, pool_max_size; 1 and 10 when left out): max_size must be >= "
                f"min_size. Raise pool_max_size or lower pool_min_size."
            )
        if options.get("pool") is False:
            raise ImproperlyConfigured(
                "Database URL parameters pool=false and "
                f"{', '.join(POOL_PREFIX + key for key in pool)} contradict each other: "
                f"remove pool=false to pool, or the pool_ parameters not to."
            )
        options["pool"] = pool
    elif options.get("pool") is True:
        options["pool"] = {}
    return options


def _pool_switch(value: Any) -> bool:
    text = str(value).strip().lower()
    if value is True or text in _TRUE:
        return True
    if value is False or text in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"Database URL parameter pool={value!r} is invalid: it must be true (pool, the "
        f"default) or false (plain connections, no pool)."
    )


def _pool_value(name: str, option: Option, raw: Any) -> Any:
    def invalid(why: str) -> ImproperlyConfigured:
        return ImproperlyConfigured(
            f"Database URL parameter {name}={describe(raw)} is invalid: {why}."
        )

    text = str(raw).strip()
    value: Any
    if option.kind in ("connections", "requests"):
        if isinstance(raw, bool) or not (isinstance(raw, int) or _WHOLE_NUMBER.fullmatch(text)):
            raise invalid(
                f"{option.name} is a whole number of {option.unit}, for example {option.default}"
            )
        # Past a few thousand digits int() refuses; far fewer are out of range anyway.
        value = int(text) if len(text) <= 20 else (sys.maxsize + 1) * (-1 if "-" in text else 1)
    elif option.kind in ("seconds", "optional seconds"):
        if text.lower() in _NONE:
            if option.kind != "optional seconds":
                raise invalid(f"{option.name} cannot be none; give a number of seconds")
            value = None
        elif isinstance(raw, bool) or not _DECIMAL.fullmatch(text):
            allowed = " or none" if option.kind == "optional seconds" else ""
            raise invalid(
                f"{option.name} is a number of seconds{allowed}, for example {option.default:g}"
            )
        else:
            value = float(text)
            if not math.isfinite(value):  # 1e400: as out of range as the largest float
                value = math.copysign(sys.float_info.max, value)
    elif option.kind == "reset":
        if raw is True or text.lower() in _TRUE:
            value = True
        elif raw is False or text.lower() in _FALSE:
            value = False
        else:
            raise invalid(
                "in a URL, reset is true (restore a fresh session) or false (roll back only); "
                "a SQL reset or a callable goes in OPTIONS['pool']['reset'], in Python"
            )
    else:  # the pool's name
        value = text
    # min_size against max_size is for the caller, with both known.
    try:
        return option.validate(value)
    except InvalidValue as exc:
        raise invalid(f"{option.name} {exc}") from None


def _unknown_pool_parameter(name: str) -> str:
    suffix = name[len(POOL_PREFIX) :]
    callables = [option.name for option in OPTIONS if option.kind == "callable"]
    if suffix in callables:
        return (
            f"Database URL parameter {name!r} is invalid: {suffix} takes a callable, which a "
            f"URL can't hold; pass OPTIONS={{'pool': {{{suffix!r}: ...}}}} in Python."
        )
    hint = _suggestion(name)
    return (
        f"Database URL parameter {name!r} is not a pool option.{hint} Pool parameters: "
        f"{', '.join(_POOL_PARAMETERS)}."
    )


def _suggestion(name: str) -> str:
    """The pool parameter someone probably meant (another package's name, or a typo)."""
    lowered = name.lower()
    peer = PEER_OPTION_NAMES.get(lowered) or PEER_OPTION_NAMES.get(
        lowered.removeprefix(POOL_PREFIX)
    )
    if peer is not None and " " not in peer:
        return f" django_pgpool calls it {POOL_PREFIX + peer!r}."
    close = difflib.get_close_matches(name, _POOL_PARAMETERS, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _isolation_level(value: Any) -> int:
    text = str(value).strip().lower().replace(" ", "_")
    if text in _ISOLATION_LEVELS:
        return _ISOLATION_LEVELS[text]
    if text.isdigit() and int(text) in _ISOLATION_LEVELS.values():
        return int(text)
    raise ImproperlyConfigured(
        f"Database URL parameter isolation_level={value!r} is invalid: use one of "
        f"{', '.join(_ISOLATION_LEVELS)}."
    )


def _check_libpq_parameter(name: str) -> None:
    if not is_libpq_keyword(name):
        hint = _suggestion(name) or suggest_connection_option(name)
        raise ImproperlyConfigured(
            f"Database URL parameter {name!r} is neither a pool option (pool_...) nor a "
            f"libpq connection parameter.{hint}"
        )
