"""Django's PostgreSQL backend, with every connection taken from a pool.

``ENGINE: "django_pgpool"`` is Django's own ``django.db.backends.postgresql``
on psycopg2 with a handful of hooks overridden: opening a connection takes one
from the alias's :class:`~django_pgpool.pool.ConnectionPool`, closing gives it
back. Everything else (operations, schema editor, introspection, features,
test database handling) is Django's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import driver

driver.use_psycopg2()

import psycopg2.extras  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402
from django.db.backends.base.base import NO_DB_ALIAS  # noqa: E402
from django.db.backends.postgresql import base as postgresql  # noqa: E402
from django.db.backends.postgresql.psycopg_any import IsolationLevel  # noqa: E402
from django.db.utils import DatabaseErrorWrapper  # noqa: E402
from django.utils.asyncio import async_unsafe  # noqa: E402
from django.utils.functional import cached_property  # noqa: E402

from . import control, registry, roles  # noqa: E402
from .client import DatabaseClient  # noqa: E402
from .closing import inside_closing_connections  # noqa: E402
from .config import parse_pool_options, pool_is_enabled  # noqa: E402
from .creation import DatabaseCreation  # noqa: E402
from .errors import PoolError  # noqa: E402
from .failover import FailoverAware  # noqa: E402
from .pool import ConnectionPool  # noqa: E402
from .pooled_connection import evaluated, pool_of  # noqa: E402
from .release import ReleasePerTransaction  # noqa: E402
from .signals import send_pool_event  # noqa: E402

logger = logging.getLogger("django_pgpool")


def _register_json_loads(connection: Any) -> None:
    # What Django's backend does for every new psycopg2 connection (skip the
    # decode/encode round trip when JSONField has a custom decoder). The
    # registration belongs to the connection, so once per pooled connection
    # is enough.
    psycopg2.extras.register_default_jsonb(conn_or_curs=connection, loads=lambda x: x)


_warned_about_executor_threads = False


def _in_an_event_loop_executor() -> bool:
    # asyncio names the default executor's threads "asyncio_0", "asyncio_1", ...
    return (
        threading.current_thread().name.startswith("asyncio_") and not inside_closing_connections()
    )


def _warn_about_executor_threads() -> None:
    global _warned_about_executor_threads
    _warned_about_executor_threads = True
    logger.warning(
        "A database connection was taken in thread %r, an event loop executor thread "
        "(code run by sync_to_async(thread_sensitive=False)). Django does not give "
        "connections back from those threads at the end of a request, so each keeps one "
        "of the pool's connections until it is closed; wrap such code with "
        "django_pgpool.closing_connections.",
        threading.current_thread().name,
    )


class _Checkout:
    """The connection a wrapper has checked out, as its finalizer sees it."""

    __slots__ = ("checkout_id", "connection")

    def __init__(self) -> None:
        self.connection: Any = None
        self.checkout_id = 0


def _give_back_if_abandoned(checkout: _Checkout) -> None:
    # Django closes a connection whose wrapper is garbage collected; a pooled
    # one must go back to its pool instead of pinning a slot forever.
    connection = checkout.connection
    pool = pool_of(connection)
    if pool is not None:
        pool.abandoned.reclaim(
            connection,
            checkout.checkout_id,
            "its Django connection object was garbage collected without being closed",
        )


class _PoolErrorsPassThrough(DatabaseErrorWrapper):
    """Django's error wrapper, except for the pool's own errors.

    They already are ``django.db.OperationalError`` subclasses; re-wrapping
    them would replace ``PoolTimeout`` by a plain ``OperationalError``.
    """

    wrapper: DatabaseWrapper  # set by Django's __init__ (not in django-stubs)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is not None:
            if issubclass(exc_type, PoolError):
                return
            if issubclass(exc_type, psycopg2.Error):
                # A server that changed role or went away (roles.py): free here.
                roles.note_error(self.wrapper.connection, exc_value)
        super().__exit__(exc_type, exc_value, traceback)


class DatabaseWrapper(FailoverAware, ReleasePerTransaction, postgresql.DatabaseWrapper):
    client_class = DatabaseClient
    creation_class = DatabaseCreation
    # Set while closing a connection Django found unusable: the pool discards it.
    _discard_on_close = False

    @property
    def pool(self) -> ConnectionPool | None:
        """The pool this alias's connections come from (None when not pooling).

        While connected, the pool the open connection came from; otherwise the
        pool for the alias's current settings, built if needed.
        """
        if self.alias == NO_DB_ALIAS or not pool_is_enabled(self.settings_dict):
            return None
        owner = pool_of(self.connection)
        if owner is not None:
            return owner
        return self._current_pool(self.get_connection_params())

    def close_pool(self) -> None:
        """Close this alias's pool (Celery's Django fix-up calls this after fork)."""
        registry.close(self.alias)

    def get_connection_params(self) -> dict[str, Any]:
        settings_dict = self.settings_dict
        options = settings_dict["OPTIONS"]
        if "pool" not in options:
            return super().get_connection_params()
        # OPTIONS["pool"] is ours; Django's backend would refuse it on psycopg2
        # (its own pool needs psycopg 3), so it doesn't get to see it.
        self.settings_dict = {
            **settings_dict,
            "OPTIONS": {key: value for key, value in options.items() if key != "pool"},
        }
        try:
            return super().get_connection_params()
        finally:
            self.settings_dict = settings_dict

    @async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if self.alias == NO_DB_ALIAS or not pool_is_enabled(self.settings_dict):
            # A callable PASSWORD (rotating credentials) is evaluated per connection.
            direct_params = {key: evaluated(value) for key, value in conn_params.items()}
            return super().get_new_connection(direct_params)
        pool = self._current_pool(conn_params)
        # As in Django's backend: the isolation level comes from OPTIONS and
        # defaults to READ COMMITTED. Django's code can't be reused here since
        # it takes the connection without binding it to this thread.
        options = self.settings_dict["OPTIONS"]
        try:
            isolation_level_value = options["isolation_level"]
        except KeyError:
            self.isolation_level = IsolationLevel.READ_COMMITTED
            set_isolation_level = False
        else:
            try:
                self.isolation_level = IsolationLevel(isolation_level_value)
                set_isolation_level = True
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {isolation_level_value} "
                    f"specified. Use one of the psycopg.IsolationLevel values."
                ) from None
        # If this thread ends without closing, the pool takes the connection
        # back, unless the wrapper was shared with other threads on purpose
        # (inc_thread_sharing(), as LiveServerTestCase does): they'll close it.
        per_transaction = pool.config.release == "transaction"
        if (
            not per_transaction
            and not _warned_about_executor_threads
            and _in_an_event_loop_executor()
        ):
            _warn_about_executor_threads()
        connection = pool.getconn(
            bind_to_thread=True,
            keep_if=self._shared_with_other_threads,
            # CONN_HEALTH_CHECKS checks a connection once per request: not
            # again each time the same request takes one back.
            check=False if self._released else None,
        )
        self.releases_per_transaction = per_transaction
        checkout = self._checkout
        checkout.connection = connection
        checkout.checkout_id = connection.pool_entry.checkout_id
        if set_isolation_level:
            connection.isolation_level = self.isolation_level
        return connection

    def _current_pool(self, conn_params: dict[str, Any]) -> ConnectionPool:
        identity = self._pool_identity(conn_params)
        pool = registry.lookup(self.alias, identity)
        if pool is None:
            pool = registry.install(self.alias, identity, lambda: self._build_pool(conn_params))
        return pool

    def _pool_identity(self, conn_params: dict[str, Any]) -> tuple[Any, ...]:
        """What a pool is built from: a change in any of it needs a new pool."""
        options = self.settings_dict["OPTIONS"]
        return (
            conn_params,
            self.timezone_name,
            options.get("assume_role"),
            options.get("pool", True),
        )

    def _build_pool(self, conn_params: dict[str, Any]) -> ConnectionPool:
        config = parse_pool_options(self.alias, self.settings_dict)
        # The session Django sets up on each new connection: the time zone goes
        # in as a startup setting (the pool's reset then restores it for free);
        # the role is set again after every reset.
        role = self.settings_dict["OPTIONS"].get("assume_role")
        pool = ConnectionPool(
            config,
            dict(conn_params),
            session_settings={"TimeZone": self.timezone_name} if self.timezone_name else None,
            session_sql="SET ROLE %s" if role else "",
            session_params=[role] if role else [],
            prepare=_register_json_loads,
        )
        alias = self.alias
        pool.on_event = lambda event, info: send_pool_event(alias, event, info)
        # Pause, resume and drain from outside the process (PGPOOL_CONTROL_FILE).
        control.adopt(alias, pool)
        return pool

    def _close(self) -> None:
        connection = self.connection
        if connection is None:
            return
        pool = pool_of(connection)
        if pool is None:
            super()._close()  # type: ignore[misc]
            return
        checkout = self._checkout
        checkout.connection = None
        if connection.pool_entry.checkout_id != checkout.checkout_id:
            # The pool took it back already: the thread that took it for this
            # wrapper (against Django's thread-sharing rule) ended with it.
            self.connection = None
            return
        with self.wrap_database_errors:
            try:
                pool.putconn(connection, close=self._discard_on_close)
            finally:
                # The pool owns it now; this wrapper must not touch it again.
                self.connection = None

    @cached_property
    def _checkout(self) -> _Checkout:
        checkout = _Checkout()
        finalizer = weakref.finalize(self, _give_back_if_abandoned, checkout)
        finalizer.atexit = False  # at exit the pools close anyway
        return checkout

    @cached_property
    def _shared_with_other_threads(self) -> Callable[[], bool]:
        # A weak reference: the pool must not keep the wrapper alive.
        wrapper = weakref.ref(self)

        def shared() -> bool:
            alive = wrapper()
            return alive is not None and alive.allow_thread_sharing

        return shared

    def close_if_health_check_failed(self) -> None:
        # Django's PostgreSQL backend skips this whenever a pool is configured
        # ("the pool only returns healthy connections"). A fresh checkout has
        # health_check_done set, so Django's own check costs nothing then; a
        # connection kept across requests (CONN_MAX_AGE changed at run time) is
        # checked as Django would check it, and one that fails is discarded
        # rather than given back.
        # Both flags are set by connect(); django-stubs declares neither precisely.
        enabled = getattr(self, "health_check_enabled", False)
        if self.connection is None or not enabled or getattr(self, "health_check_done", True):
            return
        if not self.is_usable():
            self._discard_on_close = True
            try:
                self.close()
            finally:
                self._discard_on_close = False
        self.health_check_done = True

    def close_if_unusable_or_obsolete(self) -> None:
        connection = self.connection
        if connection is not None:
            pool = pool_of(connection)
            if pool is not None and pool.pid != os.getpid():
                # Inherited through a fork the pool couldn't see (one made
                # outside Python, as uWSGI does): the parent's, not ours.
                self.connection = None
                return
            if self.close_at is not None and time.monotonic() >= self.close_at:
                # Going back to the pool anyway: skip Django's is_usable()
                # round trip after errors, the pool checks what it gets back.
                self.close()
                return
        super().close_if_unusable_or_obsolete()

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:
        return _PoolErrorsPassThrough(self)
