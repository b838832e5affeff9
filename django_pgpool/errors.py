"""The exceptions the pool raises.

Each one is, at the same time:

- a ``psycopg2.pool.PoolError`` and a ``psycopg2.OperationalError``, so code
  ported from psycopg2's own pool keeps catching what it caught before;
- a ``django.db.OperationalError``, so the handlers a Django project already
  has for "the database is unavailable" catch pool trouble too.

Configuration mistakes are not here: they are Django's ``ImproperlyConfigured``,
raised by :mod:`django_pgpool.config`.
"""

from __future__ import annotations

import psycopg2
import psycopg2.pool
from django.db.utils import OperationalError as DjangoOperationalError


class PoolError(psycopg2.pool.PoolError, psycopg2.OperationalError, DjangoOperationalError):
    """Base class of every error raised by the pool itself."""


class PoolTimeout(PoolError):
    """No connection became available within the pool's ``timeout``."""

    def __init__(
        self,
        message: str,
        *,
        pool_name: str = "",
        max_size: int = 0,
        timeout: float = 0.0,
        waiting: int = 0,
    ) -> None:
        super().__init__(message)
        self.pool_name = pool_name
        self.max_size = max_size
        self.timeout = timeout
        self.waiting = waiting


class TooManyRequests(PoolError):
    """More requests are already waiting than the pool's ``max_waiting`` allows."""


class PoolClosed(PoolError):
    """The pool was closed (by ``close_pool()``, a settings change or a fork)."""
