"""The exceptions the pool raises.

Each one is, at the same time:

- a ``psycopg2.pool.PoolError`` and a ``psycopg2.OperationalError``, so code
  ported from psycopg2's own pool keeps catching what it caught before;
- a ``django.db.OperationalError``, so the handlers a Django project already
  has for "the database is unavailable" catch pool trouble too.

The messages that explain them are built here too, from what the pool saw.

Configuration mistakes are not here: they are Django's ``ImproperlyConfigured``,
raised by :mod:`django_pgpool.config`.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# ---------------------------------------------------------------------- messages


def requests(count: int, *, were: bool = False) -> str:
    """ "1 request is" / "3 requests are" (or "was" / "were"), for messages."""
    if count == 1:
        return f"1 request {'was' if were else 'is'}"
    return f"{count} requests {'were' if were else 'are'}"


def timeout_message(
    pool_name: str,
    waited_for: float,
    *,
    max_size: int,
    waiting: int,
    in_use: int,
    holders: Sequence[tuple[str, float, bool]],
    unreachable: str | None,
    unreachable_for: float,
    opening: int,
) -> str:
    """Why a request got no connection within ``timeout``, and what to do about it.

    ``holders`` are (thread name, seconds held, in a transaction) for the
    checked-out connections, longest held first; ``unreachable`` the last
    connection error while the database cannot be reached.
    """
    if unreachable is not None:
        reason = (
            f"The database could not be reached for the last {unreachable_for:.1f} s (last "
            f"error: {unreachable}); the pool keeps trying to reconnect. "
            f"{requests(waiting, were=True)} waiting."
        )
    elif opening:
        reason = (
            f"{opening} new connection(s) were still being opened (logging in, or the first "
            f"statement on it, is slow: is a proxy such as PgBouncer out of server "
            f"connections?). {requests(waiting, were=True)} waiting."
        )
    else:
        reason = (
            f"All {max_size} connections (max_size) were in use ({in_use} checked out) and "
            f"{requests(waiting, were=True)} waiting. {_describe_holders(holders)}Raise "
            f"OPTIONS['pool']['max_size'] if the database has room, or make those give their "
            f"connection back sooner."
        )
    return f"pool {pool_name!r}: no connection became available within {waited_for:g} s. {reason}"


def _describe_holders(holders: Sequence[tuple[str, float, bool]], most: int = 5) -> str:
    if not holders:
        return ""
    parts = [
        f"{name} for {held_for:.1f} s{', in a transaction' if busy else ', idle'}"
        for name, held_for, busy in holders[:most]
    ]
    more = f" and {len(holders) - most} more" if len(holders) > most else ""
    hint = (
        " Threads that hold a connection while idle are the usual cause: code run by "
        "sync_to_async(thread_sensitive=False) or in threads you start keeps its "
        "connection until it is closed (wrap such code with "
        "django_pgpool.closing_connections)."
        if any(not busy for _, _, busy in holders[:most])
        else ""
    )
    return f"Held by: {'; '.join(parts)}{more}.{hint} "


def too_many_requests_message(pool_name: str, waiting: int, max_size: int, max_waiting: int) -> str:
    return (
        f"pool {pool_name!r}: {requests(waiting)} already waiting for one of its {max_size} "
        f"connections (max_waiting={max_waiting}); raise max_waiting or max_size, or shed load"
    )


def paused_message(pool_name: str, waited_for: float, *, waiting: int, in_use: int) -> str:
    """Why a request got no connection within ``timeout`` from a paused pool."""
    return (
        f"pool {pool_name!r}: no connection became available within {waited_for:g} s: the "
        f"pool is paused (pool.pause() or manage.py pgpool pause) and {requests(waiting)} "
        f"waiting, {in_use} connection(s) still in use. Resume it (pool.resume() or manage.py "
        f"pgpool resume), or keep pauses shorter than OPTIONS['pool']['timeout']."
    )
