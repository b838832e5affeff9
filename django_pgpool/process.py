"""The process a pool lives in: its live pools, ``fork()``, and interpreter exit.

Pools belong to the process that built them. After ``fork()`` the child must
never use the parent's connections (they share sockets with the parent), so
the single fork hook below abandons every inherited pool without a word to the
server, forgets the forking thread's checkouts, and then runs the callbacks
other modules registered (the registry forgets its pools, Django wrappers drop
inherited connections). At exit the process's pools close quietly.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from .pool import ConnectionPool

_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()
_after_fork_callbacks: list[Callable[[], None]] = []


def track(pool: ConnectionPool) -> None:
    """Count ``pool`` among the process's live pools until :func:`untrack`."""
    _live_pools.add(pool)


def untrack(pool: ConnectionPool) -> None:
    _live_pools.discard(pool)


def live_pools() -> list[ConnectionPool]:
    """This process's pools: open ones, and closed ones still waiting for
    checked-out connections to come back."""
    pid = os.getpid()
    return [pool for pool in list(_live_pools) if pool.pid == pid]


def after_fork_in_child(callback: Callable[[], None]) -> None:
    """Run ``callback`` in a forked child, after the inherited pools are abandoned."""
    _after_fork_callbacks.append(callback)


def detach_sockets(connections: Sequence[Any]) -> None:
    """Point each connection's socket at ``/dev/null`` in this process.

    Closing an inherited libpq connection would send a Terminate message down
    the socket the parent is still using; once its descriptor points at
    ``/dev/null``, whatever libpq writes on it goes nowhere and the connection
    object can be dropped.
    """
    if not connections:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in connections:
            try:
                fd = conn.fileno()
            except Exception:
                continue  # already closed
            with suppress(OSError):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def park_forever() -> NoReturn:
    """Never return, for a background thread that finds itself in a forked child.

    Only green threads get here: with gevent's monkey-patching, the pool's
    threads are greenlets, and greenlets (unlike OS threads) are copied into
    a child by ``fork()``. The pool they served belongs to the parent, and
    ``threading`` forgot them in the child, so finishing would make it raise
    ``KeyError``. Parked on an event nobody sets, such a greenlet costs nothing.
    """
    forever = threading.Event()
    while True:
        forever.wait()


def _in_forked_child() -> None:
    pid = os.getpid()
    for pool in list(_live_pools):
        if pool.pid != pid:
            pool.abandon_after_fork()
    for callback in _after_fork_callbacks:
        with suppress(Exception):  # never fail a fork
            callback()


def _at_exit() -> None:
    for pool in live_pools():
        if not pool.closed:
            with suppress(Exception):  # never a traceback at exit
                pool.close(timeout=1.0, at_exit=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)
atexit.register(_at_exit)
