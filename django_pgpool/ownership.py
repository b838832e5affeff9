"""Who holds a pool's connections, and what happens when a holder goes away.

- A **checkout number** identifies one checkout of a connection, so that
  taking back an *abandoned* connection (its holder went away without
  returning it) can never take one returned and checked out again since.
- A **thread lease** lists the connections a thread took with
  ``bind_to_thread=True``; when the thread ends, its lease dies and those
  connections are given back as abandoned.
- **Reports**: a connection held longer than ``leak_threshold`` (with the
  stack that took it), and a connection returned with its transaction open.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psycopg2.extensions

from . import process
from .pooled_connection import OPEN_TRANSACTION_STATUSES, TRANSACTION_IDLE

if TYPE_CHECKING:
    from .counters import Counters
    from .pool import ConnectionPool
    from .pooled_connection import Entry

logger = logging.getLogger("django_pgpool")

#: A connection returned with its transaction still open is reported at most
#: this often (seconds) per pool; the statistics count every one.
OPEN_TRANSACTION_REPORT_INTERVAL = 60.0

# Numbered with the pool's lock held, in the same step that marks the
# connection checked out.
next_checkout_id = itertools.count(1).__next__


class ThreadLease:
    """The connections one thread checked out with ``bind_to_thread=True``.

    It lives in a ``threading.local``, so it is destroyed when its thread ends;
    any connection still listed then goes back to its pool as abandoned
    instead of pinning a slot forever. Connections point back to it with a
    weak reference, so it dies with the thread rather than at some later
    garbage collection.
    """

    __slots__ = ("__weakref__", "connections", "pid", "ref", "thread_name")

    def __init__(self) -> None:
        self.connections: dict[int, tuple[Any, Callable[[], bool] | None, int]] = {}
        self.ref = weakref.ref(self)
        self.pid = os.getpid()
        self.thread_name = threading.current_thread().name

    def __del__(self, _getpid: Callable[[], int] = os.getpid) -> None:
        # A forked child inherits the parent's thread-local storage; those
        # connections belong to the parent. (``os.getpid`` is bound at
        # definition: at interpreter exit module globals may be gone.)
        if not self.connections or self.pid != _getpid():
            return
        for conn, keep_if, checkout_id in list(self.connections.values()):
            if keep_if is not None and keep_if():
                continue  # handed on to another thread, which will return it
            conn.pool_entry.pool.abandoned.reclaim(
                conn, checkout_id, f"thread {self.thread_name!r} ended"
            )


_thread_state = threading.local()


def lease(conn: Any, keep_if: Callable[[], bool] | None) -> None:
    """Bind a checked-out connection to the calling thread."""
    try:
        current: ThreadLease = _thread_state.lease
    except AttributeError:
        current = _thread_state.lease = ThreadLease()
    entry = conn.pool_entry
    current.connections[id(conn)] = (conn, keep_if, entry.checkout_id)
    entry.lease = current.ref


def end_lease(entry: Entry, conn: Any) -> None:
    """The connection went back (or away): its thread no longer holds it."""
    ref = entry.lease
    if ref is not None:
        entry.lease = None
        holder = ref()
        if holder is not None:
            holder.connections.pop(id(conn), None)


def _forget_leases_in_child() -> None:
    # Connections checked out by the thread that forked belong to the parent.
    current = getattr(_thread_state, "lease", None)
    if current is not None:
        current.connections.clear()


process.after_fork_in_child(_forget_leases_in_child)


def caller_stack() -> traceback.StackSummary:
    """The stack of whoever called into the pool, without the package's own frames."""
    stack = traceback.extract_stack(sys._getframe(1), limit=60)
    package = os.path.dirname(__file__)
    while stack and os.path.dirname(stack[-1].filename) == package:
        stack.pop()
    return stack


def thread_name(ident: int | None) -> str:
    """The name of a running thread, or "an ended thread"."""
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return "an ended thread"


_DOING = {
    TRANSACTION_IDLE: "idle",
    psycopg2.extensions.TRANSACTION_STATUS_ACTIVE: "running a query",
    psycopg2.extensions.TRANSACTION_STATUS_INTRANS: "in a transaction",
    psycopg2.extensions.TRANSACTION_STATUS_INERROR: "in a failed transaction",
    psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN: "with its server connection lost",
}


def holders(connections: Iterable[Any]) -> list[tuple[str, float, str]]:
    """(thread name, seconds held, what it is doing) for checked-out connections, longest first.

    What it is doing: "idle" (between statements), "running a query",
    "in a transaction", "in a failed transaction" or "with its server
    connection lost".
    """
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    now = time.monotonic()
    result = []
    for conn in sorted(connections, key=lambda c: c.pool_entry.checked_out_at):
        entry = conn.pool_entry
        try:
            doing = _DOING.get(conn.info.transaction_status, "idle")
        except Exception:
            doing = "idle"
        result.append(
            (names.get(entry.holder, "an ended thread"), now - entry.checked_out_at, doing)
        )
    return result


