"""The Django wrapper's side of role awareness (:mod:`django_pgpool.roles` is the pool's).

For an alias that must be writable (``OPTIONS["target_session_attrs"]`` is
``read-write`` or ``primary``), a write refused with SQLSTATE 25006 means its
server stopped taking writes: a switchover, a failover, an old primary made
read-only. The pool then stops handing out connections to that server (the
others become suspect, see :mod:`.roles`), and here:

- **The statement that met it is retried once**, on a fresh connection, when
  retrying is safe: a single statement (``execute``, not ``executemany``) in
  autocommit, or the first statement of a transaction (``atomic()``).
  25006 means the server refused it before doing anything, and nothing else
  was pending (in a transaction, only its ``BEGIN``: the transaction is rolled
  back and begun again on the fresh connection), so running it again
  elsewhere runs it once. Never after a transaction ran anything else (those
  statements went with the old connection); never after the request changed
  its session (``SET``, ``set_config(..., false)``, temporary tables,
  ``LISTEN``, a server-side cursor...: the fresh connection would not have
  that state), as the SQL text shows it (the rule of ``release="transaction"``'s
  pins); never for a wrapper shared between threads.
- **A transaction that began on a server turned read-only moves** before
  anyone sees its first result. Every answer carries the server's role (see
  :mod:`.roles`), that of the transaction's ``BEGIN`` included, so after the
  first statement (a read, or it would have failed) one local read tells
  whether the whole transaction is read-only; if it is, it is rolled back and
  begun again elsewhere, under the same conditions as a retry. Its writes
  then don't fail. Any statement whose answer reports the change starts the
  server's event, as an error would.
- **A connection whose server became suspect is replaced between
  statements**: when the thread's next statement or transaction starts, at a
  point where the same conditions hold. So a request that holds its
  connection for long (the default ``release="request"``) does not meet the
  read-only server again.

All of it costs nothing on other aliases. On these, each statement passes
through one more function (one of Django's ``execute_wrappers``) that looks at
the statement's text in a cache, as transaction mode does, and reads the role
its answer reported (one local read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import psycopg2.extensions as ext
from django.db import DatabaseError
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.signals import connection_created

from . import roles
from .config import pool_is_enabled
from .pooled_connection import pool_of
from .release import changes_session

_IDLE = ext.TRANSACTION_STATUS_IDLE


def retry_read_only(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    """An execute wrapper: retry once a statement refused by a server that turned read-only."""
    db = context["connection"]
    cursor = context["cursor"]
    if not db.session_changed and (
        cursor.cursor.name is not None or not isinstance(sql, str) or changes_session(sql)
    ):
        db.session_changed = True
    conn = db.connection
    # psycopg2 begins the transaction with this statement: nothing ran in it before.
    begins = not db.autocommit and conn.info.transaction_status == _IDLE
    try:
        result = execute(sql, params, many, context)
    except DatabaseError as exc:
        if many or not db.may_retry_after(exc, begins):
            raise
    else:
        # Every answer carries the server's role (one local read). A
        # transaction that began on a server turned read-only can only read:
        # moved now, after its first statement (a read), before anyone saw
        # the result, its writes will not fail.
        if not roles.reports_wrong_role(conn):
            return result
        if many or not begins or not db.may_move_transaction():
            return result
    # Outside the except block: the retry's own error, if any, is the one to see.
    if begins:
        db.replace_connection_in_transaction()
    else:
        db.replace_connection()
    cursor.cursor = db.create_cursor()
    pool = pool_of(db.connection)
    if pool is not None:
        pool.roles.add("statements_retried")
    return execute(sql, params, many, context)


class FailoverAware:
    """Mixed into ``DatabaseWrapper``: replace connections whose server turned read-only."""

    #: The alias needs a writable server (``target_session_attrs`` ``read-write``
    #: or ``primary``) and pools.
    needs_writable = False
    #: Something this thread ran changed its session (until the request ends).
    session_changed = False

    alias: str
    autocommit: bool
    errors_occurred: bool
    in_atomic_block: bool
    allow_thread_sharing: bool
    connection: Any
    execute_wrappers: list[Any]
    _checkout: Any

    def __init__(self, settings_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(settings_dict, *args, **kwargs)  # type: ignore[call-arg]
        options = settings_dict.get("OPTIONS") or {}
        if (
            self.alias != NO_DB_ALIAS
            and pool_is_enabled(settings_dict)
            and roles.requires_writable(options.get("target_session_attrs"))
        ):
            self.needs_writable = True
            # First: user wrappers pushed later (connection.execute_wrapper())
            # are popped from the end.
            self.execute_wrappers.insert(0, retry_read_only)

    # A connection whose server may have changed role is swapped before the
    # next statement (_cursor) and before a transaction begins
    # (set_autocommit). Not in ensure_connection(): Django's stock backend
    # does not override it, and code that patches it on BaseDatabaseWrapper
    # (Django's own tests do) must see every call, as with the stock backend.
    def _cursor(self, name: str | None = None) -> Any:
        if self.needs_writable:
            self._replace_if_suspect()
        return super()._cursor(name)  # type: ignore[misc]

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        if self.needs_writable and not autocommit:
            self._replace_if_suspect()
        super().set_autocommit(  # type: ignore[misc]
            autocommit, force_begin_transaction_with_broken_autocommit
        )

    def _replace_if_suspect(self) -> None:
        entry = getattr(self.connection, "pool_entry", None)
        if entry is not None and entry.suspect and self._may_replace():
            self.replace_connection()

    def close(self) -> None:
        self.session_changed = False
        super().close()  # type: ignore[misc]

    def _may_replace(self) -> bool:
        """Whether the connection can be swapped now without anyone noticing."""
        conn = self.connection
        return bool(
            conn is not None
            and self.autocommit
            and not self.in_atomic_block
            and not self.session_changed
            and not self.allow_thread_sharing
            and conn.readonly is None
            and not conn.closed
            and conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        )

    def may_retry_after(self, exc: DatabaseError, began_transaction: bool) -> bool:
        """Whether a statement that raised ``exc`` may run again on a fresh connection.

        ``began_transaction``: it was the first statement of a transaction.
        """
        if getattr(exc.__cause__, "pgcode", None) != roles.READ_ONLY_SQL_TRANSACTION:
            return False
        return self.may_move_transaction() if began_transaction else self._may_replace()

    def may_move_transaction(self) -> bool:
        """Whether the transaction, which ran only its first statement, may begin elsewhere."""
        conn = self.connection
        return bool(
            conn is not None
            and not self.session_changed
            and not self.allow_thread_sharing
            and conn.readonly is None
            and not conn.closed
        )

    def replace_connection(self) -> None:
        """Give the connection back (the pool checks it before reuse) and take another."""
        old = self.connection
        pool = pool_of(old)
        self._checkout.connection = None
        self.connection = None
        if pool is not None:
            pool.putconn(old)
        self.connect()  # type: ignore[attr-defined]

    def replace_connection_in_transaction(self) -> None:
        """Roll back a transaction that ran only its refused first statement; begin it elsewhere.

        Django's view of the transaction (``atomic()`` blocks, ``on_commit``
        callbacks) is unchanged: only the psycopg2 connection under it is.
        """
        old = self.connection
        pool = pool_of(old)
        with contextlib.suppress(Exception):
            old.rollback()
        self._checkout.connection = None
        self.connection = None
        if pool is not None:
            pool.putconn(old)
        new = self.get_new_connection(self.get_connection_params())  # type: ignore[attr-defined]
        new.autocommit = False
        self.connection = new
        self.errors_occurred = False  # the error was the old connection's
        connection_created.send(sender=self.__class__, connection=self)
