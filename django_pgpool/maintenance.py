"""Changing a running pool: its sizes, its connections, whether it hands any out.

The bodies of :meth:`ConnectionPool.resize`, :meth:`~ConnectionPool.drain`,
:meth:`~ConnectionPool.pause` and :meth:`~ConnectionPool.resume`. Each
changes the pool's bookkeeping under its lock and leaves the network work
(closing the connections it retires, opening the ones waiting requests need)
to be done outside it. Reaching every process of a deployment at once is
:mod:`.control`'s job.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

from . import validation

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")


def resize(pool: ConnectionPool, min_size: int | None, max_size: int | None) -> None:
    slots = pool.slots
    new_min = slots.min_size if min_size is None else min_size
    new_max = slots.max_size if max_size is None else max_size
    for name, value, lowest in (("min_size", new_min, 0), ("max_size", new_max, 1)):
        validation.argument(
            f"pool {pool.name!r}: resize",
            name,
            value,
            functools.partial(validation.connection_count, minimum=lowest),
        )
    if new_max < new_min:
        raise ValueError(
            f"pool {pool.name!r}: resize() would leave max_size={new_max} below "
            f"min_size={new_min}: max_size must be >= min_size."
        )
    with slots.lock:
        slots.min_size, slots.max_size = new_min, new_max
        surplus: list[Any] = []
        while slots.size - len(surplus) > new_max and slots.idle:
            surplus.append(slots.idle.pop(0))
        _open_for_waiters_locked(pool)  # room to grow
    for conn in surplus:
        pool.retire(conn, "the pool was resized")
    logger.info("pool %r: resized to min_size=%d, max_size=%d", pool.name, new_min, new_max)
    _wake_worker(pool)


def drain(pool: ConnectionPool) -> None:
    with pool.slots.lock:
        pool.generation += 1  # connections of older generations are retired
    retired = pool.slots.take_idle(lambda idle: idle)
    for conn in retired:
        pool.retire(conn, "the pool was drained")
    logger.info("pool %r: drained (%d idle connections closed)", pool.name, len(retired))
    _wake_worker(pool)


def pause(pool: ConnectionPool) -> None:
    slots = pool.slots
    with slots.lock:
        if slots.paused or slots.closed:
            return
        slots.paused = True
    logger.info("pool %r: paused (new checkouts wait until it is resumed)", pool.name)


def resume(pool: ConnectionPool) -> None:
    slots = pool.slots
    now = time.monotonic()
    with slots.lock:
        if not slots.paused:
            return
        for conn in slots.idle:
            # Handed straight to a waiter, it would skip the idle check.
            if now - conn.pool_entry.last_used > pool.liveness.check_window:
                conn.pool_entry.suspect = True
        slots.resume_locked()
        _open_for_waiters_locked(pool)
    logger.info("pool %r: resumed", pool.name)
    _wake_worker(pool)


def _open_for_waiters_locked(pool: ConnectionPool) -> None:
    """Open connections now for the waiting requests the pool has room for. Lock held."""
    slots = pool.slots
    room = min(slots.max_size - slots.size, len(slots.waiters) - slots.opening - slots.resetting)
    if pool.outage.error is None:
        for _ in range(max(0, room)):
            slots.size += 1
            slots.opening += 1
            pool.opener.start_connector()


def _wake_worker(pool: ConnectionPool) -> None:
    """Housekeeping may be due at once (min_size to open, the surplus to close)."""
    if pool.worker is not None:
        pool.worker.signal()