def report_leaks(
    pool_name: str, connections: Iterable[Any], threshold: float, counters: Counters
) -> None:
    """Warn once about each connection held longer than ``threshold``, with its taker's stack."""
    now = time.monotonic()
    for conn in connections:
        entry = conn.pool_entry
        if (
            not entry.leak_reported
            and entry.origin is not None
            and now - entry.checked_out_at >= threshold
        ):
            entry.leak_reported = True
            counters.add("leaks_detected")
            logger.warning(
                "pool %r: a connection has been checked out for %.1f s "
                "(leak_threshold=%g s); it was taken here:\n%s",
                pool_name,
                now - entry.checked_out_at,
                threshold,
                "".join(traceback.format_list(entry.origin)).rstrip(),
            )


def note_leak_returned(pool_name: str, entry: Entry, now: float) -> None:
    """A connection with leak detection on came back (and says so if it was reported)."""
    entry.origin = None
    if entry.leak_reported:
        logger.info(
            "pool %r: the connection reported as leaked was returned after %.1f s",
            pool_name,
            now - entry.checked_out_at,
        )


class OpenTransactionReports:
    """Say that connections came back with their transaction open: their work is lost.

    The pool rolls the transaction back (as psycopg_pool does, with a
    warning), so the next user gets a clean connection; but whoever returned
    it probably meant to commit. One WARNING at most every
    ``OPEN_TRANSACTION_REPORT_INTERVAL`` seconds, with the count since the last.
    """

    __slots__ = ("counters", "pool_name", "reported_at", "unreported")

    def __init__(self, pool_name: str, counters: Counters) -> None:
        self.pool_name = pool_name
        self.counters = counters
        self.reported_at = -float("inf")
        self.unreported = 0

    def report(self, conn: Any, aborted: bool, now: float) -> None:
        with self.counters.lock:
            self.counters.values["returns_in_transaction"] += 1
            self.unreported += 1
            if now - self.reported_at < OPEN_TRANSACTION_REPORT_INTERVAL:
                return
            self.reported_at = now
            count, self.unreported = self.unreported, 0
        since = "" if count == 1 else f" ({count} such returns since the last report)"
        logger.warning(
            "pool %r: a connection taken by %s was returned with %s still open; it was "
            "rolled back, so any uncommitted changes are lost%s. Commit or roll back "
            "before closing the connection (leaving transaction.atomic() normally does).",
            self.pool_name,
            thread_name(conn.pool_entry.holder),
            "an aborted transaction" if aborted else "a transaction",
            since,
        )


class Abandoned:
    """Taking back the connections of one pool whose holder went away without returning them."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        self._logged = False

    def reclaim(
        self,
        conn: Any,
        checkout_id: int,
        holder: str,
        # Bound now: at interpreter exit, when finalizers still run, module
        # globals such as ``os`` may already be gone.
        _getpid: Callable[[], int] = os.getpid,
        _finalizing: Callable[[], bool] = sys.is_finalizing,
    ) -> None:
        """Take back ``conn``, checked out as ``checkout_id`` by ``holder``, now gone.

        For finalizers (a thread that ended, a garbage-collected Django
        wrapper), so it never takes the pool's lock: a finalizer may run in a
        thread that holds it. The worker does the rest, including the reset;
        ``checkout_id`` makes sure that a connection returned and checked out
        again since is left alone.
        """
        pool = self._pool_ref()
        if pool is None or pool.pid != _getpid():
            return  # gone, or inherited through fork: the parent's
        if _finalizing():
            # The interpreter is shutting down and other threads are being torn
            # down: touching connections now can hang, and the OS closes them.
            return
        worker = pool.worker
        if pool.closed or worker is None:
            with suppress(Exception):
                conn.close()
            return
        worker.submit(self._take_back, conn, checkout_id, holder)

    def _take_back(self, conn: Any, checkout_id: int, holder: str) -> None:
        pool = self._pool_ref()
        if pool is None:
            return
        entry = conn.pool_entry
        slots = pool.slots
        with slots.lock:
            still_out = id(conn) in slots.checked_out and entry.checkout_id == checkout_id
            if still_out:
                slots.counters.values["connections_reclaimed"] += 1
                first, self._logged = not self._logged, True
        if not still_out:
            return  # returned in the meantime
        in_transaction = conn.info.transaction_status in OPEN_TRANSACTION_STATUSES
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "pool %r: a connection was never returned (%s); the pool took it back. Close "
            "connections when you are done with them (django.db.connection.close(), or "
            "close_old_connections() in threads you start) to return them sooner.",
            pool.name,
            holder,
        )
        if in_transaction:
            # Rolling back would wait for the server, in the worker, on a
            # connection whose holder vanished mid-transaction (perhaps as its
            # network went silent); closing it ends the transaction just as
            # well (the server rolls it back) and never waits.
            pool.retire_checked_out(conn, "its holder ended in the middle of a transaction")
            return
        # Whatever the holder left (session settings) goes.
        entry.dirty = True
        pool.putconn(conn)
