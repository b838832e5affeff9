"""django_pgpool: a connection pool for Django on PostgreSQL with psycopg2.

Use it as a database ENGINE::

    DATABASES = {"default": {"ENGINE": "django_pgpool", ..., "OPTIONS": {"pool": {...}}}}

This module also gives code outside the ORM (scripts, management commands,
libraries) the same per-process pool as the ORM::

    with django_pgpool.connection("default") as conn:   # commit / rollback / return
        ...
    conn = django_pgpool.getconn("default"); ...; django_pgpool.putconn(conn)
    django_pgpool.get_pool("default").stats()

Importing it does not load Django's database backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .closing import closing_connections
from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests

if TYPE_CHECKING:
    from .pool import ConnectionPool

__version__ = "0.1.0"

__all__ = [
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
    "close_pools",
    "closeall",
    "closing_connections",
    "connection",
    "get_pool",
    "getconn",
    "putconn",
    "stats",
]


# Not called pool(): importing the django_pgpool.pool module (which Django's
# backend does) would replace a package attribute of that name.
def get_pool(alias: str = "default") -> ConnectionPool:
    """The pool of a database alias in this process, built on first use."""
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    from .base import DatabaseWrapper

    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}] does not use django_pgpool (ENGINE is "
            f"{wrapper.settings_dict.get('ENGINE')!r}); set ENGINE to 'django_pgpool'."
        )
    current = wrapper.pool
    if current is None:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['pool'] is False: this alias does not pool."
        )
    return current


@contextmanager
def connection(alias: str = "default", timeout: float | None = None) -> Iterator[Any]:
    """A raw psycopg2 connection from the alias's pool for a ``with`` block.

    The block is one transaction: it is committed when the block succeeds and
    rolled back when it raises. The connection always goes back to the pool
    (reset, like every connection the pool takes back). Waits up to ``timeout``
    seconds (default: the pool's) for a connection, as ORM requests do.
    """
    with get_pool(alias).connection(timeout=timeout) as conn:
        yield conn


def getconn(alias: str = "default", timeout: float | None = None) -> Any:
    """Take a raw psycopg2 connection from the alias's pool; give it back with :func:`putconn`.

    As with psycopg2's own pools, the connection is not in autocommit: the
    first statement begins a transaction that the caller commits. Whatever is
    left uncommitted when it is given back is rolled back.
    """
    conn = get_pool(alias).getconn(timeout=timeout)
    conn.autocommit = False
    return conn


def putconn(conn: Any, close: bool = False) -> None:
    """Give back a connection taken with :func:`getconn` (``close=True`` discards it)."""
    from .pooled_connection import pool_of

    owner = pool_of(conn)
    if owner is None:
        raise PoolError("this connection was not taken from a django_pgpool pool")
    owner.putconn(conn, close=close)


def closeall(alias: str = "default") -> None:
    """Close the alias's pool (connections in use close as they come back).

    Unlike psycopg2's ``closeall()``, the alias stays usable: its next
    connection comes from a new pool.
    """
    from . import registry

    registry.close(alias)


def close_pools() -> None:
    """Close every pool of this process, for all aliases."""
    from . import registry

    registry.close_all()


def stats() -> dict[str, dict[str, Any]]:
    """Statistics of every pool in this process, by alias."""
    from . import registry

    return {alias: p.stats() for alias, p in registry.pools().items()}
