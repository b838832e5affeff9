"""The process's pools: one per database alias, rebuilt when its settings change.

A pool's connection parameters and session settings are frozen when it is
built, as in Django's native pool. Each time Django opens a connection the
parameters it would use are compared with the pool's ("identity"); when they
differ (the test runner switching ``NAME`` to the test database,
``override_settings``, a ``TIME_ZONE`` change) the old pool is retired and a
new one built. A pool never serves a database or settings it wasn't built for.

Pools belong to the process that built them: after ``fork()`` the child starts
with none (:mod:`.process` runs :func:`_forget_pools_in_child` there).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

from . import process
from .pool import ConnectionPool
from .pooled_connection import pool_of

_pools: dict[str, ConnectionPool] = {}
_identities: dict[str, Hashable] = {}
_lock = threading.Lock()


def lookup(alias: str, identity: Any) -> ConnectionPool | None:
    """The alias's pool if it was built for exactly ``identity`` in this process."""
    pool = _pools.get(alias)
    if (
        pool is not None
        and not pool.closed
        and pool.pid == os.getpid()
        and _identities.get(alias) == identity
    ):
        return pool
    return None


def install(alias: str, identity: Any, build: Callable[[], ConnectionPool]) -> ConnectionPool:
    """Return the alias's pool for ``identity``, building it (and retiring the old one)."""
    with _lock:
        pool = lookup(alias, identity)
        if pool is not None:
            return pool
        new_pool = build()
        old_pool = _pools.get(alias)
        _pools[alias] = new_pool
        _identities[alias] = identity
    if old_pool is not None:
        # Connections still checked out from it are closed as they come back.
        old_pool.close()
    return new_pool


def get(alias: str) -> ConnectionPool | None:
    """The alias's current pool in this process, if one was built."""
    pool = _pools.get(alias)
    if pool is not None and pool.pid != os.getpid():
        return None
    return pool


def pools() -> dict[str, ConnectionPool]:
    """Every alias's current pool in this process."""
    pid = os.getpid()
    return {alias: pool for alias, pool in list(_pools.items()) if pool.pid == pid}


def close(alias: str) -> None:
    """Close the alias's pool; the next connection builds a new one."""
    with _lock:
        pool = _pools.pop(alias, None)
        _identities.pop(alias, None)
    if pool is not None:
        pool.close()


def close_all() -> None:
    """Close every pool of this process."""
    with _lock:
        closing = list(_pools.values())
        _pools.clear()
        _identities.clear()
    for pool in closing:
        pool.close()


def close_for_database(database_name: str, *, force: bool = False) -> None:
    """Close the pools of every alias connected to ``database_name``.

    ``CREATE DATABASE ... TEMPLATE`` and ``DROP DATABASE`` fail while other
    sessions use the database; an alias other than the one being created or
    destroyed (a replica alias, a test mirror) may be pooling connections to it.
    With ``force``, connections still checked out are closed too.
    """
    with _lock:
        aliases = [
            alias
            for alias, identity in _identities.items()
            if _database_of(identity) == database_name
        ]
        closing = {id(pool): pool for pool in (_pools.pop(alias) for alias in aliases)}
        for alias in aliases:
            _identities.pop(alias, None)
    # Pools retired by a settings change may still have connections out.
    for pool in process.live_pools():
        if pool.dbname == database_name:
            closing[id(pool)] = pool
    for pool in closing.values():
        pool.close(force=force)


def _database_of(identity: Any) -> Any:
    connect_kwargs = identity[0] if isinstance(identity, tuple) and identity else None
    return connect_kwargs.get("dbname") if isinstance(connect_kwargs, dict) else None


def _forget_pools_in_child() -> None:
    """After fork: the parent's pools are not ours (:mod:`.process` detached their sockets)."""
    global _lock
    _lock = threading.Lock()
    _pools.clear()
    _identities.clear()
    _drop_inherited_django_connections()


def _drop_inherited_django_connections() -> None:
    # The thread that forked may hold connections in its Django wrappers
    # (gunicorn --preload after a query at import time). They are the
    # parent's: forget them so the child's first query takes its own.
    try:
        from django.conf import settings
        from django.db import connections

        if not settings.configured:
            return
        for wrapper in connections.all(initialized_only=True):
            pool = pool_of(getattr(wrapper, "connection", None))
            if pool is not None and pool.pid != os.getpid():
                wrapper.connection = None
    except Exception:  # pragma: no cover - never fail a fork
        pass


process.after_fork_in_child(_forget_pools_in_child)
