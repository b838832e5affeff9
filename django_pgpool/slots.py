"""Where a pool's connections are, and the hand-off between returning and waiting threads.

:class:`Slots` is the pool's bookkeeping (HikariCP's ``ConcurrentBag``): how
many server connections the pool counts (its *size*: open, being opened, or
on their way to being closed), the stack of idle connections, the connections
checked out, and the queue of waiting requests. One lock guards all of it (and
the pool's counters); nothing here talks to the server, so the lock is only
ever held for a few dictionary and list operations.

Invariants, under the lock:

- ``size`` = idle + checked out + being opened + being returned + checked by
  the worker; it never exceeds ``max_size`` except after ``resize()`` shrank
  it, until the surplus is back.
- A connection is *checked out* from the moment it leaves the idle stack (or
  is handed to a waiter) until it is given back; each checkout has a number.
- A returning thread hands its connection to the longest waiter; it cannot
  take it back for itself while others wait (first come, first served).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from . import ownership
from .counters import Counters
from .errors import TooManyRequests, too_many_requests_message


class Waiter:
    """A caller waiting for a connection; woken by releasing ``event`` with a
    connection or an error."""

    __slots__ = ("conn", "error", "event")

    def __init__(self) -> None:
        self.event = threading.Lock()
        self.event.acquire()
        self.conn: Any = None
        self.error: BaseException | None = None


class Slots:
    """A pool's connections and waiters, under one lock."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.lock = threading.Lock()
        self.counters = Counters(self.lock)
        self.min_size = min_size
        self.max_size = max_size
        self.closed = False
        #: Open connections nobody uses; a stack, the most recently used on top.
        self.idle: list[Any] = []
        #: Requests waiting for a connection, longest waiting first.
        self.waiters: deque[Waiter] = deque()
        self.checked_out: dict[int, Any] = {}
        #: Every open connection, by id (changed without the lock: single
        #: dictionary operations), for fork safety and lifetime planning.
        self.connections: dict[int, Any] = {}
        #: psycopg2's ``getconn(key)``.
        self.keyed: dict[Any, Any] = {}
        self.size = 0
        #: Connections being opened for waiting requests.
        self.opening = 0
        #: Returned connections on their way back (their reset being sent).
        self.resetting = 0
        #: pause(): new checkouts wait and returned connections stay idle.
        self.paused = False

    # ------------------------------------------------------------------ taking

    def check_out_locked(self, conn: Any) -> None:
        """Mark ``conn`` checked out, with a new checkout number. Lock held.

        Numbered in the same step that marks it checked out: taking back an
        earlier checkout of this connection must never match this one.
        """
        self.checked_out[id(conn)] = conn
        conn.pool_entry.checkout_id = ownership.next_checkout_id()

    def may_open_locked(self, reachable: bool) -> bool:
        """Reserve a slot to open a connection for a new waiter, if one is needed. Lock held.

        Needed when the server answers, the pool has room, and the connections
        already on their way (being returned, being opened) are fewer than the
        requests already waiting: a pool never holds more connections than
        the threads using them at once.
        """
        if (
            reachable
            and not self.paused
            and self.size < self.max_size
            and len(self.waiters) >= self.resetting + self.opening
        ):
            self.size += 1
            self.opening += 1
            return True
        return False

    def reserve_for_waiter_locked(self) -> bool:
        """Reserve a slot to open a connection for the waiters, if they need one more. Lock held.

        They do when they outnumber the connections on their way to them
        (being returned or opened), and the pool has room.
        """
        if (
            not self.closed
            and not self.paused
            and self.size < self.max_size
            and len(self.waiters) > self.resetting + self.opening
        ):
            self.size += 1
            self.opening += 1
            return True
        return False

    def refuse_if_queue_full_locked(self, pool_name: str, max_waiting: int) -> None:
        """Turn a request away at once when ``max_waiting`` requests already wait. Lock held."""
        waiting = len(self.waiters)
        if max_waiting and waiting >= max_waiting:
            self.counters.values["requests_errors"] += 1
            raise TooManyRequests(
                too_many_requests_message(pool_name, waiting, self.max_size, max_waiting)
            )

    def queue_locked(self, queued: bool) -> Waiter:
        """Queue a new waiter; ``queued``: it waits because every connection is in use."""
        waiter = Waiter()
        self.waiters.append(waiter)
        if queued:
            self.counters.values["requests_queued"] += 1
        return waiter

    def served(self, waiter: Waiter) -> Any:
        """The connection handed to a woken ``waiter``, now checked out (or its error)."""
        if waiter.error is not None:
            raise waiter.error
        conn = waiter.conn
        with self.lock:
            self.check_out_locked(conn)
        return conn

    def _leave_queue_locked(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out of the queue; False if it was no longer there. Lock held."""
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return False
        return True

    def give_up(self, waiter: Waiter) -> bool:
        """A waiter's time ran out: True if it left the queue, False if it was served meanwhile."""
        with self.lock:
            if not self._leave_queue_locked(waiter):
                return False
            self.counters.values["requests_timeouts"] += 1
            return True

    def abandon(self, waiter: Waiter) -> None:
        """Take a waiter that gave up out of the queue, passing on what it was handed."""
        with self.lock:
            if self._leave_queue_locked(waiter):
                return
            conn: Any = waiter.conn
            waiter.conn = None
            if conn is None:
                return
            entry = conn.pool_entry
            if id(conn) in self.checked_out:
                del self.checked_out[id(conn)]
                entry.checkout_id = 0
                if entry.key is not None:
                    self.keyed.pop(entry.key, None)
                    entry.key = None
            self.make_available_locked(conn)
        ownership.end_lease(entry, conn)

    def take_idle(self, select: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """Take the idle connections ``select(idle)`` picks (oldest first) out of the pool.

        Their slots stay counted: the caller gives each back with
        :meth:`make_available` or retires it.
        """
        with self.lock:
            if self.closed:
                return []
            taken = [conn for conn in select(list(self.idle)) if conn is not None]
            for conn in taken:
                self.idle.remove(conn)
        return taken

    def reserve(
        self, *, up_to: int, or_while: Callable[[int, int, int], bool] | None = None
    ) -> bool:
        """Count one more connection if there are fewer than ``up_to`` (and
        ``max_size``), or if ``or_while(size, idle, waiting)`` says so."""
        with self.lock:
            if self.closed or self.size >= self.max_size:
                return False
            if self.size < up_to or (
                or_while is not None and or_while(self.size, len(self.idle), len(self.waiters))
            ):
                self.size += 1
                return True
            return False

    # ------------------------------------------------------------------ giving back

    def make_available_locked(self, conn: Any, least_recent: bool = False) -> None:
        """Give a ready connection to the longest waiter, or make it idle. Lock held.

        An idle connection goes on top of the stack (used next), or with
        ``least_recent`` at the bottom (a connection only checked, not used).
        While paused, it stays idle.
        """
        if self.waiters and not self.paused:
            waiter = self.waiters.popleft()
            waiter.conn = conn
            waiter.event.release()
        elif least_recent:
            self.idle.insert(0, conn)
        else:
            self.idle.append(conn)

    def make_available(self, conn: Any, least_recent: bool = False) -> bool:
        """A new, checked or reset connection joins the pool; False if the pool closed."""
        with self.lock:
            if self.closed:
                return False
            self.make_available_locked(conn, least_recent)
            return True

    def release_locked(self, refill: Callable[[], None] | None) -> None:
        """A connection slot became free. Lock held.

        With requests waiting, the slot is refilled at once by ``refill`` (a
        connector opening a connection for the longest waiter), if given.
        """
        if self.waiters and not self.closed and not self.paused and refill is not None:
            self.opening += 1
            refill()  # the slot stays counted
        else:
            self.size -= 1

    def resume_locked(self) -> None:
        """End a pause: idle connections go to the waiters, longest waiting first. Lock held."""
        self.paused = False
        while self.waiters and self.idle:
            self.make_available_locked(self.idle.pop())

    def fail_longest_waiter_locked(self, error: BaseException) -> None:
        """Give ``error`` to the longest waiter (a connection it waited for cannot be opened)."""
        if self.waiters:
            waiter = self.waiters.popleft()
            waiter.error = error
            waiter.event.release()

    def close_locked(self, error: BaseException | None, force: bool) -> list[Any]:
        """Mark closed; wake the waiters with ``error``; return the connections to close. Lock held.

        The idle (and, with ``force``, the checked-out) connections stop being
        counted. With ``error`` None (interpreter exit) the waiters are left
        alone: they are daemon threads about to vanish.
        """
        self.closed = True
        to_close = list(self.idle)
        self.idle.clear()
        if force:
            to_close += self.checked_out.values()
            self.checked_out.clear()
        self.size -= len(to_close)
        if error is not None:
            for waiter in self.waiters:
                waiter.error = error
                waiter.event.release()
            self.waiters.clear()
        return to_close

    def gauges_locked(self) -> dict[str, int]:
        """How many connections are where, for ``stats()``. Lock held."""
        return {
            "pool_min": self.min_size,
            "pool_max": self.max_size,
            "pool_size": self.size,
            "pool_available": len(self.idle),
            "pool_in_use": len(self.checked_out),
            "pool_resetting": self.resetting,
            "requests_waiting": len(self.waiters),
            "pool_paused": int(self.paused),
        }
