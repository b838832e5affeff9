"""``release: "transaction"``: a thread holds a connection only while it uses it.

Django's model is that a thread keeps its connection from its first query to
the end of the request. With ``OPTIONS["pool"]["release"] = "transaction"``
the Django wrapper gives the connection back as soon as the thread has

- no open cursor (the ORM closes each cursor once it has read its rows; a
  server-side cursor from ``QuerySet.iterator()`` stays open until the
  iteration ends),
- no open transaction (inside ``atomic()``, or with autocommit turned off,
  the connection stays until the outermost block ends), and
- no *pin*: something that needs the same server session across statements.

A statement whose text changes the session (``SET`` without ``LOCAL``,
``set_config(..., false)``, ``LISTEN``, ``PREPARE``, ``DECLARE ... WITH
HOLD``, temporary tables, session advisory locks, ``LOAD``) pins the
connection until the thread closes it (at the end of the request), so the
next statement sees what the first one set; :func:`connection_pinned` pins
it for a block of code. The next statement after a release takes a
connection again (as a new request would: Django's ``connection_created``
receivers run, the time zone and role are set), usually the same one.

Session changes made where the SQL text does not show them (inside a
function, a trigger, a ``DO`` block) cannot be seen: the reset on return
undoes them, so they are lost rather than leaked; pin around such code.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.postgresql.base import CursorDebugWrapper
from django.db.backends.utils import CursorWrapper

from .pooled_connection import OPEN_TRANSACTION_STATUSES

if TYPE_CHECKING:
    from .base import DatabaseWrapper

logger = logging.getLogger("django_pgpool")

# Statements whose effect outlives their transaction: run on a released
# connection, they would be lost (the reset) or leak (with reset off).
_SESSION_CHANGES = re.compile(
    r"""
    (?: ^ | ; ) \s* (?:
          SET \s+ (?! LOCAL \b | TRANSACTION \b | CONSTRAINTS \b )
        | LISTEN \b
        | PREPARE \b
        | LOAD \b
        | DECLARE \b [^;]* \b WITH \s+ HOLD \b
    )
    | \b set_config \s* \( (?! [^)]* , \s* true \s* \) )
    | \b pg_(?: try_ )? advisory_lock (?: _shared )? \s* \(
    | \b TEMP (?: ORARY )? \s+ (?: TABLE | SEQUENCE | VIEW ) \b
    | \b INTO \s+ TEMP (?: ORARY )? \b
    """,
    re.IGNORECASE | re.VERBOSE,
)


@functools.lru_cache(maxsize=2048)
def changes_session(sql: str) -> bool:
    """Whether ``sql`` visibly changes the server session beyond its transaction.

    Cached: the ORM sends the same statement texts again and again.
    """
    return _SESSION_CHANGES.search(sql) is not None


class _ReleasingMixin:
    """What a cursor of a wrapper in transaction mode adds: pins, and release on close."""

    db: DatabaseWrapper
    cursor: Any
    _open: bool

    def execute(self, sql: Any, params: Any = None) -> Any:
        self._note_statement(sql)
        return super().execute(sql, params)  # type: ignore[misc]

    def executemany(self, sql: Any, param_list: Any) -> Any:
        self._note_statement(sql)
        return super().executemany(sql, param_list)  # type: ignore[misc]

    def _note_statement(self, sql: Any) -> None:
        text = sql if isinstance(sql, str) else sql.decode() if isinstance(sql, bytes) else ""
        if text and changes_session(text):
            self.db.pin_session(f"statement {text.strip()[:60]!r}")

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self.cursor.close()
            finally:
                self.db.cursor_closed(self)

    def __del__(self) -> None:
        # Dropped without being closed: it no longer holds the connection,
        # which goes back at the next release point (never from here: a
        # finalizer may run in the middle of anything).
        if getattr(self, "_open", False):
            self._open = False
            self.db.cursor_dropped(self)


class ReleasingCursorWrapper(_ReleasingMixin, CursorWrapper):
    def __init__(self, cursor: Any, db: Any) -> None:
        super().__init__(cursor, db)
        self._open = True


class ReleasingCursorDebugWrapper(_ReleasingMixin, CursorDebugWrapper):
    def __init__(self, cursor: Any, db: Any) -> None:
        super().__init__(cursor, db)
        self._open = True


@contextmanager
def connection_pinned(using: str = DEFAULT_DB_ALIAS) -> Iterator[None]:
    """Keep this thread's connection (of alias ``using``) for the whole block.

    For code that needs one server session across statements in a way the
    SQL text doesn't show: a function that calls ``set_config()``, code that
    uses ``connection.connection`` (the raw psycopg2 connection) between
    queries. Outside transaction mode it changes nothing.
    """
    wrapper = connections[using]
    if not isinstance(wrapper, ReleasePerTransaction):
        yield
        return
    wrapper.pin()
    try:
        yield
    finally:
        wrapper.unpin()


class ReleasePerTransaction:
    """The Django wrapper's side of transaction mode (mixed into ``DatabaseWrapper``).

    All of it is per wrapper, hence per thread: how many of its cursors are
    open, whether something pinned its connection, and whether it gave its
    connection back while Django still considers it connected ("released").
    """

    # Set by get_new_connection() from the pool's ``release`` option.
    releases_per_transaction = False
    _released = False
    # Above 0 while Django is between taking a connection and using it
    # (connect(), _cursor()): nothing may give it back meanwhile.
    _holding = 0
    _open_cursors = 0
    _cursor_generation = 0
    _pins = 0
    _session_pinned = False

    connection: Any
    in_atomic_block: bool
    autocommit: bool
    allow_thread_sharing: bool
    alias: str

    # ------------------------------------------------------------------ Django's hooks

    def connect(self) -> None:
        self._holding += 1
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self._holding -= 1
        self._released = False

    def _cursor(self, name: str | None = None) -> Any:
        # Between ensure_connection() and create_cursor(), a statement run by
        # something else (code wrapping ensure_connection()) must not give the
        # connection back.
        self._holding += 1
        try:
            return super()._cursor(name)  # type: ignore[misc]
        finally:
            self._holding -= 1

    def close(self) -> None:
        # The end of the request (or of the thread's work): pins end, and
        # cursors still open belong to a connection that is going back.
        self._released = False
        self._session_pinned = False
        self._open_cursors = 0
        self._cursor_generation += 1
        super().close()  # type: ignore[misc]

    def close_if_unusable_or_obsolete(self) -> None:
        # Django calls this at the start and end of each request. A connection
        # already given back still ends here, as far as Django is concerned:
        # the next request starts afresh (and CONN_HEALTH_CHECKS checks again).
        if self._released and self.connection is None:
            self.close()
            return
        super().close_if_unusable_or_obsolete()  # type: ignore[misc]

    def get_autocommit(self) -> bool:
        if self._released and self.connection is None:
            return self.autocommit  # known without taking a connection
        return super().get_autocommit()  # type: ignore[misc, no-any-return]

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        super().set_autocommit(  # type: ignore[misc]
            autocommit, force_begin_transaction_with_broken_autocommit
        )
        if autocommit:
            self.release_if_idle()  # the end of a transaction

    def make_cursor(self, cursor: Any) -> Any:
        if not self.releases_per_transaction:
            return super().make_cursor(cursor)  # type: ignore[misc]
        return self._track(ReleasingCursorWrapper(cursor, self))

    def make_debug_cursor(self, cursor: Any) -> Any:
        if not self.releases_per_transaction:
            return super().make_debug_cursor(cursor)  # type: ignore[misc]
        return self._track(ReleasingCursorDebugWrapper(cursor, self))

    # ------------------------------------------------------------------ cursors

    def _track(self, wrapper: Any) -> Any:
        self._open_cursors += 1
        wrapper._generation = self._cursor_generation
        return wrapper

    def cursor_closed(self, wrapper: Any) -> None:
        if wrapper._generation == self._cursor_generation:
            self._open_cursors -= 1
            self.release_if_idle()

    def cursor_dropped(self, wrapper: Any) -> None:
        if wrapper._generation == self._cursor_generation:
            self._open_cursors -= 1

    # ------------------------------------------------------------------ pins

    def pin(self) -> None:
        """Keep the connection (taken now or at the next statement) until :meth:`unpin`."""
        if not self._pins:
            self._note_pin("connection_pinned()")
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        if not self._pins:
            self.release_if_idle()

    def pin_session(self, reason: str) -> None:
        """A statement changed the session: keep this connection until the thread closes it."""
        if not self._session_pinned and self.releases_per_transaction:
            self._session_pinned = True
            self._note_pin(reason)

    def _note_pin(self, reason: str) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.counters.add("pins_num")
        logger.debug("alias %r: connection pinned to this thread by %s", self.alias, reason)

    # ------------------------------------------------------------------ release

    def release_if_idle(self) -> None:
        """Give the connection back if nothing holds it: no cursor, transaction or pin."""
        if (
            not self.releases_per_transaction
            or self.connection is None
            or self._holding
            or self._open_cursors > 0
            or self.in_atomic_block
            or not self.autocommit
            or self._pins
            or self._session_pinned
            or self.allow_thread_sharing
        ):
            return
        if self.connection.info.transaction_status in OPEN_TRANSACTION_STATUSES:
            return  # a transaction opened with a raw BEGIN: held until it ends
        self._close()  # type: ignore[attr-defined]
        self._released = True
