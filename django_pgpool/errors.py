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


def connect_error(pool_name: str, exc: BaseException) -> BaseException:
    """``exc``, a failed attempt to open a connection, as the request that needed it hears it.

    psycopg2's errors say what the server said but not which pool asked; the
    same error, of the same class, is raised with the pool named first
    (the original is its ``__cause__``). Anything else (a hook that raised,
    a value libpq can't take) already says what it is and is left alone.
    """
    if not isinstance(exc, psycopg2.Error) or isinstance(exc, PoolError):
        return exc
    text = str(exc).strip()
    named = type(exc)(f"pool {pool_name!r} could not open a connection: {text}")
    named.__cause__ = exc
    return named


def requests(count: int, *, were: bool = False) -> str:
    """ "1 request is" / "3 requests are" (or "was" / "were"), for messages."""
    if count == 1:
        return f"1 request {'was' if were else 'is'}"
    return f"{count} requests {'were' if were else 'are'}"


def unreachable_message(pool_name: str, unreachable: str, unreachable_for: float) -> str:
    """Why a request fails at once once a request has waited out the outage in vain."""
    return (
        f"pool {pool_name!r}: the database could not be reached for the last "
        f"{unreachable_for:.1f} s (last error: {unreachable}). A request already waited the "
        f"pool's whole timeout for it, so requests fail at once until it can be reached "
        f"again; the pool keeps trying to reconnect in the background."
    )


def timeout_message(
    pool_name: str,
    waited_for: float,
    *,
    max_size: int,
    waiting: int,
    in_use: int,
    holders: Sequence[tuple[str, float, str]],
    unreachable: str | None,
    unreachable_for: float,
    opening: int,
) -> str:
    """Why a request got no connection within ``timeout``, and what to do about it.

    ``holders`` are (thread name, seconds held, what it is doing: "idle",
    "in a transaction" or "running a query") for the checked-out
    connections, longest held first; ``unreachable`` the last connection
    error while the database cannot be reached.
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
            f"{requests(waiting, were=True)} waiting. "
            f"{_describe_holders(holders, waited_for)}Raise "
            f"OPTIONS['pool']['max_size'] if the database has room, or make those give their "
            f"connection back sooner."
        )
    return f"pool {pool_name!r}: no connection became available within {waited_for:g} s. {reason}"


#: asyncio names the threads of an event loop's default executor "asyncio_0",
#: "asyncio_1"...: where ``sync_to_async(thread_sensitive=False)`` runs code.
EVENT_LOOP_EXECUTOR_PREFIX = "asyncio_"


def _describe_holders(
    holders: Sequence[tuple[str, float, str]], waited_for: float, most: int = 5
) -> str:
    if not holders:
        return ""
    parts = [f"{name} for {held_for:.1f} s, {doing}" for name, held_for, doing in holders[:most]]
    more = f" and {len(holders) - most} more" if len(holders) > most else ""
    return f"Held by: {'; '.join(parts)}{more}.{_holders_hint(holders, waited_for)} "


def _holders_hint(holders: Sequence[tuple[str, float, str]], waited_for: float) -> str:
    """Name the usual cause of connections held for nothing, only where it is the cause.

    It is when a holder is an event loop's executor thread, or has held its
    connection, idle, for longer than the request waited: ordinary requests
    between two queries are neither.
    """
    executors = [name for name, _, _ in holders if name.startswith(EVENT_LOOP_EXECUTOR_PREFIX)]
    if executors:
        return (
            f" {executors[0]} is an event loop executor thread: code run by "
            f"sync_to_async(thread_sensitive=False) keeps its connection until it is closed, "
            f"since Django's request cycle doesn't close connections there (wrap such code "
            f"with django_pgpool.closing_connections)."
        )
    if any(doing == "idle" and held_for > waited_for for _, held_for, doing in holders):
        return (
            " Connections held idle for longer than a request waits are usually kept by "
            "threads outside Django's request cycle (threads you start, thread pools, "
            "sync_to_async(thread_sensitive=False)), which keep their connection until it is "
            "closed (wrap such code with django_pgpool.closing_connections)."
        )
    return ""


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
