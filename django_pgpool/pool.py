"""A psycopg2 connection pool for threaded servers.

:class:`ConnectionPool` keeps the API of psycopg2's ``ThreadedConnectionPool``
(``getconn`` / ``putconn`` / ``closeall``) and fixes its traps:

- an exhausted pool makes callers wait, first come first served, up to
  ``timeout`` instead of raising at once;
- returned connections are kept (up to ``max_size``) instead of being closed
  whenever more than ``minconn`` are idle, so a busy pool doesn't churn;
- new connections are opened outside the pool's lock, so one slow connect
  never stalls the threads that are returning or taking connections.

The pool's rooms: where connections are and the hand-off between threads in
:mod:`.slots`; what is done to one connection (open, check, reset) in
:mod:`.pooled_connection`; the background thread, housekeeping and opening
in :mod:`.worker`; who holds what in :mod:`.ownership`; fork and exit in
:mod:`.process`. ``docs/architecture.md`` draws the whole.

This module does not import Django; :mod:`django_pgpool.base` plugs it into
Django's PostgreSQL backend.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg2
from psycopg2.pool import ThreadedConnectionPool

from . import maintenance, observers, ownership, process, validation
from .counters import Counters
from .errors import (
    PoolClosed,
    PoolError,
    PoolTimeout,
    paused_message,
    timeout_message,
)
from .liveness import Liveness
from .observers import WATCHING
from .pooled_connection import TRANSACTION_IDLE, Connector, exception_summary
from .roles import RoleWatch, required_role
from .slots import Slots, Waiter
from .worker import Opener, Outage, Worker

if TYPE_CHECKING:
    from .config import PoolConfig

logger = logging.getLogger("django_pgpool")


def _kept_in_slots(name: str) -> Any:
    """A pool attribute of psycopg2's, read from and written to ``pool.slots``."""
    return property(
        lambda pool: getattr(pool.slots, name),
        lambda pool, value: setattr(pool.slots, name, value),
    )


