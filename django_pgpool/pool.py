"""A psycopg2 connection pool for threaded servers.

:class:`ConnectionPool` keeps the API of psycopg2's ``ThreadedConnectionPool``
(``getconn`` / ``putconn`` / ``closeall``) and fixes its traps:

- an exhausted pool makes callers wait, first come first served, up to
  ``timeout`` instead of raising at once;
- returned connections are kept (up to ``max_size``) instead of being closed
  whenever more than ``minconn`` are idle, so a busy pool doesn't churn;
- new connections are opened outside the pool's lock, so one slow connect
  never stalls the threads that are returning or taking connections.

On top of that it makes the connections safe to share between requests: a
returned connection is rolled back and its session reset (one ``DISCARD ALL``,
in the background), a connection is checked before it is handed out when
it has been idle or looks dead, connections are retired after ``max_lifetime``
and ``max_idle``, ``min_size`` connections are opened ahead of need, a pool
inherited through ``fork()`` is abandoned without touching the parent's
sockets, connections held by threads that exited come back, and leaks are
reported.

This module does not import Django; :mod:`django_pgpool.base` plugs it into
Django's PostgreSQL backend.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import random
import select
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg2
import psycopg2.extensions as ext
from psycopg2.pool import ThreadedConnectionPool

from .errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests

if TYPE_CHECKING:
    from .config import PoolConfig

logger = logging.getLogger("django_pgpool")

#: What ``reset=True`` runs on a returned connection that executed anything:
#: the statements ``DISCARD ALL`` stands for. ``DISCARD ALL`` itself refuses to
#: run in a multi-statement query, and spelling it out lets the session
#: settings Django needs (time zone, role) be restored in the same round trip.
RESET_SQL = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    "UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; "
    "DISCARD SEQUENCES"
)

#: A connection idle for less than this is handed out without even the local
#: socket check: it worked a moment ago, and at this timescale a server-side
#: kill may not have reached the socket yet anyway.
SOCKET_CHECK_AFTER = 0.001

#: A connection's ``max_lifetime`` is shortened by up to this fraction, at
#: random, so that connections opened together don't all expire together.
LIFETIME_JITTER = 0.05

#: How often the background worker looks for expired, idle-too-long and leaked
#: connections and tops the pool up to ``min_size``.
HOUSEKEEPING_INTERVAL = 1.0

#: Pauses between background attempts to reach an unreachable server: the
#: first, and the longest it grows to.
FIRST_RECONNECT_BACKOFF = 0.05
MAX_RECONNECT_BACKOFF = 2.0

# Connection errors that waiting cannot fix: the server answered, and refused
# this client for good. Anything else (refused, timed out, starting up,
# shutting down, too many clients) is worth waiting out.
_PERMANENT_CONNECT_ERRORS = (
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "permission denied",
    "not permitted to log in",
    "invalid connection option",
    "invalid dsn",
    "password is required",
    "password supplied",
)


def _requests(count: int, *, were: bool = False) -> str:
    """ "1 request is" / "3 requests are" (or "was" / "were"), for messages."""
    if count == 1:
        return f"1 request {'was' if were else 'is'}"
    return f"{count} requests {'were' if were else 'are'}"


def evaluated(value: Any) -> Any:
    """A connection parameter's value for a new connection.

    Credentials that change (a cloud IAM token) are given as a callable,
    evaluated for every new connection. Factories are classes: left alone.
    """
    return value() if callable(value) and not isinstance(value, type) else value


def _is_transient_connect_error(exc: BaseException) -> bool:
    message = str(exc).lower()
    return not any(marker in message for marker in _PERMANENT_CONNECT_ERRORS)


_TRANSACTION_IDLE = ext.TRANSACTION_STATUS_IDLE
_UNUSABLE_STATUSES = frozenset((ext.TRANSACTION_STATUS_ACTIVE, ext.TRANSACTION_STATUS_UNKNOWN))
_OPEN_TRANSACTION_STATUSES = frozenset(
    (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)
)

#: A connection returned with its transaction still open is reported at most
#: this often (seconds) per pool; the statistics count every one.
OPEN_TRANSACTION_REPORT_INTERVAL = 60.0

_INFINITY = float("inf")

# Per-connection bookkeeping lives in slots of a subclass of the connection
# class, so the hot path reads attributes instead of looking connections up.
_SLOTS = (
    "_pgpool_pool",
    "_pgpool_created_at",
    "_pgpool_expires_at",
    "_pgpool_last_used",
    "_pgpool_poller",
    "_pgpool_dirty",
    "_pgpool_checked_out_at",
    "_pgpool_lease",
    "_pgpool_origin",
    "_pgpool_leak_reported",
    "_pgpool_key",
    "_pgpool_cursor_factory",
    "_pgpool_generation",
    "_pgpool_checkout_id",
    "_pgpool_holder",
)

_pooled_classes: dict[type, type] = {}
_pooled_classes_lock = threading.Lock()


def pooled_connection_class(base: type[Any]) -> type[Any]:
    """A subclass of the psycopg2 connection class ``base`` that the pool can track.

    Besides the bookkeeping slots, it marks the connection "dirty" whenever a
    cursor is opened (every statement needs one) or the client encoding is
    changed, so that a connection that ran nothing goes back to the pool
    without a reset round trip.
    """
    if base in _pooled_classes.values():
        return base
    with _pooled_classes_lock:
        cls = _pooled_classes.get(base)
        if cls is None:
            base_cursor = base.cursor
            base_set_client_encoding = base.set_client_encoding

            def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
                self._pgpool_dirty = True
                return base_cursor(self, *args, **kwargs)

            def set_client_encoding(self: Any, encoding: str) -> None:
                self._pgpool_dirty = True
                base_set_client_encoding(self, encoding)

            cls = type(
                f"Pooled{base.__name__.capitalize()}",
                (base,),
                {
                    "__slots__": _SLOTS,
                    "__module__": __name__,
                    "__doc__": f"A pooled {base.__module__}.{base.__qualname__}.",
                    "cursor": cursor,
                    "set_client_encoding": set_client_encoding,
                },
            )
            _pooled_classes[base] = cls
        return cls


class _Waiter:
    """A caller waiting for a connection; woken by releasing ``event`` with a
    connection or an error."""

    __slots__ = ("conn", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Lock()
        self.event.acquire()
        self.conn: Any = None
        self.error: BaseException | None = None


class _ThreadLease:
    """The connections one thread checked out with ``bind_to_thread=True``.

    It lives in a ``threading.local``, so it is destroyed when its thread ends;
    any connection still listed then goes back to its pool instead of pinning
    a slot forever. It holds no reference to itself through the connections
    (they point back with a weak reference), so it dies with the thread rather
    than at some later garbage collection.
    """

    __slots__ = ("__weakref__", "connections", "pid", "ref", "thread_name")

    def __init__(self) -> None:
        self.connections: dict[int, Any] = {}
        self.ref = weakref.ref(self)
        self.pid = os.getpid()
        self.thread_name = threading.current_thread().name

    def __del__(self) -> None:
        # A forked child inherits the parent's thread-local storage; those
        # connections belong to the parent.
        if self.pid != os.getpid() or not self.connections:
            return
        for conn, keep_if, checkout_id in list(self.connections.values()):
            if keep_if is not None and keep_if():
                continue  # handed on to another thread, which will return it
            pool = conn._pgpool_pool
            if pool is not None:
                pool.reclaim_abandoned(conn, checkout_id, f"thread {self.thread_name!r} ended")


_thread_state = threading.local()

# Every checkout gets a number, so that taking back an abandoned connection
# can never take one that has been returned and checked out again since.
_checkout_ids = itertools.count(1)


def _current_lease() -> _ThreadLease:
    try:
        lease: _ThreadLease = _thread_state.lease
    except AttributeError:
        lease = _thread_state.lease = _ThreadLease()
    return lease


def _release_lease(conn: Any) -> None:
    ref = conn._pgpool_lease
    if ref is not None:
        conn._pgpool_lease = None
        lease = ref()
        if lease is not None:
            lease.connections.pop(id(conn), None)


def _socket_has_data(conn: Any) -> bool:
    """Whether the server sent something to a connection nobody is using.

    An idle connection should receive nothing; data (or end of file) means the
    server terminated the session or restarted, or at least that something
    unexpected is pending. Costs a system call, not a round trip.
    """
    return bool(conn._pgpool_poller.poll(0))


def _make_poller(conn: Any) -> Any:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        return poller
    return _SelectPoller(conn.fileno())  # pragma: no cover - platforms without poll()


class _SelectPoller:  # pragma: no cover - platforms without poll()
    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def poll(self, timeout: float) -> list[int]:
        readable, _, _ = select.select([self.fd], [], [], timeout)
        return readable


def _caller_stack() -> traceback.StackSummary:
    """The stack of whoever called into the pool, without the pool's own frames."""
    stack = traceback.extract_stack(sys._getframe(1), limit=60)
    while stack and stack[-1].filename == __file__:
        stack.pop()
    return stack


