"""Watching checkouts as they happen.

The pool looks at :data:`WATCHING` once per checkout: while it is empty (the
default) checkouts are not timed and nobody is told about them. Something that
wants to see them (the acquire-time histogram of :mod:`.counters`, the
debug-toolbar panel of :mod:`django_pgpool.debug_toolbar`) calls :func:`watch`;
then the pool reads the clock when ``getconn()`` is called and, once the
connection is handed out, calls :func:`checked_out` in the thread that took it
(never with the pool's lock held), which records the acquire time and tells
each observer added with :func:`add_observer`.

No Django here: the pool imports this module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import counters

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")

#: Non-empty while anything watches checkouts (one entry per :func:`watch`).
#: The pool imports this list and tests it on every checkout; it is only ever
#: changed in place.
WATCHING: list[bool] = []

_observers: list[Callable[[Checkout], None]] = []
_lock = threading.Lock()


class Checkout:
    """One checkout, as an observer sees it (all local state: no round trip)."""

    __slots__ = (
        "age",
        "backend_pid",
        "idle",
        "in_use",
        "pool",
        "reset_pending",
        "reused",
        "waited",
        "waiting",
    )

    def __init__(self, pool: ConnectionPool, conn: Any, waited: float, reset_pending: bool) -> None:
        entry = conn.pool_entry
        now = time.monotonic()
        slots = pool.slots
        self.pool = pool
        #: Seconds from ``getconn()`` being called to the connection being handed out.
        self.waited = waited
        #: Whether the connection was opened before this checkout asked for one.
        self.reused = entry.created_at < now - waited
        #: Seconds since the connection was opened.
        self.age = now - entry.created_at
        #: The server process serving it (psycopg2 knows it locally).
        self.backend_pid: int = conn.info.backend_pid
        #: Whether its session reset was still to be read when it was taken.
        self.reset_pending = reset_pending
        # The pool at that moment (read without the lock: for display).
        self.in_use = len(slots.checked_out)
        self.idle = len(slots.idle)
        self.waiting = len(slots.waiters)


def checked_out(pool: ConnectionPool, conn: Any, waited: float, reset_pending: Any) -> None:
    """Called by the pool, while :data:`WATCHING`, for each connection it hands out.

    ``waited``: seconds since ``getconn()`` was called; ``reset_pending``:
    whether the connection's reset was still unread when it was taken. Never
    raises: an observer that fails is logged.
    """
    timings = pool.counters.timings
    if timings is not None:
        # No lock: the next return (which holds it anyway) counts it.
        timings.acquired.append(waited)
    elif counters.timings_enabled():
        counters.attach_timings(pool.counters)
    observers = _observers
    if not observers:
        return
    try:
        checkout = Checkout(pool, conn, waited, bool(reset_pending))
        for observer in observers:
            observer(checkout)
    except Exception:
        logger.exception("pool %r: a checkout observer failed", pool.name)


def watch() -> None:
    """Have the pool time every checkout and call :func:`checked_out` (until :func:`unwatch`)."""
    with _lock:
        WATCHING.append(True)


def unwatch() -> None:
    with _lock:
        if WATCHING:
            WATCHING.pop()


def add_observer(observer: Callable[[Checkout], None]) -> None:
    """Call ``observer(checkout)`` for every checkout from now on (in the taking thread)."""
    global _observers
    with _lock:
        # Copy on write: the pool's threads iterate the list without the lock.
        _observers = [*_observers, observer]
        WATCHING.append(True)


def remove_observer(observer: Callable[[Checkout], None]) -> None:
    global _observers
    with _lock:
        if observer in _observers:
            remove = list(_observers)
            remove.remove(observer)
            _observers = remove
            WATCHING.pop()