class ConnectionPool(ThreadedConnectionPool):
    """A thread-safe pool of psycopg2 connections to one database.

    ``connect_kwargs`` and the session arguments are those of
    :class:`~django_pgpool.pooled_connection.Connector`.
    """

    def __init__(
        self,
        config: PoolConfig,
        connect_kwargs: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        *,
        session_settings: Mapping[str, str] | None = None,
        session_sql: str = "",
        session_params: Sequence[Any] = (),
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        self.slots = Slots(config.min_size, config.max_size)
        # minconn=0: psycopg2's constructor would otherwise connect right now,
        # in whatever process builds the pool; ours fills up in the background
        # once the pool is first used.
        super().__init__(0, config.max_size)
        self.minconn = config.min_size
        self.config = config
        self.name = config.name or "pool"
        #: The database this pool connects to, when known up front.
        self.dbname: str | None = None if callable(connect_kwargs) else connect_kwargs.get("dbname")
        self.counters: Counters = self.slots.counters
        self.connector = Connector(
            self.name,
            config,
            connect_kwargs,
            self.counters,
            session_settings=session_settings,
            session_sql=session_sql,
            session_params=session_params,
            prepare=prepare,
            transaction_reports=ownership.OpenTransactionReports(self.name, self.counters),
        )
        #: Set while new connections fail: requests then wait for the worker to
        #: reconnect instead of each hammering the server (or failing at once).
        self.outage = Outage()
        #: The role the alias asks for (target_session_attrs), kept after connect,
        #: and the servers that changed role or went away (roles.py).
        self.roles = RoleWatch(self, required_role(connect_kwargs))
        self.opener = Opener(self)
        self.worker: Worker | None = None
        #: ``drain()`` starts a new one; connections of older ones are retired.
        self.generation = 0
        #: Called as ``on_event(event, info)`` (never with the lock held) when a
        #: request times out ("pool_exhausted") or a connection is closed for a
        #: reason other than the pool closing ("connection_discarded").
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        #: What is checked before a connection is handed out (liveness.py).
        self.liveness = Liveness(self)
        #: Connections whose holder went away without returning them (ownership.py).
        self.abandoned = ownership.Abandoned(self)
        self._pid = os.getpid()
        process.track(self)

    # psycopg2's pool attributes, kept in the slots.
    closed = _kept_in_slots("closed")
    minconn = _kept_in_slots("min_size")
    maxconn = _kept_in_slots("max_size")

    @property
    def pid(self) -> int:
        """The process this pool belongs to (pools never cross ``fork()``)."""
        return self._pid

    @property
    def size(self) -> int:
        """Server connections open (or being opened) by this pool."""
        return self.slots.size

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.slots.size}/{self.maxconn} connections"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # ------------------------------------------------------------------ checkout

    def getconn(
        self,
        key: Any = None,
        *,
        timeout: float | None = None,
        bind_to_thread: bool = False,
        keep_if: Callable[[], bool] | None = None,
        check: bool | None = None,
    ) -> Any:
        """Take a connection, waiting up to ``timeout`` seconds (default: the pool's).

        With ``key``, the same connection is returned for the same key until it
        is put back (psycopg2's semantics). With ``bind_to_thread=True`` the
        connection is returned to the pool by itself if the calling thread ends
        without putting it back, unless ``keep_if()`` then says it is still in
        use elsewhere (a connection handed on to another thread on purpose).
        ``check=True`` checks an idle connection with a round trip, ``False``
        only if it was idle longer than ``check_after_idle`` (even with
        ``CONN_HEALTH_CHECKS``); ``None``: the pool's rule.
        """
        # Timed only while something watches checkouts (observers.WATCHING).
        started = time.monotonic() if WATCHING else 0.0
        if self._pid != os.getpid():
            self._refuse_after_fork()
        if key is not None:
            conn = self.slots.keyed.get(key)
            if conn is not None:
                return conn
        if timeout is not None:
            timeout = self._argument("getconn", "timeout", timeout, validation.seconds)
        if self.worker is None:
            self._start_worker()
        slots = self.slots
        wait_started = 0.0
        counted = queued = False
        while True:
            # Critical section: an idle connection, else a place in the queue
            # (and a slot to open a connection for it, if one is needed).
            waiter = None
            start_connector = False
            with slots.lock:
                if slots.closed:
                    slots.counters.values["requests_errors"] += 1
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if not counted:
                    slots.counters.values["requests_num"] += 1
                    counted = True
                if slots.idle and not slots.waiters and not slots.paused:
                    conn = slots.idle.pop()
                    slots.check_out_locked(conn)
                else:
                    self.outage.refuse_if_known_down_locked(self)
                    start_connector = slots.may_open_locked(self.outage.error is None)
                    if not start_connector:
                        slots.refuse_if_queue_full_locked(self.name, self.config.max_waiting)
                    # Queued: it waits because the pool's connections are all in
                    # use (not merely for the one being opened for it).
                    queue_now = not queued and slots.size > slots.opening
                    queued = queued or queue_now
                    waiter = slots.queue_locked(queue_now)

            if waiter is not None:
                if start_connector:
                    self.opener.start_connector()
                wait_started = wait_started or time.monotonic()
                conn = self._wait(waiter, wait_started, timeout)
            # Whether its reset is still to be read (before _ready() reads it), for observers.
            reset_pending = started and conn.pool_entry.reset_pending  # type: ignore[union-attr]
            if self._ready(conn, waiter is not None, check):
                return self._hand_out(
                    conn,
                    key,
                    bind_to_thread,
                    keep_if,
                    wait_started if queued else 0.0,
                    started,
                    reset_pending,
                )
            self.retire_checked_out(conn, "it failed its check")

    def _argument(self, call: str, name: str, value: Any, validate: Callable[..., Any]) -> Any:
        return validation.argument(f"pool {self.name!r}: {call}", name, value, validate)

    def _refuse_after_fork(self) -> NoReturn:
        self.abandon_after_fork()
        raise PoolClosed(
            f"pool {self.name!r} was created in process {self._pid} and cannot be used "
            f"after fork(); build a new pool in this process"
        )

    def _wait(self, waiter: Waiter, wait_started: float, timeout: float | None) -> Any:
        """Wait until a connection is handed to ``waiter``; return it checked out."""
        try:
            waited_for = self.config.timeout if timeout is None else timeout
            deadline = wait_started + waited_for
            if not waiter.event.acquire(timeout=max(0.0, deadline - time.monotonic())):
                error = self._timed_out(waiter, waited_for)
                if error is not None:
                    raise error
            return self.slots.served(waiter)
        except BaseException:
            # Whatever ended the wait (a timeout, the server refusing the
            # connection opened for it, or an exception raised by a signal
            # handler, gevent.Timeout or another thread), the waiter leaves
            # the queue, and a connection already handed to it goes to the
            # next waiter or back.
            self.slots.abandon(waiter)
            self.counters.add("requests_errors")
            raise

    def _ready(self, conn: Any, waited: bool, check: bool | None) -> bool:
        """Whether ``conn``, checked out, may be handed out (see Liveness.ready)."""
        try:
            return self.liveness.ready(conn, waited, check)
        except BaseException:
            # Interrupted (a signal handler, gevent.Timeout) halfway through a
            # check or reading its reset: the connection's state is unknown,
            # so it goes, and its slot with it.
            self.retire_checked_out(conn, "its checkout was interrupted")
            self.counters.add("requests_errors")
            raise

    def _timed_out(self, waiter: Waiter, waited_for: float) -> PoolTimeout | None:
        """The error for a wait that ran out, or None if it was served just in time."""
        slots = self.slots
        if not slots.give_up(waiter):
            return None  # handed something just as the time ran out: take it
        with slots.lock:
            waiting = len(slots.waiters) + 1
            in_use = len(slots.checked_out)
            holders = ownership.holders(slots.checked_out.values())
        unreachable = self.outage.error
        if unreachable is not None:
            self.outage.waited_out = True
        message = (
            paused_message(self.name, waited_for, waiting=waiting, in_use=in_use)
            if slots.paused
            else timeout_message(
                self.name,
                waited_for,
                max_size=self.maxconn,
                waiting=waiting,
                in_use=in_use,
                holders=holders,
                unreachable=None if unreachable is None else exception_summary(unreachable),
                unreachable_for=time.monotonic() - self.outage.since,
                opening=slots.opening,
            )
        )
        self._emit(
            "pool_exhausted",
            max_size=self.maxconn,
            timeout=waited_for,
            waiting=waiting,
            unreachable=unreachable is not None,
        )
        return PoolTimeout(
            message, pool_name=self.name, max_size=self.maxconn, timeout=waited_for, waiting=waiting
        )

    def _hand_out(
        self,
        conn: Any,
        key: Any,
        bind_to_thread: bool,
        keep_if: Callable[[], bool] | None,
        wait_started: float,
        started: float,
        reset_pending: Any,
    ) -> Any:
        entry = conn.pool_entry
        now = time.monotonic()
        entry.checked_out_at = now
        entry.holder = threading.get_ident()
        if bind_to_thread:
            ownership.lease(conn, keep_if)
        if self.config.leak_threshold:
            entry.origin = ownership.caller_stack()
            entry.leak_reported = False
        if wait_started or key is not None:
            with self.slots.lock:
                if wait_started:
                    self.counters.record_wait((now - wait_started) * 1000.0)
                if key is not None:
                    self.slots.keyed[key] = conn
                    entry.key = key
        if started:
            observers.checked_out(self, conn, now - started, reset_pending)
        return conn

    # ------------------------------------------------------------------ return

    def putconn(self, conn: Any = None, key: Any = None, close: bool = False) -> None:
        """Give a connection back (psycopg2's signature).

        A connection that is closed, broken, past its lifetime, or returned
        with ``close=True`` is closed; any other is rolled back and reset
        before anyone else gets it. Returning to a closed pool closes the
        connection without error.
        """
        conn = self._returned_connection(conn, key)
        entry = conn.pool_entry
        now = time.monotonic()
        if entry.lease is not None:
            ownership.end_lease(entry, conn)
        if entry.origin is not None:
            ownership.note_leak_returned(self.name, entry, now)
        # What the connection itself says, before taking the lock: all local
        # state, no round trip.
        problem, needs_reset = self.connector.returned(conn, close, now)
        slots = self.slots
        with slots.lock:
            checked_out = slots.checked_out.pop(id(conn), None) is not None
            if checked_out:
                entry.checkout_id = 0  # no finalizer may take it back now
                held = now - entry.checked_out_at
                slots.counters.values["usage_ms"] += held * 1000.0
                timings = slots.counters.timings
                if timings is not None:
                    timings.returned_locked(held)
                if entry.key is not None:
                    slots.keyed.pop(entry.key, None)
                    entry.key = None
                if problem and not close:
                    slots.counters.values["returns_bad"] += 1
                elif not problem and (
                    slots.closed
                    or now >= entry.expires_at
                    or entry.generation != self.generation
                    or slots.size > slots.max_size
                ):
                    problem = self._retirement_reason_locked(conn, now)
                if not problem:
                    entry.last_used = now
                    if not needs_reset:
                        # Nothing ran: to the longest waiter, or idle.
                        slots.make_available_locked(conn)
                        return
                    slots.resetting += 1
        if checked_out and not problem:
            self._reset_and_make_available(conn)
        elif not checked_out:
            self._returned_twice(conn)
        else:
            self.retire(conn, problem)
        if slots.closed and not slots.checked_out:
            process.untrack(self)

    def _returned_connection(self, conn: Any, key: Any) -> Any:
        """The connection being returned (by itself or by key), if it is one of ours."""
        if conn is None:
            if key is None:
                raise PoolError("putconn() needs the connection or the key it was taken with")
            conn = self.slots.keyed.get(key)
            if conn is None:
                raise PoolError(f"pool {self.name!r} has no connection checked out for {key!r}")
        entry = getattr(conn, "pool_entry", None)
        if entry is None or entry.pool is not self:
            raise PoolError(
                f"this connection does not belong to pool {self.name!r}; return it to the "
                f"pool it was taken from"
            )
        return conn

    def _returned_twice(self, conn: Any) -> None:
        if self._pid != os.getpid():
            process.detach_sockets([conn])  # inherited from the parent process: not ours
            return
        if self.closed and conn.closed:
            return  # closed with the pool (close(force=True)) while it was out
        raise PoolError(
            f"this connection is not checked out from pool {self.name!r} (returned twice?)"
        )

    def _reset_and_make_available(self, conn: Any) -> None:
        """Start a returned connection's reset (it is counted in ``resetting``), then pass it on.

        The reset is sent outside the lock and before the connection becomes
        available, so nobody can take it with its reset unsent; whoever takes
        it reads the reset's answer first.
        """
        usable = False
        try:
            usable = self.connector.begin_reset(conn)
        finally:
            # Even when interrupted halfway (then the connection goes).
            slots = self.slots
            with slots.lock:
                slots.resetting -= 1
                reason = (
                    self._retirement_reason_locked(conn, time.monotonic())
                    if usable
                    else "its reset failed"
                )
                if not reason:
                    slots.make_available_locked(conn)
            if reason:
                self.retire(conn, reason)

    def _retirement_reason_locked(self, conn: Any, now: float) -> str:
        """Why a healthy connection must not be used again, or "" if it may. Lock held."""
        entry = conn.pool_entry
        slots = self.slots
        if slots.closed:
            return "the pool was closed"
        if now >= entry.expires_at:
            slots.counters.values["connections_expired"] += 1
            return "it reached max_lifetime"
        if entry.generation != self.generation:
            return "the pool was drained"
        if slots.size > slots.max_size:
            return "the pool was resized below its size"
        return ""

    # ------------------------------------------------------------------ joining and leaving

    def add(self, conn: Any) -> None:
        """A new, checked or reset connection joins the pool (to the longest waiter, or idle)."""
        if not self.slots.make_available(conn):
            self.retire(conn, "the pool was closed")

    def retire(self, conn: Any, reason: str) -> None:
        """Close a connection and free its slot, here and now.

        Closing never waits on the network (a silent socket is shut down
        rather than waited for), so the slot is free as soon as this returns,
        and only after the socket is closed: the server never sees more than
        ``max_size`` connections.
        """
        self.roles.retiring(conn)  # counted against its server's event, if any (roles.py)
        slots = self.slots
        slots.connections.pop(id(conn), None)
        self.connector.close(conn, reason)
        if reason != "the pool was closed":
            self._emit("connection_discarded", reason=reason)
        with slots.lock:
            self.release_slot_locked()
            below_min = slots.size < slots.min_size
        if below_min and self.worker is not None:
            self.worker.signal()

    def release_slot_locked(self) -> None:
        """A slot became free: refill it for a waiter if the server answers. Lock held."""
        reachable = self.outage.error is None
        self.slots.release_locked(self.opener.start_connector if reachable else None)

    def retire_checked_out(self, conn: Any, reason: str) -> None:
        """Retire a connection that is checked out (its holder won't return it)."""
        entry = conn.pool_entry
        with self.slots.lock:
            self.slots.checked_out.pop(id(conn), None)
            entry.checkout_id = 0
            if entry.key is not None:
                self.slots.keyed.pop(entry.key, None)
                entry.key = None
        ownership.end_lease(entry, conn)
        self.retire(conn, reason)

    # ------------------------------------------------------------------ life cycle

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start the pool's background worker (idempotent).

        With ``wait=True``, also block until ``min_size`` connections are open,
        raising ``PoolTimeout`` with the last connection error if that takes
        longer than ``timeout`` seconds: a warm-up that fails fast when the
        database is unreachable.
        """
        if self.worker is None:
            self._start_worker()
        if wait:
            self.opener.warm_up(self._argument("open", "timeout", timeout, validation.seconds))

    def _start_worker(self) -> None:
        with self.slots.lock:
            if self.worker is not None or self.closed:
                return
            self.worker = Worker(self)
        self.worker.start()

    def submit(self, task: Callable[..., Any], *args: Any) -> None:
        """Have the worker run ``task(*args)`` (or run it here if there is no worker)."""
        worker = self.worker
        if worker is not None and worker.alive:
            worker.submit(task, *args)
        else:
            task(*args)

    def close(self, timeout: float = 5.0, *, force: bool = False, at_exit: bool = False) -> None:
        """Close the pool.

        Idle connections are closed now; connections in use are closed when
        they are returned, so the threads using them carry on undisturbed.
        Callers waiting for a connection get ``PoolClosed``. With
        ``force=True`` the connections still checked out are closed too (for
        when their holders are known to be finished, as before a test
        database is dropped). ``at_exit``: the interpreter is exiting.
        """
        timeout = self._argument("close", "timeout", timeout, validation.seconds)
        if self._pid != os.getpid():
            self.abandon_after_fork()
            return
        slots = self.slots
        error = (
            None
            if at_exit
            else PoolClosed(
                f"pool {self.name!r} was closed while this request waited for a connection"
            )
        )
        with slots.lock:
            if slots.closed and not force:
                return
            to_close = slots.close_locked(error, force)
        try:
            for conn in to_close:
                slots.connections.pop(id(conn), None)
                self.connector.close(conn, "the pool was closed")
        finally:
            worker = self.worker
            if worker is not None:
                worker.signal()
                worker.join(timeout)
            if not slots.checked_out:
                # Otherwise it stays findable (live_pools()) until they are back.
                process.untrack(self)

    def close_leftovers(self) -> None:
        """The pool is closed: close whatever came back after close() (the worker's last job)."""
        with self.slots.lock:
            leftovers = self.slots.close_locked(None, force=False)
        for conn in leftovers:
            self.slots.connections.pop(id(conn), None)
            self.connector.close(conn, "the pool was closed")

    def closeall(self) -> None:
        """psycopg2's name for :meth:`close` (in-use connections close on return)."""
        self.close()

    def abandon_after_fork(self) -> None:
        """Forget a pool inherited from the parent process without talking to the server.

        Each socket is replaced by ``/dev/null`` in this process (see
        :func:`.process.detach_sockets`), after which the connection objects
        can be dropped.
        """
        inherited = self.slots
        # New bookkeeping: the parent may have forked while another of its
        # threads held the lock, and this process must never wait for it.
        self.slots = Slots(inherited.min_size, inherited.max_size)
        self.slots.closed = True
        self.counters = self.slots.counters
        process.detach_sockets(list(inherited.connections.values()))
        process.untrack(self)

    # ------------------------------------------------------------------ runtime control
    # The work is in maintenance.py; across processes, control.py.

    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Change the pool's sizes while it runs.

        Growing lets waiting requests open connections at once; shrinking
        closes idle connections beyond the new ``max_size`` now and busy ones
        as they come back.
        """
        maintenance.resize(self, min_size, max_size)

    def drain(self) -> None:
        """Retire every current connection gracefully.

        For after a password rotation or a failover: idle connections are
        closed now, busy ones when they come back, none is handed out again,
        and ``min_size`` new ones are opened in the background.
        """
        maintenance.drain(self)

    @property
    def paused(self) -> bool:
        return self.slots.paused

    def pause(self) -> None:
        """Stop handing out connections until :meth:`resume` (HikariCP's pool suspension).

        New checkouts wait (up to ``timeout``, first come first served);
        connections in use carry on and come back as usual, and stay idle. For
        planned maintenance: pause, wait until ``stats()["pool_in_use"]`` is 0,
        switch servers, :meth:`drain`, resume.
        """
        maintenance.pause(self)

    def resume(self) -> None:
        """End a :meth:`pause`: waiting requests get connections, longest waiting first."""
        maintenance.resume(self)

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """Take a connection for a ``with`` block run as one transaction: committed
        on success, rolled back on error, and the connection always given back."""
        conn = self.getconn(timeout=timeout, bind_to_thread=True)
        try:
            # Pooled connections rest in autocommit; the reset on return restores it.
            conn.autocommit = False
            yield conn
            if not conn.closed and not conn.autocommit:
                conn.commit()
        except BaseException:
            if not conn.closed and conn.info.transaction_status != TRANSACTION_IDLE:
                with suppress(psycopg2.Error):
                    conn.rollback()
            raise
        finally:
            self.putconn(conn)

    def stats(self) -> dict[str, Any]:
        """Current state and counters since the pool was built.

        Names follow psycopg_pool's ``get_stats()`` where the meaning is the same.
        """
        with self.slots.lock:
            values = {**self.slots.gauges_locked(), **self.counters.snapshot()}
        return {**values, **self.roles.stats()}

    get_stats = stats

    def _emit(self, event: str, **info: Any) -> None:
        """Tell ``on_event`` (if set); a failing listener never breaks the pool."""
        listener = self.on_event
        if listener is None:
            return
        try:
            listener(event, {"pool": self.name, **info})
        except Exception:
            logger.exception("pool %r: the %s listener failed", self.name, event)