def _escape_option(value: str) -> str:
    """Escape a value for libpq's ``options`` (spaces and backslashes)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def _exception_summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class ConnectionPool(ThreadedConnectionPool):
    """A thread-safe pool of psycopg2 connections to one database.

    ``connect_kwargs`` are passed to ``psycopg2.connect()`` for every new
    connection (a callable returning them is called each time instead, so
    credentials can change while the pool runs).

    The session every user of the pool relies on (Django's time zone and role)
    comes in two parts. ``session_settings`` (setting name to value) are sent
    as startup parameters, which makes them the session's defaults: the reset
    (``DISCARD ALL``) restores them for free. Where a proxy refuses or ignores
    startup parameters (PgBouncer), the pool notices and applies them with SQL
    instead. ``session_sql`` with ``session_params`` runs on every new
    connection and after every reset, in the same round trip as the reset.
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
        # minconn=0: psycopg2's constructor would otherwise connect right now,
        # in whatever process builds the pool; ours fills up in the background
        # once the pool is first used.
        super().__init__(0, config.max_size)
        self.config = config
        self.name = config.name or "pool"
        self.minconn = config.min_size
        self._connect_kwargs = connect_kwargs
        #: The database this pool connects to, when known up front.
        self.dbname: str | None = None if callable(connect_kwargs) else connect_kwargs.get("dbname")
        self._session_settings = dict(session_settings or {})
        # Until a server or proxy proves otherwise.
        self._startup_settings_work = True
        self._session_sql = session_sql
        self._session_params = tuple(session_params)
        self._prepare = prepare
        reset = config.reset
        if reset is True:
            self._reset_sql = RESET_SQL
        elif isinstance(reset, str):
            self._reset_sql = reset
        else:
            self._reset_sql = ""
        self._reset_callable = reset if callable(reset) else None
        self._resets_sessions = reset is not False
        self._check_window = 0.0 if config.check_every_checkout else config.check_after_idle
        # Idle connections are retired this long before they expire, so that a
        # request practically never finds an expired one.
        lifetime = config.max_lifetime
        self._retire_ahead = min(1.0, lifetime * LIFETIME_JITTER) if lifetime else 0.0

        self._pid = os.getpid()
        self._idle: list[Any] = []  # a stack: the most recently used comes out first
        self._waiters: deque[_Waiter] = deque()
        self._resets: deque[Any] = deque()  # returned connections awaiting their reset
        self._resetting = 0  # resets under way right now
        self._opening = 0  # connectors under way right now
        self._orphans: deque[tuple[Any, int, str]] = deque()  # abandoned by their holder
        self._closing: deque[tuple[Any, str]] = deque()  # for the worker to close
        self._checked_out: dict[int, Any] = {}
        self._all: dict[int, Any] = {}  # every open connection, for fork safety
        self._keyed: dict[Any, Any] = {}  # psycopg2's getconn(key) mapping
        self._size = 0  # connections open, being opened, or being reset
        self._suspect_before = 0.0  # connections last used before this get a round-trip check
        self._sweep_requested = False
        self._opened = False
        self._worker: threading.Thread | None = None
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._worker_signalled = False
        self._last_housekeeping = 0.0
        self._reconnect_after = 0.0
        self._reconnect_backoff = 0.0
        # Set while new connections fail: requests then wait for the worker to
        # reconnect instead of each hammering the server (or failing at once).
        self._unreachable: BaseException | None = None
        self._unreachable_since = 0.0
        self._reclaim_logged = False
        self._open_transaction_reported_at = -_INFINITY
        self._open_transactions_unreported = 0
        self._generation = 0  # drain() starts a new one; older connections are retired
        #: Called as ``on_event(event, info)`` (never with the lock held) when a
        #: request times out ("pool_exhausted") or a connection is closed for a
        #: reason other than the pool closing ("connection_discarded").
        self.on_event: Callable[[str, dict[str, Any]], None] | None = None
        self._stats: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        _live_pools.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._size}/{self.maxconn} connections"
        return f"<{type(self).__name__} {self.name!r} {state}>"

    # ------------------------------------------------------------------ life cycle

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start the pool's background worker (idempotent).

        With ``wait=True``, also block until ``min_size`` connections are open,
        raising ``PoolTimeout`` with the last connection error if that takes
        longer than ``timeout`` seconds: a warm-up that fails fast when the
        database is unreachable.
        """
        if not self._opened:
            self._start_worker()
        if wait:
            self._wait_for_min_size(timeout)

    def _start_worker(self) -> None:
        with self._lock:
            if self._opened or self.closed:
                return
            self._opened = True
            self._worker = threading.Thread(
                target=_run_worker,
                args=(weakref.ref(self),),
                name=f"pgpool-{self.name}",
                daemon=True,
            )
        self._worker.start()

    def _wait_for_min_size(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            with self._lock:
                if self.closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                missing = self.minconn - self._size
                if missing <= 0:
                    return
                self._size += 1
            try:
                conn = self._open_connection()
            except BaseException as exc:
                # Whatever ends the attempt, a signal handler's exception
                # included, the reserved slot is given back.
                with self._lock:
                    self._release_slot_locked()
                if not isinstance(exc, psycopg2.Error):
                    raise
                last_error = exc
                if time.monotonic() >= deadline:
                    raise PoolTimeout(
                        f"pool {self.name!r} could not open its {self.minconn} connection(s) "
                        f"within {timeout:g} s; the last attempt failed with "
                        f"{_exception_summary(last_error)}",
                        pool_name=self.name,
                        max_size=self.maxconn,
                        timeout=timeout,
                    ) from exc
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                with self._lock:
                    self._make_available_locked(conn)

    def close(self, timeout: float = 5.0, *, force: bool = False, _at_exit: bool = False) -> None:
        """Close the pool.

        Idle connections are closed now; connections in use are closed when
        they are returned, so the threads using them carry on undisturbed.
        Callers waiting for a connection get ``PoolClosed``. With
        ``force=True`` the connections still checked out are closed too (for
        when their holders are known to be finished, as before a test
        database is dropped).
        """
        if self._pid != os.getpid():
            self._abandon_after_fork()
            return
        with self._lock:
            if self.closed and not force:
                return
            self.closed = True
            to_close = self._idle + list(self._resets)
            self._idle.clear()
            self._resets.clear()
            if force:
                to_close += self._checked_out.values()
                self._checked_out.clear()
            self._size -= len(to_close)
            # At interpreter exit the threads still waiting are daemon threads
            # about to vanish: waking them with an error would only print
            # tracebacks.
            waiters = [] if _at_exit else list(self._waiters)
            if not _at_exit:
                self._waiters.clear()
            for waiter in waiters:
                waiter.error = PoolClosed(
                    f"pool {self.name!r} was closed while this request waited for a connection"
                )
                waiter.event.release()
        for conn in to_close:
            self._close_connection(conn, "the pool was closed")
        self._signal_worker()
        worker = self._worker
        if worker is not None and worker is not threading.current_thread() and worker.is_alive():
            worker.join(timeout)
        if not self._checked_out:
            # Otherwise it stays findable (live_pools()) until they are back.
            _live_pools.discard(self)

    def closeall(self) -> None:
        """psycopg2's name for :meth:`close` (in-use connections close on return)."""
        self.close()

    def _abandon_after_fork(self) -> None:
        """Forget a pool inherited from the parent process without talking to the server.

        Closing an inherited libpq connection would send a Terminate message
        down the socket the parent is still using. Each socket is instead
        replaced by ``/dev/null`` in this process, after which the connection
        objects can be dropped: whatever libpq writes on them goes nowhere.
        """
        self.closed = True
        # The parent may have forked while another of its threads held the
        # lock; this process must never wait for that thread.
        self._lock = threading.Lock()
        connections = list(self._all.values())
        self._idle = []
        self._resets = deque()
        self._waiters = deque()
        self._checked_out = {}
        self._keyed = {}
        self._all = {}
        self._size = 0
        _detach_sockets(connections)
        _live_pools.discard(self)

    # ------------------------------------------------------------------ checkout

    def getconn(
        self,
        key: Any = None,
        *,
        timeout: float | None = None,
        bind_to_thread: bool = False,
        keep_if: Callable[[], bool] | None = None,
    ) -> Any:
        """Take a connection, waiting up to ``timeout`` seconds (default: the pool's).

        With ``key``, the same connection is returned for the same key until it
        is put back (psycopg2's semantics). With ``bind_to_thread=True`` the
        connection is returned to the pool by itself if the calling thread ends
        without putting it back, unless ``keep_if()`` then says it is still in
        use elsewhere (a connection handed on to another thread on purpose).
        """
        if self._pid != os.getpid():
            self._abandon_after_fork()
            raise PoolClosed(
                f"pool {self.name!r} was created in process {self._pid} and cannot be used "
                f"after fork(); build a new pool in this process"
            )
        if key is not None:
            with self._lock:
                conn = self._keyed.get(key)
            if conn is not None:
                return conn
        if not self._opened:
            self._start_worker()

        waiter: _Waiter | None = None
        wait_started = 0.0
        counted = False
        while True:
            conn = None
            needs_reset = False
            start_connector = False
            with self._lock:
                if self.closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if not counted:
                    self._stats["requests_num"] += 1
                    counted = True
                if not self._waiters:
                    if self._idle:
                        conn = self._idle.pop()
                    elif self._resets:
                        # Its reset hasn't started: do it here rather than wait.
                        conn = self._resets.popleft()
                        needs_reset = True
                if conn is not None:
                    self._checked_out[id(conn)] = conn
                    # Numbered with the lock held, in the same step that marks it
                    # checked out: a finalizer taking back an earlier checkout
                    # of this connection must never match this one.
                    conn._pgpool_checkout_id = next(_checkout_ids)
                else:
                    if self._size < self.maxconn and self._unreachable is None:
                        # A free slot and the server was answering: a connector
                        # opens one while we wait like everyone else, so that
                        # our wait is bounded by the timeout however slow that
                        # is. (Rather than wait for a connection being reset:
                        # one more connection lets every later reset overlap
                        # with the next request instead of delaying it.)
                        self._size += 1
                        self._opening += 1
                        start_connector = True
                    max_waiting = self.config.max_waiting
                    if not start_connector and max_waiting and len(self._waiters) >= max_waiting:
                        self._stats["requests_errors"] += 1
                        raise TooManyRequests(
                            f"pool {self.name!r}: {_requests(len(self._waiters))} already "
                            f"waiting for one of its {self.maxconn} connections "
                            f"(max_waiting={max_waiting}); raise max_waiting or max_size, or "
                            f"shed load"
                        )
                    waiter = _Waiter()
                    self._waiters.append(waiter)
                    self._stats["requests_queued"] += 1

            if conn is not None:
                try:
                    now = time.monotonic()
                    if needs_reset:
                        usable = self._reset_connection(conn) and not self._retirement_reason(
                            conn, now
                        )
                    else:
                        last_used = conn._pgpool_last_used
                        # The common case, inline: recently used, not expired or
                        # drained, nothing unexpected on its socket. No round trip.
                        idle_for = now - last_used
                        usable = (
                            idle_for <= self._check_window
                            and last_used >= self._suspect_before
                            and now < conn._pgpool_expires_at
                            and conn._pgpool_generation == self._generation
                            and not conn.closed
                            and (idle_for < SOCKET_CHECK_AFTER or not conn._pgpool_poller.poll(0))
                        ) or self._is_usable(conn, now)
                    if usable:
                        return self._hand_out(conn, key, bind_to_thread, keep_if, wait_started, now)
                except BaseException:
                    # Interrupted (a signal handler, gevent.Timeout) halfway
                    # through a check or a reset: the connection's state is
                    # unknown, so it goes, and its slot with it.
                    self._discard_checked_out(conn, "its checkout was interrupted")
                    raise
                self._discard_checked_out(conn, "it failed its check")
                continue

            if start_connector:
                self._start_connector()

            # Wait for a connection to be handed to us.
            assert waiter is not None
            if not wait_started:
                wait_started = time.monotonic()
            try:
                conn = self._wait(waiter, wait_started, timeout)
                return self._hand_out(
                    conn, key, bind_to_thread, keep_if, wait_started, time.monotonic()
                )
            except BaseException:
                # Whatever ended the wait (a timeout, or an exception raised
                # by a signal handler, gevent.Timeout or another thread), the
                # waiter leaves the queue, and a connection already handed to
                # it goes to the next waiter or back to the pool.
                self._abandon_wait(waiter)
                raise

    def _abandon_wait(self, waiter: _Waiter) -> None:
        """Take a waiter that gave up out of the queue, passing on what it was handed."""
        with self._lock:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass
            else:
                return
            conn: Any = waiter.conn
            waiter.conn = None
            if conn is None:
                return
            if id(conn) in self._checked_out:
                del self._checked_out[id(conn)]
                conn._pgpool_checkout_id = 0
                if conn._pgpool_key is not None:
                    self._keyed.pop(conn._pgpool_key, None)
                    conn._pgpool_key = None
            self._make_available_locked(conn)
        _release_lease(conn)

    def _wait(self, waiter: _Waiter, wait_started: float, timeout: float | None) -> Any:
        """Wait until a connection is handed to ``waiter``; return it checked out."""
        waited_for = self.config.timeout if timeout is None else timeout
        deadline = wait_started + waited_for
        if not waiter.event.acquire(timeout=max(0.0, deadline - time.monotonic())):
            error: PoolTimeout | None = None
            with self._lock:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass  # handed something just as the time ran out: take it
                else:
                    self._stats["requests_errors"] += 1
                    self._stats["requests_timeouts"] += 1
                    waiting = len(self._waiters) + 1
                    in_use = len(self._checked_out)
                    unreachable = self._unreachable
                    if unreachable is not None:
                        reason = (
                            f"The database could not be reached for the last "
                            f"{time.monotonic() - self._unreachable_since:.1f} s (last "
                            f"error: {_exception_summary(unreachable)}); the pool keeps "
                            f"trying to reconnect. {_requests(waiting, were=True)} waiting."
                        )
                    elif self._opening:
                        reason = (
                            f"{self._opening} new connection(s) were still being opened "
                            f"(logging in, or the first statement on it, is slow: is a "
                            f"proxy such as PgBouncer out of server connections?). "
                            f"{_requests(waiting, were=True)} waiting."
                        )
                    else:
                        reason = (
                            f"All {self.maxconn} connections (max_size) were in use "
                            f"({in_use} checked out) and "
                            f"{_requests(waiting, were=True)} waiting. "
                            f"{self._describe_holders_locked()}Raise "
                            f"OPTIONS['pool']['max_size'] if the database has room, or make "
                            f"those give their connection back sooner."
                        )
                    error = PoolTimeout(
                        f"pool {self.name!r}: no connection became available within "
                        f"{waited_for:g} s. {reason}",
                        pool_name=self.name,
                        max_size=self.maxconn,
                        timeout=waited_for,
                        waiting=waiting,
                    )
            if error is not None:
                self._emit(
                    "pool_exhausted",
                    max_size=self.maxconn,
                    timeout=waited_for,
                    waiting=error.waiting,
                    unreachable=self._unreachable is not None,
                )
                raise error
        if waiter.error is not None:
            raise waiter.error
        conn = waiter.conn
        with self._lock:
            self._checked_out[id(conn)] = conn
            conn._pgpool_checkout_id = next(_checkout_ids)
        return conn

    def _describe_holders_locked(self, most: int = 5) -> str:
        """Who holds the checked-out connections, longest first. Lock held."""
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        now = time.monotonic()
        held = sorted(self._checked_out.values(), key=lambda c: c._pgpool_checked_out_at)
        parts = []
        idle_holders = 0
        for conn in held[:most]:
            try:
                busy = conn.get_transaction_status() != _TRANSACTION_IDLE
            except Exception:
                busy = False
            idle_holders += not busy
            parts.append(
                f"{names.get(conn._pgpool_holder, 'an ended thread')} for "
                f"{now - conn._pgpool_checked_out_at:.1f} s"
                f"{', in a transaction' if busy else ', idle'}"
            )
        if not parts:
            return ""
        more = f" and {len(held) - most} more" if len(held) > most else ""
        hint = (
            " Threads that hold a connection while idle are the usual cause: code run by "
            "sync_to_async(thread_sensitive=False) or in threads you start keeps its "
            "connection until it is closed (wrap such code with "
            "django_pgpool.closing_connections)."
            if idle_holders
            else ""
        )
        return f"Held by: {'; '.join(parts)}{more}.{hint} "

    def _start_connector(self) -> None:
        """Open a connection in a reserved slot, in a thread of its own."""
        threading.Thread(
            target=self._connect_into_slot, name=f"pgpool-{self.name}-connect", daemon=True
        ).start()

    def _connect_into_slot(self) -> None:
        """A connector: open a connection and give it to the longest waiter.

        If the server can't be reached, the slot is given up and the worker
        reconnects for everyone while requests wait; if waiting can't help (a
        wrong password, a missing database), the longest waiter gets the error.
        """
        started_in = os.getpid()
        try:
            conn = self._open_connection()
        except Exception as exc:
            if os.getpid() != started_in:
                _park_forever()  # copied into a forked child mid-connect (gevent)
            transient = _is_transient_connect_error(exc)
            with self._lock:
                self._opening -= 1
                self._size -= 1
                if not transient and self._waiters:
                    waiter = self._waiters.popleft()
                    waiter.error = exc
                    waiter.event.release()
            if transient:
                self._note_unreachable(exc)
            else:
                logger.warning(
                    "pool %r: cannot open connections: %s", self.name, _exception_summary(exc)
                )
            return
        if os.getpid() != started_in:
            _detach_sockets([conn])  # the parent's pool asked for it, not this process
            _park_forever()
        if self._unreachable is not None:
            self._note_reachable()
        with self._lock:
            self._opening -= 1
            accepted = not self.closed
            if accepted:
                self._make_available_locked(conn)
        if not accepted:
            self._discard(conn, "the pool was closed")

    def _hand_out(
        self,
        conn: Any,
        key: Any,
        bind_to_thread: bool,
        keep_if: Callable[[], bool] | None,
        wait_started: float,
        now: float,
    ) -> Any:
        conn._pgpool_checked_out_at = now
        checkout_id = conn._pgpool_checkout_id
        conn._pgpool_holder = threading.get_ident()
        if bind_to_thread:
            lease = _current_lease()
            lease.connections[id(conn)] = (conn, keep_if, checkout_id)
            conn._pgpool_lease = lease.ref
        if self.config.leak_threshold:
            conn._pgpool_origin = _caller_stack()
            conn._pgpool_leak_reported = False
        if wait_started or key is not None:
            with self._lock:
                if wait_started:
                    waited = (now - wait_started) * 1000.0
                    self._stats["requests_wait_ms"] += waited
                    if waited > self._stats["requests_wait_max_ms"]:
                        self._stats["requests_wait_max_ms"] = waited
                if key is not None:
                    self._keyed[key] = conn
                    conn._pgpool_key = key
        return conn

    def _is_usable(self, conn: Any, now: float) -> bool:
        """Whether an idle connection may be handed out, with a round trip only if needed."""
        if conn.closed or conn._pgpool_generation != self._generation:
            return False
        if now >= conn._pgpool_expires_at:
            self._count("connections_expired")
            return False
        if (
            now - conn._pgpool_last_used <= self._check_window
            and conn._pgpool_last_used >= self._suspect_before
            and not _socket_has_data(conn)
        ):
            return True
        return self._check_connection(conn)

    def _check_connection(self, conn: Any) -> bool:
        """A round-trip check; a failure makes every idle connection suspect."""
        self._count("checks_num")
        was_dirty = conn._pgpool_dirty
        try:
            if self.config.check is not None:
                self.config.check(conn)
            else:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
        except Exception as exc:
            self._count("checks_failed")
            self._count("connections_lost")
            logger.info(
                "pool %r: discarding a connection that failed its check (%s)",
                self.name,
                _exception_summary(exc),
            )
            # Whatever killed this one (a restart, pg_terminate_backend, a
            # network cut) probably hit the others that sat idle beside it.
            self._suspect_before = time.monotonic()
            self._sweep_requested = True
            self._signal_worker()
            return False
        conn._pgpool_dirty = was_dirty
        conn._pgpool_last_used = time.monotonic()
        return True

    # ------------------------------------------------------------------ return

    def putconn(self, conn: Any = None, key: Any = None, close: bool = False) -> None:
        """Give a connection back (psycopg2's signature).

        A connection that is closed, broken, past its lifetime, or returned
        with ``close=True`` is closed; any other is rolled back and reset
        before anyone else gets it. Returning to a closed pool closes the
        connection without error.
        """
        if conn is None:
            if key is None:
                raise PoolError("putconn() needs the connection or the key it was taken with")
            with self._lock:
                conn = self._keyed.get(key)
            if conn is None:
                raise PoolError(f"pool {self.name!r} has no connection checked out for {key!r}")
        if getattr(conn, "_pgpool_pool", None) is not self:
            raise PoolError(
                f"this connection does not belong to pool {self.name!r}; return it to the "
                f"pool it was taken from"
            )
        now = time.monotonic()
        if conn._pgpool_lease is not None:
            _release_lease(conn)
        if conn._pgpool_origin is not None:
            conn._pgpool_origin = None
            if conn._pgpool_leak_reported:
                logger.info(
                    "pool %r: the connection reported as leaked was returned after %.1f s",
                    self.name,
                    now - conn._pgpool_checked_out_at,
                )
        # What the connection itself says, before taking the lock: all local
        # state, no round trip.
        needs_reset = False
        if close:
            problem = "the caller asked to close it"
        elif conn.closed:
            problem = "it was closed or broken"
        else:
            status = conn.get_transaction_status()
            if status in _UNUSABLE_STATUSES:
                problem = (
                    "it was returned in the middle of a query or with its server connection lost"
                )
            else:
                problem = ""
                if status in _OPEN_TRANSACTION_STATUSES:
                    self._report_open_transaction(conn, status, now)
                needs_reset = self._needs_reset(conn, status)
        reset_here = queued = False
        with self._lock:
            if self._checked_out.pop(id(conn), None) is None:
                checked_out = False
            else:
                checked_out = True
                conn._pgpool_checkout_id = 0  # no finalizer may take it back now
                self._stats["usage_ms"] += (now - conn._pgpool_checked_out_at) * 1000.0
                if conn._pgpool_key is not None:
                    self._keyed.pop(conn._pgpool_key, None)
                    conn._pgpool_key = None
                if problem and not close:
                    self._stats["returns_bad"] += 1
                elif not problem and (
                    self.closed
                    or now >= conn._pgpool_expires_at
                    or conn._pgpool_generation != self._generation
                    or self._size > self.maxconn
                ):
                    # (the common case above is inlined: this is the hot path)
                    problem = self._retirement_reason_locked(conn, now)
                if not problem:
                    conn._pgpool_last_used = now
                    if not needs_reset:
                        if self._waiters:
                            self._make_available_locked(conn)
                        else:
                            self._idle.append(conn)
                        return
                    if self._waiters:
                        # Someone is waiting: reset here and hand it straight over.
                        self._resetting += 1
                        reset_here = True
                    else:
                        # The worker resets it while this thread moves on: the
                        # round trip overlaps with other work.
                        self._resets.append(conn)
                        queued = True
        if queued:
            self._signal_worker()
        elif reset_here:
            usable = False
            try:
                usable = self._reset_connection(conn)
            finally:
                # Even when interrupted halfway (then the connection goes).
                self._finish_reset(conn, usable)
        elif not checked_out:
            if self._pid != os.getpid():
                _detach_sockets([conn])  # inherited from the parent process: not ours
                return
            if self.closed and conn.closed:
                return  # closed with the pool (close(force=True)) while it was out
            raise PoolError(
                f"this connection is not checked out from pool {self.name!r} (returned twice?)"
            )
        elif close:
            self._close_and_release(conn, problem)  # asked for: closed before we return
        else:
            self._discard(conn, problem)
        if self.closed and not self._checked_out:
            _live_pools.discard(self)

    def _report_open_transaction(self, conn: Any, status: int, now: float) -> None:
        """Say that a connection came back with its transaction open: its work is lost.

        The pool rolls the transaction back (as psycopg_pool does, with a
        warning), so the next user gets a clean connection; but whoever
        returned it probably meant to commit.
        """
        with self._lock:
            self._stats["returns_in_transaction"] += 1
            self._open_transactions_unreported += 1
            if now - self._open_transaction_reported_at < OPEN_TRANSACTION_REPORT_INTERVAL:
                return
            self._open_transaction_reported_at = now
            count, self._open_transactions_unreported = self._open_transactions_unreported, 0
        holder = next(
            (t.name for t in threading.enumerate() if t.ident == conn._pgpool_holder),
            "an ended thread",
        )
        state = (
            "an aborted transaction"
            if status == ext.TRANSACTION_STATUS_INERROR
            else "a transaction"
        )
        since = "" if count == 1 else f" ({count} such returns since the last report)"
        logger.warning(
            "pool %r: a connection taken by %s was returned with %s still open; it was "
            "rolled back, so any uncommitted changes are lost%s. Commit or roll back "
            "before closing the connection (leaving transaction.atomic() normally does).",
            self.name,
            holder,
            state,
            since,
        )

    def _retirement_reason(self, conn: Any, now: float) -> str:
        """Why a healthy connection must not be used again, or "" if it may."""
        with self._lock:
            return self._retirement_reason_locked(conn, now)

    def _retirement_reason_locked(self, conn: Any, now: float) -> str:
        if self.closed:
            return "the pool was closed"
        if now >= conn._pgpool_expires_at:
            self._stats["connections_expired"] += 1
            return "it reached max_lifetime"
        if conn._pgpool_generation != self._generation:
            return "the pool was drained"
        if self._size - len(self._closing) > self.maxconn:
            return "the pool was resized below its size"
        return ""

    def _needs_reset(self, conn: Any, transaction_status: int) -> bool:
        """Whether a returned connection needs work before the next user gets it.

        A connection that ran SQL needs the session reset, unless resetting is
        off; any connection needs its transaction ended and psycopg2's session
        characteristics restored.
        """
        if conn.notices:
            del conn.notices[:]
        return bool(
            (conn._pgpool_dirty and self._resets_sessions)
            or transaction_status != _TRANSACTION_IDLE
            or not conn.autocommit
            or conn.isolation_level is not None
            or conn.readonly is not None
            or conn.deferrable is not None
            or conn.notifies
        )

    def _reset_connection(self, conn: Any) -> bool:
        """Bring a returned connection back to a fresh session; False if it is unusable."""
        try:
            if conn.closed or conn.info.transaction_status in _UNUSABLE_STATUSES:
                return False
            if conn.info.transaction_status != _TRANSACTION_IDLE:
                if conn.autocommit:
                    # A transaction opened with a literal BEGIN: psycopg2's
                    # rollback() does nothing in autocommit mode.
                    with conn.cursor() as cursor:
                        cursor.execute("ROLLBACK")
                else:
                    conn.rollback()
            if (
                not conn.autocommit
                or conn.isolation_level is not None
                or conn.readonly is not None
                or conn.deferrable is not None
            ):
                conn.set_session(
                    isolation_level="DEFAULT",
                    readonly="DEFAULT",
                    deferrable="DEFAULT",
                    autocommit=True,
                )
            if conn._pgpool_dirty:
                if self._reset_callable is not None:
                    self._reset_callable(conn)
                    if conn.info.transaction_status != _TRANSACTION_IDLE:
                        logger.warning(
                            "pool %r: the reset callable left a transaction open; "
                            "discarding the connection",
                            self.name,
                        )
                        return False
                    self._apply_session(conn, "")
                elif self._reset_sql is RESET_SQL and self._discard_all_suffices():
                    # One statement, as cheap as SELECT 1; it restores the
                    # startup settings (Django's time zone) by itself.
                    with conn.cursor() as cursor:
                        cursor.execute("DISCARD ALL")
                elif self._reset_sql:
                    self._apply_session(conn, self._reset_sql)
                self._count("resets_num")
            del conn.notifies[:]
            del conn.notices[:]
            if conn.cursor_factory is not conn._pgpool_cursor_factory:
                conn.cursor_factory = conn._pgpool_cursor_factory
        except Exception as exc:
            logger.info(
                "pool %r: discarding a connection whose reset failed (%s)",
                self.name,
                _exception_summary(exc),
            )
            return False
        conn._pgpool_dirty = False
        conn._pgpool_last_used = time.monotonic()
        return True

    def _discard_all_suffices(self) -> bool:
        """Whether ``DISCARD ALL`` alone leaves the session as its users expect."""
        return not self._session_sql and (not self._session_settings or self._startup_settings_work)

    def _apply_session(self, conn: Any, reset_sql: str) -> None:
        """Run ``reset_sql`` and re-apply the session, in one round trip."""
        statements = [reset_sql] if reset_sql else []
        params: list[Any] = []
        if self._session_settings and not self._startup_settings_work:
            for name, value in self._session_settings.items():
                statements.append("SELECT set_config(%s, %s, false)")
                params += [name, value]
        if self._session_sql:
            statements.append(self._session_sql)
            params += self._session_params
        if not statements:
            return
        if params and reset_sql:
            # The reset SQL is the caller's text, not a template.
            statements[0] = reset_sql.replace("%", "%%")
        with conn.cursor() as cursor:
            cursor.execute("; ".join(statements), params or None)

    def _with_startup_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the session settings added to libpq's ``options``."""
        flags = " ".join(
            f"-c {name}={_escape_option(value)}" for name, value in self._session_settings.items()
        )
        existing = kwargs.get("options") or ""
        return {**kwargs, "options": f"{existing} {flags}".strip()}

    def _startup_settings_applied(self, conn: Any) -> bool:
        for name, value in self._session_settings.items():
            if conn.get_parameter_status(name) != value:
                return False
        return True

    def _finish_reset(self, conn: Any, usable: bool) -> None:
        """After a reset: hand the connection to a waiter or make it idle, or drop it."""
        # drain() or resize() may have happened while it waited for its reset.
        with self._lock:
            self._resetting -= 1
            reason = (
                self._retirement_reason_locked(conn, time.monotonic())
                if usable
                else "its reset failed"
            )
            if not reason:
                self._make_available_locked(conn)
                return
        self._discard(conn, reason)

    def _emit(self, event: str, **info: Any) -> None:
        """Tell ``on_event`` (if set); a failing listener never breaks the pool."""
        listener = self.on_event
        if listener is None:
            return
        try:
            listener(event, {"pool": self.name, **info})
        except Exception:
            logger.exception("pool %r: the %s listener failed", self.name, event)

    def _count(self, counter: str, amount: float = 1) -> None:
        """Add to a statistics counter. Never call with the lock held."""
        with self._lock:
            self._stats[counter] += amount

    # ------------------------------------------------------------------ slots and hand-off

    def _make_available_locked(self, conn: Any) -> None:
        """Give a ready connection to the longest waiter, or make it idle. Lock held."""
        while self._waiters:
            waiter = self._waiters.popleft()
            waiter.conn = conn
            waiter.event.release()
            return
        self._idle.append(conn)

    def _release_slot_locked(self) -> None:
        """A connection slot became free. Lock held.

        With requests waiting, the slot is refilled at once: a connector opens
        a connection for the longest waiter.
        """
        if self._waiters and not self.closed and self._unreachable is None:
            self._opening += 1
            self._start_connector()  # the slot stays counted in _size
        else:
            self._size -= 1

    def _discard_checked_out(self, conn: Any, reason: str) -> None:
        with self._lock:
            self._checked_out.pop(id(conn), None)
        self._discard(conn, reason)

    def _discard(self, conn: Any, reason: str) -> None:
        """Close a connection and free its slot.

        A connection still open is closed by the worker, off the request path;
        its slot stays taken until then, so the server never sees more than
        ``max_size`` connections.
        """
        worker = self._worker
        if not conn.closed and not self.closed and worker is not None and worker.is_alive():
            self._closing.append((conn, reason))
            self._signal_worker()
            return
        self._close_and_release(conn, reason)

    def _close_and_release(self, conn: Any, reason: str) -> None:
        self._close_connection(conn, reason)
        if reason != "the pool was closed":
            self._emit("connection_discarded", reason=reason)
        with self._lock:
            self._release_slot_locked()
            below_min = self._size < self.minconn
        if below_min:
            self._signal_worker()

    def _close_connection(self, conn: Any, reason: str) -> None:
        self._all.pop(id(conn), None)
        self._count("connections_closed")
        logger.debug("pool %r: closing a connection: %s", self.name, reason)
        with suppress(Exception):  # close() of a broken connection may complain
            conn.close()

    # ------------------------------------------------------------------ opening

    def _open_connection(self) -> Any:
        """Connect and apply the session settings. Never called with the lock held."""
        given = self._connect_kwargs() if callable(self._connect_kwargs) else self._connect_kwargs
        kwargs = {key: evaluated(value) for key, value in given.items()}
        if self.config.connect_params is not None:
            kwargs.update(self.config.connect_params())
        application_name = kwargs.get("application_name")
        if isinstance(application_name, str) and "{pid}" in application_name:
            kwargs["application_name"] = application_name.replace("{pid}", str(os.getpid()))
        connection_class = pooled_connection_class(
            kwargs.pop("connection_factory", None) or ext.connection
        )
        use_startup_settings = bool(self._session_settings) and self._startup_settings_work
        started = time.monotonic()
        try:
            try:
                conn = psycopg2.connect(
                    connection_factory=connection_class,
                    **(self._with_startup_settings(kwargs) if use_startup_settings else kwargs),
                )
            except psycopg2.OperationalError as exc:
                if not use_startup_settings or "options" not in str(exc):
                    raise
                # "unsupported startup parameter: options": a proxy such as PgBouncer.
                self._startup_settings_work = use_startup_settings = False
                logger.info(
                    "pool %r: the server refuses startup options; applying session "
                    "settings with SQL instead",
                    self.name,
                )
                conn = psycopg2.connect(connection_factory=connection_class, **kwargs)
        except Exception:
            with self._lock:
                self._stats["connections_errors"] += 1
            raise
        try:
            conn.autocommit = True
            now = time.monotonic()
            conn._pgpool_pool = self
            conn._pgpool_created_at = now
            conn._pgpool_last_used = now
            conn._pgpool_checked_out_at = now
            conn._pgpool_poller = _make_poller(conn)
            conn._pgpool_lease = None
            conn._pgpool_origin = None
            conn._pgpool_leak_reported = False
            conn._pgpool_key = None
            conn._pgpool_checkout_id = 0
            conn._pgpool_cursor_factory = conn.cursor_factory
            conn._pgpool_generation = self._generation
            lifetime = self.config.max_lifetime
            conn._pgpool_expires_at = (
                now + lifetime * (1.0 - random.uniform(0.0, LIFETIME_JITTER))
                if lifetime
                else _INFINITY
            )
            if use_startup_settings and not self._startup_settings_applied(conn):
                # Accepted but ignored (PgBouncer's ignore_startup_parameters).
                self._startup_settings_work = False
            self._apply_session(conn, "")
            if self._prepare is not None:
                self._prepare(conn)
            if self.config.configure is not None:
                self.config.configure(conn)
                if conn.info.transaction_status != _TRANSACTION_IDLE:
                    conn.rollback()
            conn._pgpool_dirty = False
        except BaseException:
            conn.close()
            with self._lock:
                self._stats["connections_errors"] += 1
            raise
        self._all[id(conn)] = conn
        with self._lock:
            stats = self._stats
            stats["connections_num"] += 1
            stats["connections_ms"] += (time.monotonic() - started) * 1000.0
        if self.config.max_lifetime and threading.current_thread() is not self._worker:
            self._signal_worker()  # so that it plans this connection's retirement
        return conn

    # ------------------------------------------------------------------ background work

    def _signal_worker(self) -> None:
        if not self._worker_signalled:
            self._worker_signalled = True
            with suppress(RuntimeError):  # already signalled
                self._wakeup.release()

    def reclaim_abandoned(self, conn: Any, checkout_id: int, holder: str) -> None:
        """Take back a connection whose holder is gone without returning it.

        For finalizers (a thread that ended, a garbage-collected Django
        wrapper), so it never takes the pool's lock: a finalizer may run in a
        thread that holds it. The worker does the rest, including the reset;
        ``checkout_id`` makes sure that a connection returned and checked out
        again since is left alone.
        """
        if self._pid != os.getpid():
            return  # inherited through fork: the parent's
        if sys.is_finalizing():
            # The interpreter is shutting down and other threads are being torn
            # down: touching connections now can hang, and the OS closes them.
            return
        if self.closed:
            with suppress(Exception):
                conn.close()
            return
        self._orphans.append((conn, checkout_id, holder))
        self._signal_worker()

    def _worker_cycle(self) -> bool:
        """One round of background work. Returns False once the pool is closed."""
        self._worker_signalled = False
        if self.closed:
            self._close_leftovers()
            return False
        while self._closing:
            conn, reason = self._closing.popleft()
            self._close_and_release(conn, reason)
        while self._orphans:
            self._take_back_orphan(*self._orphans.popleft())
        self._reset_queued()
        now = time.monotonic()
        if self._sweep_requested:
            self._sweep_requested = False
            self._check_idle_connections()
        if self._unreachable is not None:
            self._replenish()
        if (
            now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL
            or self._size < self.minconn
            or self._next_expiry() <= now
        ):
            self._last_housekeeping = now
            self._housekeep(now)
        return not self.closed

    def _next_expiry(self) -> float:
        """When the worker should next retire a connection for its lifetime.

        Planned from every connection, not only the idle ones: a connection in
        use now may well be idle when its time comes, and retiring it then
        (with its replacement opened first) spares a request from finding it
        expired. One already due while in use is dealt with on its return.
        """
        if not self.config.max_lifetime:
            return _INFINITY
        now = time.monotonic()
        idle = {id(conn) for conn in list(self._idle)}
        due_times = [
            due
            for conn in list(self._all.values())
            if (due := conn._pgpool_expires_at - self._retire_ahead) > now or id(conn) in idle
        ]
        return float(min(due_times)) if due_times else _INFINITY

    def _seconds_until_due(self) -> float:
        """How long the worker may sleep before housekeeping is due again."""
        now = time.monotonic()
        delay = min(HOUSEKEEPING_INTERVAL, self._next_expiry() - now)
        if self._unreachable is not None:
            delay = min(delay, self._reconnect_after - now)
        return max(0.005, delay)

    def _close_leftovers(self) -> None:
        """The pool is closed: the worker closes whatever came back after close()."""
        with self._lock:
            leftovers = self._idle + list(self._resets)
            self._idle.clear()
            self._resets.clear()
            self._size -= len(leftovers)
        for conn in leftovers:
            self._close_connection(conn, "the pool was closed")
        while self._closing:
            conn, reason = self._closing.popleft()
            self._close_and_release(conn, reason)

    def _reset_queued(self) -> None:
        while True:
            with self._lock:
                if not self._resets:
                    return
                conn = self._resets.popleft()
                self._resetting += 1
            self._finish_reset(conn, self._reset_connection(conn))

    def _take_back_orphan(self, conn: Any, checkout_id: int, holder: str) -> None:
        with self._lock:
            still_out = id(conn) in self._checked_out and conn._pgpool_checkout_id == checkout_id
            if still_out:
                self._stats["connections_reclaimed"] += 1
        if not still_out:
            return  # returned in the meantime
        level = logging.DEBUG if self._reclaim_logged else logging.WARNING
        self._reclaim_logged = True
        logger.log(
            level,
            "pool %r: a connection was never returned (%s); the pool took it back. Close "
            "connections when you are done with them (django.db.connection.close(), or "
            "close_old_connections() in threads you start) to return them sooner.",
            self.name,
            holder,
        )
        # Whatever the holder left (a transaction, session settings) goes.
        conn._pgpool_dirty = True
        self.putconn(conn)

    def _check_idle_connections(self) -> None:
        """After a dead connection was found, check the others that sat idle."""
        with self._lock:
            suspects = [c for c in self._idle if c._pgpool_last_used < self._suspect_before]
            for conn in suspects:
                self._idle.remove(conn)
                self._checked_out[id(conn)] = conn
        for conn in suspects:
            if not conn.closed and self._check_connection(conn):
                with self._lock:
                    self._checked_out.pop(id(conn), None)
                    if not self.closed:
                        self._make_available_locked(conn)
                        continue
            self._discard_checked_out(conn, "it failed its check")

    def _housekeep(self, now: float) -> None:
        self._retire_expiring(now)
        self._retire_idle(now)
        if self.config.leak_threshold:
            self._report_leaks(now)
        self._replenish()

    def _retire_expiring(self, now: float) -> None:
        """Replace idle connections about to reach ``max_lifetime``, one at a time.

        The others stay available meanwhile, and when the pool has room the
        replacement is opened before the old connection is closed, so
        housekeeping never leaves a request without an idle connection.
        """
        retire_before = now + self._retire_ahead
        while True:
            with self._lock:
                if self.closed:
                    return
                expiring = next(
                    (c for c in self._idle if c._pgpool_expires_at <= retire_before), None
                )
                if expiring is None:
                    return
                self._idle.remove(expiring)
                self._stats["connections_expired"] += 1
                replace_first = self._size <= self.minconn and self._size < self.maxconn
                if replace_first:
                    self._size += 1
            if replace_first:
                try:
                    replacement = self._open_connection()
                except Exception:
                    with self._lock:
                        self._release_slot_locked()
                else:
                    with self._lock:
                        # If the pool closed meanwhile, the worker closes it on its way out.
                        self._make_available_locked(replacement)
            self._close_and_release(expiring, "it reached max_lifetime")

    def _retire_idle(self, now: float) -> None:
        """Close connections above ``min_size`` that nobody used for ``max_idle``."""
        max_idle = self.config.max_idle
        if max_idle is None:
            return
        with self._lock:
            removable = self._size - self.minconn
            # The bottom of the stack holds the connections unused for longest.
            retire = []
            for conn in self._idle:
                if removable <= 0:
                    break
                if now - conn._pgpool_last_used >= max_idle:
                    retire.append(conn)
                    removable -= 1
            for conn in retire:
                self._idle.remove(conn)
        for conn in retire:
            self._close_and_release(conn, "it was idle for max_idle")

    def _report_leaks(self, now: float) -> None:
        threshold = self.config.leak_threshold
        with self._lock:
            held = list(self._checked_out.values())
        for conn in held:
            if (
                not conn._pgpool_leak_reported
                and conn._pgpool_origin is not None
                and now - conn._pgpool_checked_out_at >= threshold
            ):
                conn._pgpool_leak_reported = True
                self._count("leaks_detected")
                logger.warning(
                    "pool %r: a connection has been checked out for %.1f s "
                    "(leak_threshold=%g s); it was taken here:\n%s",
                    self.name,
                    now - conn._pgpool_checked_out_at,
                    threshold,
                    "".join(traceback.format_list(conn._pgpool_origin)).rstrip(),
                )

    def _note_unreachable(self, exc: BaseException) -> None:
        """New connections fail: back off, say so once, let requests wait for the worker."""
        now = time.monotonic()
        with self._lock:
            first = self._unreachable is None
            self._unreachable = exc
            if first:
                self._unreachable_since = now
                self._reconnect_backoff = FIRST_RECONNECT_BACKOFF
            else:
                self._reconnect_backoff = min(MAX_RECONNECT_BACKOFF, self._reconnect_backoff * 2)
            self._reconnect_after = now + self._reconnect_backoff
        if first:
            logger.warning(
                "pool %r: cannot open connections (%s); requests wait up to timeout=%g s "
                "while the pool retries in the background",
                self.name,
                _exception_summary(exc),
                self.config.timeout,
            )
        self._signal_worker()

    def _note_reachable(self) -> None:
        with self._lock:
            was_unreachable = self._unreachable is not None
            self._unreachable = None
            self._reconnect_backoff = 0.0
            self._reconnect_after = 0.0
            outage = time.monotonic() - self._unreachable_since
        if was_unreachable:
            logger.warning(
                "pool %r: the database can be reached again after %.1f s", self.name, outage
            )

    def _replenish(self) -> None:
        """Open connections in the background.

        Up to ``min_size`` always; and while the server is unreachable, one
        for each waiting request (or one to notice that it is back).
        """
        while True:
            if time.monotonic() < self._reconnect_after:
                return
            with self._lock:
                if self.closed:
                    return
                unreachable = self._unreachable is not None
                wanted = self._size < self.minconn or (
                    unreachable
                    and self._size < self.maxconn
                    and (bool(self._waiters) or self._size == 0 or not self._idle)
                )
                if not wanted:
                    if unreachable:
                        self._unreachable = None  # others got through meanwhile
                    return
                self._size += 1
            try:
                conn = self._open_connection()
            except Exception as exc:
                with self._lock:
                    self._size -= 1
                self._note_unreachable(exc)
                return
            self._note_reachable()
            with self._lock:
                accepted = not self.closed
                if accepted:
                    self._make_available_locked(conn)
            if not accepted:
                self._discard(conn, "the pool was closed")
                return

    # ------------------------------------------------------------------ extras

    def resize(self, min_size: int | None = None, max_size: int | None = None) -> None:
        """Change the pool's sizes while it runs.

        Growing lets waiting requests open connections at once; shrinking
        closes idle connections beyond the new ``max_size`` now and busy ones
        as they come back.
        """
        new_min = self.minconn if min_size is None else min_size
        new_max = self.maxconn if max_size is None else max_size
        for name, value, lowest in (("min_size", new_min, 0), ("max_size", new_max, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ValueError(f"pool {self.name!r}: {name} must be an integer >= {lowest}")
        if new_max < new_min:
            raise ValueError(f"pool {self.name!r}: max_size={new_max} is below min_size={new_min}")
        with self._lock:
            self.minconn, self.maxconn = new_min, new_max
            surplus: list[Any] = []
            while self._size - len(surplus) > new_max and self._idle:
                surplus.append(self._idle.pop(0))
            # Room to grow: open connections for the waiting requests now.
            room = min(new_max - self._size, len(self._waiters) - self._opening)
            if self._unreachable is None:
                for _ in range(max(0, room)):
                    self._size += 1
                    self._opening += 1
                    self._start_connector()
        for conn in surplus:
            self._close_and_release(conn, "the pool was resized")
        logger.info("pool %r: resized to min_size=%d, max_size=%d", self.name, new_min, new_max)
        self._signal_worker()

    def drain(self) -> None:
        """Retire every current connection gracefully.

        For after a password rotation or a failover: idle connections are
        closed now, busy ones when they come back, none is handed out again,
        and ``min_size`` new ones are opened in the background.
        """
        with self._lock:
            self._generation += 1
            retired = self._idle[:]
            self._idle.clear()
        for conn in retired:
            self._close_and_release(conn, "the pool was drained")
        logger.info("pool %r: drained (%d idle connections closed)", self.name, len(retired))
        self._signal_worker()

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
            if not conn.closed and conn.info.transaction_status != _TRANSACTION_IDLE:
                with suppress(psycopg2.Error):
                    conn.rollback()
            raise
        finally:
            self.putconn(conn)

    def stats(self) -> dict[str, Any]:
        """Current state and counters since the pool was built.

        Names follow psycopg_pool's ``get_stats()`` where the meaning is the same.
        """
        with self._lock:
            result: dict[str, Any] = {
                "pool_min": self.minconn,
                "pool_max": self.maxconn,
                "pool_size": self._size,
                "pool_available": len(self._idle),
                "pool_in_use": len(self._checked_out),
                "pool_resetting": len(self._resets) + self._resetting,
                "requests_waiting": len(self._waiters),
            }
            for name, value in self._stats.items():
                result[name] = round(value, 3) if isinstance(value, float) else value
        return result

    get_stats = stats

    @property
    def size(self) -> int:
        """Server connections open (or being opened) by this pool."""
        return self._size


_COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_wait_max_ms",
    "requests_errors",
    "requests_timeouts",
    "usage_ms",
    "returns_bad",
    "returns_in_transaction",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
    "connections_closed",
    "connections_expired",
    "connections_reclaimed",
    "resets_num",
    "checks_num",
    "checks_failed",
    "leaks_detected",
)


def _run_worker(pool_ref: weakref.ref[ConnectionPool]) -> None:
    """The background worker: resets, housekeeping, reclaiming. Holds no strong reference
    to the pool while it sleeps, so an abandoned pool can be garbage collected."""
    started_in = os.getpid()
    while True:
        pool = pool_ref()
        if pool is None:
            return
        wakeup = pool._wakeup
        delay = pool._seconds_until_due()
        del pool
        wakeup.acquire(timeout=delay)
        if os.getpid() != started_in:
            _park_forever()
        pool = pool_ref()
        if pool is None:
            return
        try:
            if not pool._worker_cycle():
                return
        except Exception:  # pragma: no cover - a bug; keep the worker alive
            logger.exception("pool %r: background worker error", pool.name)
        del pool


def _park_forever() -> NoReturn:
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


# ---------------------------------------------------------------------- process-wide

_live_pools: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _detach_sockets(connections: Sequence[Any]) -> None:
    """Point each connection's socket at /dev/null in this process (see ``_abandon_after_fork``)."""
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


def live_pools() -> list[ConnectionPool]:
    """This process's pools: open ones, and closed ones still waiting for
    checked-out connections to come back."""
    pid = os.getpid()
    return [pool for pool in list(_live_pools) if pool._pid == pid]


def _abandon_pools_in_child() -> None:
    for pool in list(_live_pools):
        if pool._pid != os.getpid():
            pool._abandon_after_fork()
    # Connections checked out by the thread that forked belong to the parent too.
    lease = getattr(_thread_state, "lease", None)
    if lease is not None:
        lease.connections.clear()


def _close_pools_at_exit() -> None:
    for pool in list(_live_pools):
        if pool._pid == os.getpid() and not pool.closed:
            with suppress(Exception):  # never a traceback at exit
                pool.close(timeout=1.0, _at_exit=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_abandon_pools_in_child)
atexit.register(_close_pools_at_exit)
