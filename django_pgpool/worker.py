"""The pool's background work: its thread, housekeeping, and opening connections.

Each pool has one worker thread. Request threads never wait for it: they hand
it tasks (take back an abandoned connection, check the idle connections after
a dead one was found) and move on. Between tasks it keeps the pool in shape
(:class:`Housekeeper`): retires connections before ``max_lifetime`` and after
``max_idle``, keeps idle ones alive (``keepalive_time``), reports leaks, opens
connections up to ``min_size``, and while the database cannot be reached,
retries with backoff (:class:`Outage`) so that requests wait for one
reconnect instead of each hammering the server.

Whatever the worker does on the network has a bound (:mod:`.network`), and
nothing that frees a slot waits for it: a connection is closed, and its slot
freed, by whichever thread retires it.

The worker holds no strong reference to its pool while it sleeps, so an
abandoned pool can be garbage collected; in a forked child it parks.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import psycopg2

from . import ownership, process
from .errors import PoolClosed, PoolTimeout, connect_error, unreachable_message
from .pooled_connection import exception_summary

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")

#: How often the worker looks for expired, idle-too-long and leaked
#: connections and tops the pool up to ``min_size``.
HOUSEKEEPING_INTERVAL = 1.0

#: Pauses between background attempts to reach an unreachable server: the
#: first, and the longest it grows to.
FIRST_RECONNECT_BACKOFF = 0.05
MAX_RECONNECT_BACKOFF = 2.0

# Connection errors that waiting cannot fix: the server answered, and refused
# this client for good. Any other OperationalError (refused, timed out,
# starting up, shutting down, too many clients) is worth waiting out.
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

_INFINITY = float("inf")


def is_transient_connect_error(exc: BaseException) -> bool:
    """Whether waiting (and retrying) could make a failed connect succeed.

    Only a failure to reach the server, or a server not ready for us yet,
    is: a hook that raised, parameters libpq can't take, a wrong password
    or a missing database are the same next time.
    """
    if not isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return False
    message = str(exc).lower()
    return not any(marker in message for marker in _PERMANENT_CONNECT_ERRORS)


class Outage:
    """Whether new connections fail right now, since when, and when to retry.

    Two kinds of failure: the database can't be *reached* (``error``, set
    only once the pool has connected before: requests then wait for the
    worker to reconnect), or it *refuses* (a wrong password...: requests get
    the error at once). Either way the worker retries with backoff.
    """

    __slots__ = ("backoff", "error", "failing", "lock", "retry_at", "since", "waited_out")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        #: The last connection error while the database cannot be reached; None otherwise.
        self.error: BaseException | None = None
        #: Whether connections have failed since the last one got through.
        self.failing = False
        #: Whether a request has waited its whole timeout in vain during this
        #: outage: the pool then knows the server is down, and says so at once.
        self.waited_out = False
        self.since = 0.0
        self.backoff = 0.0
        self.retry_at = 0.0

    def failed(self, exc: BaseException, *, unreachable: bool) -> bool:
        """A connection attempt failed; back off. True if it is the first failure since
        connections last got through (or since the database became unreachable)."""
        now = time.monotonic()
        with self.lock:
            first = not self.failing or (unreachable and self.error is None)
            self.failing = True
            if unreachable:
                if self.error is None:
                    self.since = now
                self.error = exc
            if first:
                self.backoff = FIRST_RECONNECT_BACKOFF
            else:
                self.backoff = min(MAX_RECONNECT_BACKOFF, self.backoff * 2)
            self.retry_at = now + self.backoff
        return first

    def refuse_if_known_down_locked(self, pool: ConnectionPool) -> None:
        """Fail a request at once while the pool knows the database is down. Pool's lock held.

        It knows once a request has waited its whole timeout in vain during
        the outage. If no connection is in use either (none can come back),
        waiting again helps nobody: the request that already failed would
        wait once more for each query (Django's error page makes several),
        and new ones pile up. They fail at once until the worker gets a
        connection through.
        """
        error = self.error
        slots = pool.slots
        if error is None or not self.waited_out or slots.checked_out or slots.resetting:
            return
        slots.counters.values["requests_errors"] += 1
        raise PoolTimeout(
            unreachable_message(pool.name, exception_summary(error), time.monotonic() - self.since),
            pool_name=pool.name,
            max_size=slots.max_size,
            timeout=0.0,
        )

    def ended(self) -> float | None:
        """A connection got through. The outage's length, if the database was unreachable."""
        with self.lock:
            if not self.failing:
                return None
            self.failing = self.waited_out = False
            self.backoff = self.retry_at = 0.0
            if self.error is None:
                return None
            self.error = None
            return time.monotonic() - self.since


class Worker:
    """A pool's background thread: runs the tasks it is handed, then housekeeping."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        self._tasks: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._signalled = False
        self.housekeeper = Housekeeper(pool)
        self.thread = threading.Thread(
            target=_run, args=(self._pool_ref, self), name=f"pgpool-{pool.name}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def submit(self, task: Callable[..., Any], *args: Any) -> None:
        """Run ``task(*args)`` in the worker thread, soon (never blocks)."""
        self._tasks.append((task, args))
        self.signal()

    def signal(self) -> None:
        """Wake the worker up (for housekeeping that became due)."""
        if not self._signalled:
            self._signalled = True
            with suppress(RuntimeError):  # already signalled
                self._wakeup.release()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def is_current_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def join(self, timeout: float) -> None:
        if not self.is_current_thread() and self.thread.is_alive():
            self.thread.join(timeout)

    def cycle(self, pool: ConnectionPool) -> bool:
        """One round of background work. Returns False once the pool is closed."""
        self._signalled = False
        while self._tasks:
            task, args = self._tasks.popleft()
            task(*args)
        if pool.closed:
            pool.close_leftovers()
            while self._tasks:
                task, args = self._tasks.popleft()
                task(*args)
            return False
        self.housekeeper.run_if_due()
        return not pool.closed

    def sleep(self, delay: float) -> None:
        self._wakeup.acquire(timeout=delay)


def _run(pool_ref: weakref.ref[ConnectionPool], worker: Worker) -> None:
    started_in = os.getpid()
    while True:
        pool = pool_ref()
        if pool is None:
            return
        delay = worker.housekeeper.seconds_until_due()
        del pool
        worker.sleep(delay)
        if os.getpid() != started_in:
            process.park_forever()
        pool = pool_ref()
        if pool is None:
            return
        try:
            if not worker.cycle(pool):
                return
        except Exception:  # pragma: no cover - a bug; keep the worker alive
            logger.exception("pool %r: background worker error", pool.name)
        del pool


class Housekeeper:
    """What the worker does between tasks: lifetimes, idle connections, leaks, min_size."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        self._last_run = 0.0
        # Idle connections are retired this long before they expire, so that a
        # request practically never finds an expired one.
        lifetime = pool.config.max_lifetime
        self.retire_ahead = min(1.0, lifetime * 0.05) if lifetime else 0.0

    def _pool(self) -> ConnectionPool:
        pool = self._pool_ref()
        assert pool is not None  # the worker holds it while it runs us
        return pool

    def run_if_due(self) -> None:
        pool = self._pool()
        now = time.monotonic()
        if pool.outage.error is not None:
            self.replenish()
        if (
            now - self._last_run >= HOUSEKEEPING_INTERVAL
            or pool.slots.size < pool.slots.min_size
            or self.next_expiry() <= now
        ):
            self._last_run = now
            self.retire_expiring(now)
            self.retire_idle(now)
            self.keep_alive(now)
            if pool.config.leak_threshold:
                with pool.slots.lock:
                    held = list(pool.slots.checked_out.values())
                ownership.report_leaks(pool.name, held, pool.config.leak_threshold, pool.counters)
            self.replenish()

    def seconds_until_due(self) -> float:
        """How long the worker may sleep before housekeeping is due again."""
        pool = self._pool()
        now = time.monotonic()
        delay = min(HOUSEKEEPING_INTERVAL, self.next_expiry() - now)
        if pool.outage.error is not None:
            delay = min(delay, pool.outage.retry_at - now)
        return max(0.005, delay)

    def next_expiry(self) -> float:
        """When the worker should next retire a connection for its lifetime.

        Planned from every connection, not only the idle ones: a connection in
        use now may well be idle when its time comes, and retiring it then
        (with its replacement opened first) spares a request from finding it
        expired. One already due while in use is dealt with on its return.
        """
        pool = self._pool()
        if not pool.config.max_lifetime:
            return _INFINITY
        now = time.monotonic()
        with pool.slots.lock:
            idle = {id(conn) for conn in pool.slots.idle}
        due_times = [
            due
            for conn in list(pool.slots.connections.values())
            if (due := conn.pool_entry.expires_at - self.retire_ahead) > now or id(conn) in idle
        ]
        return float(min(due_times)) if due_times else _INFINITY

    def retire_expiring(self, now: float) -> None:
        """Replace idle connections about to reach ``max_lifetime``, one at a time.

        The others stay available meanwhile, and when the pool has room the
        replacement is opened before the old connection is closed, so
        housekeeping never leaves a request without an idle connection.
        """
        pool = self._pool()
        retire_before = now + self.retire_ahead
        slots = pool.slots
        while True:
            taken = slots.take_idle(
                lambda idle: [
                    next((c for c in idle if c.pool_entry.expires_at <= retire_before), None)
                ]
            )
            if not taken:
                return
            expiring = taken[0]
            pool.counters.add("connections_expired")
            if slots.reserve(up_to=slots.min_size + 1):
                pool.opener.fill_reserved_slot()
            pool.retire(expiring, "it reached max_lifetime")

    def retire_idle(self, now: float) -> None:
        """Close connections above ``min_size`` that nobody used for ``max_idle``."""
        pool = self._pool()
        max_idle = pool.config.max_idle
        if max_idle is None:
            return

        def unused(idle: list[Any]) -> list[Any]:
            removable = pool.slots.size - pool.slots.min_size
            # The bottom of the stack holds the connections unused for longest.
            retire = []
            for conn in idle:
                if removable <= 0:
                    break
                if now - conn.pool_entry.last_used >= max_idle:
                    retire.append(conn)
                    removable -= 1
            return retire

        for conn in pool.slots.take_idle(unused):
            pool.retire(conn, "it was idle for max_idle")

    def keep_alive(self, now: float) -> None:
        """Check idle connections that have not heard from the server for ``keepalive_time``.

        Like HikariCP's keepalive: a NAT or firewall that drops quiet flows
        never sees one quiet for that long, and a connection that died
        quietly is found here rather than by a request. All are checked
        within one bounded wait; those that answer go back where they were.
        """
        pool = self._pool()
        interval = pool.config.keepalive_time
        if interval is None:
            return
        quiet_since = now - interval

        def quiet(idle: list[Any]) -> list[Any]:
            return [
                conn
                for conn in idle
                if max(conn.pool_entry.last_used, conn.pool_entry.checked_at) <= quiet_since
            ]

        pool.liveness.check_idle(pool.slots.take_idle(quiet), keepalive=True)

    def replenish(self) -> None:
        """Open connections in the background.

        Up to ``min_size`` always; and while the server is unreachable, one
        for each waiting request (or one to notice that it is back).
        """
        pool = self._pool()
        outage = pool.outage
        slots = pool.slots
        while time.monotonic() >= outage.retry_at and not slots.closed:
            unreachable = outage.error is not None
            if not slots.reserve(
                up_to=slots.min_size,
                or_while=(
                    (lambda size, idle, waiting: waiting > 0 or size == 0 or idle == 0)
                    if unreachable
                    else None
                ),
            ):
                if unreachable:
                    outage.ended()  # others got through meanwhile
                return
            if not pool.opener.fill_reserved_slot():
                return


class Opener:
    """Opens connections into slots already counted, and knows when that fails.

    Three callers: a request that found no idle connection gets a *connector*
    thread of its own, so that its wait is bounded by the timeout however
    slow the connect; the warm-up (``open(wait=True)``) opens ``min_size`` in
    the calling thread; and housekeeping opens replacements and reconnects.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool_ref = weakref.ref(pool)
        self.name = pool.name
        #: Whether a connection ever got through. Until one does, nothing says
        #: the server was ever there to wait for (a management command run
        #: while the database is down, a wrong HOST): every connection error
        #: goes to the request that needed the connection, at once.
        self.connected_once = False

    def _pool(self) -> ConnectionPool:
        pool = self._pool_ref()
        assert pool is not None  # its callers hold it
        return pool

    def open(self) -> Any:
        """Open a connection for a slot already counted. Never called with the lock held."""
        pool = self._pool()
        conn = pool.connector.open(pool)
        self.connected_once = True
        pool.slots.connections[id(conn)] = conn
        worker = pool.worker
        if pool.config.max_lifetime and worker is not None and not worker.is_current_thread():
            worker.signal()  # so that it plans this connection's retirement
        return conn

    def start_connector(self) -> None:
        """Open a connection for the longest waiter, in a thread of its own."""
        threading.Thread(
            target=self._connect_for_waiter, name=f"pgpool-{self.name}-connect", daemon=True
        ).start()

    def worth_waiting_for(self, exc: BaseException) -> bool:
        """Whether requests should wait while the worker retries, rather than get ``exc``.

        Only when the server can't be reached right now and has been before.
        """
        return self.connected_once and is_transient_connect_error(exc)

    def _connect_for_waiter(self) -> None:
        """A connector: open a connection and give it to the longest waiter.

        If the server can't be reached (and has been before), the slot is
        given up and the worker reconnects for everyone while requests wait;
        otherwise (a wrong password, a missing database, a failing hook, a
        pool that never reached its server) the longest waiter gets the
        error at once, and the next waiter that needs a connection an attempt
        of its own.
        """
        pool = self._pool()
        slots = pool.slots
        started_in = os.getpid()
        try:
            conn = self.open()
        except Exception as exc:
            if os.getpid() != started_in:
                process.park_forever()  # copied into a forked child mid-connect (gevent)
            if self.worth_waiting_for(exc):
                with slots.lock:
                    slots.opening -= 1
                    slots.size -= 1
                self.note_unreachable(exc)
                return
            error = connect_error(self.name, exc)
            with slots.lock:
                slots.opening -= 1
                slots.size -= 1
                slots.fail_longest_waiter_locked(error)
                another = slots.reserve_for_waiter_locked()
            if another:
                self.start_connector()
            self.note_refused(exc)
            return
        if os.getpid() != started_in:
            process.detach_sockets([conn])  # the parent's pool asked for it, not this process
            process.park_forever()
        self.note_reachable()
        with slots.lock:
            slots.opening -= 1
        pool.add(conn)

    def fill_reserved_slot(self) -> bool:
        """Open a connection in a slot :meth:`Slots.reserve` counted; False if it failed."""
        pool = self._pool()
        try:
            conn = self.open()
        except Exception as exc:
            with pool.slots.lock:
                pool.slots.size -= 1
            if self.worth_waiting_for(exc):
                self.note_unreachable(exc)
            else:
                self.note_refused(exc)
            return False
        self.note_reachable()
        pool.add(conn)
        return True

    def warm_up(self, timeout: float) -> None:
        """Open ``min_size`` connections now, or raise ``PoolTimeout`` with the last error."""
        pool = self._pool()
        slots = pool.slots
        deadline = time.monotonic() + timeout
        while True:
            with slots.lock:
                if slots.closed:
                    raise PoolClosed(f"pool {self.name!r} is closed")
                if len(slots.connections) >= slots.min_size:
                    return
                opening_elsewhere = slots.size >= slots.min_size
                if not opening_elsewhere:
                    slots.size += 1
            if opening_elsewhere:
                # The worker (or a connector) is opening the rest: open means
                # open, so wait for them rather than return early.
                if time.monotonic() >= deadline:
                    raise self._warm_up_failed(timeout, pool.outage.error)
                time.sleep(0.01)
                continue
            try:
                conn = self.open()
            except BaseException as exc:
                # Whatever ends the attempt, a signal handler's exception
                # included, the reserved slot is given back.
                with slots.lock:
                    pool.release_slot_locked()
                if not isinstance(exc, Exception):
                    raise
                if not is_transient_connect_error(exc):
                    # A wrong password, a missing database: no use retrying.
                    error = connect_error(self.name, exc)
                    if error is exc:
                        raise
                    raise error from exc
                if time.monotonic() >= deadline:
                    raise self._warm_up_failed(timeout, exc) from exc
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            else:
                pool.add(conn)

    def _warm_up_failed(self, timeout: float, last_error: BaseException | None) -> PoolTimeout:
        pool = self._pool()
        failed = (
            f"; the last attempt failed with {exception_summary(last_error)}"
            if last_error is not None
            else ""
        )
        return PoolTimeout(
            f"pool {self.name!r} could not open its {pool.slots.min_size} connection(s) within "
            f"{timeout:g} s{failed}",
            pool_name=self.name,
            max_size=pool.slots.max_size,
            timeout=timeout,
        )

    def note_unreachable(self, exc: BaseException) -> None:
        """The server can't be reached: back off, say so once, let requests wait for the worker."""
        pool = self._pool()
        if pool.outage.failed(exc, unreachable=True):
            logger.warning(
                "pool %r: cannot open connections (%s); requests wait up to timeout=%g s "
                "while the pool retries in the background",
                self.name,
                exception_summary(exc),
                pool.config.timeout,
            )
        if pool.worker is not None:
            pool.worker.signal()

    def note_refused(self, exc: BaseException) -> None:
        """A connection failed in a way requests hear of at once: back off the
        background attempts, and say so once (until a connection gets through).

        A pool that never connected says nothing: whoever asked for the
        connection has the error, and a command that could not reach its
        database should not print it twice.
        """
        pool = self._pool()
        if pool.outage.failed(exc, unreachable=False) and self.connected_once:
            logger.warning(
                "pool %r: cannot open connections: %s", self.name, exception_summary(exc)
            )
        else:
            logger.debug("pool %r: cannot open a connection: %s", self.name, exception_summary(exc))

    def note_reachable(self) -> None:
        """A connection got through: an outage, if there was one, is over."""
        outage = self._pool().outage
        if not outage.failing:
            return
        duration = outage.ended()
        if duration is not None:
            logger.warning(
                "pool %r: the database can be reached again after %.1f s", self.name, duration
            )
