"""Role awareness: the servers a pool's connections reach, and what to do when one changes.

With a multi-host ``HOST`` (``"10.0.0.1,10.0.0.2"``) libpq connects to the
first server that has the role ``OPTIONS["target_session_attrs"]`` asks for
(``read-write``, ``primary``, ``read-only``, ``standby``). That holds at
connect time only; a pooled connection outlives it. After a switchover or a
failover the old primary may still hold pooled connections, now to a
standby or to a server made read-only, and every write on them fails with
SQLSTATE 25006. :class:`RoleWatch` keeps the pool honouring the alias's
requirement after connect:

- **At checkout, for free.** PostgreSQL 14+ reports ``in_hot_standby`` and
  ``default_transaction_read_only`` to the client whenever they change, with
  the answer to any statement (the session reset's included), and psycopg2
  keeps the latest values locally (``connection.get_parameter_status``). A
  connection whose server no longer has the role is retired before it is
  handed out. Only aliases that asked for a role pay for the look-up (one
  local read, of what can change under a live session); older servers and
  proxies that don't forward these parameters are checked with a query when
  a connection is suspect (below).
- **One failure is enough.** An error that says the server changed role or
  went away (25006 on an alias that must be writable, 57P01/57P02/57P03, a
  lost connection) makes every connection of the pool to that server
  *suspect*: the idle ones are checked in the background at once (a round
  trip, which also brings the current role), the others before their next
  use. Those whose server went away or changed role are retired.
- **Said once.** Each such event is counted (``server_events``) and logged
  once, as a WARNING when connections were retired: which server, the role it
  reported, how many connections went.

Servers are told apart by the host and port a connection actually reached
(``connection.info.host`` / ``port``), recorded when it is opened
(``Entry.server``). This
module does not import Django; :mod:`django_pgpool.failover` is the Django
wrapper's side (replacing a suspect connection between statements, retrying
the one statement that met a read-only server).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .pooled_connection import exception_summary

if TYPE_CHECKING:
    from .pool import ConnectionPool

logger = logging.getLogger("django_pgpool")

#: SQLSTATE of a write refused in a read-only transaction.
READ_ONLY_SQL_TRANSACTION = "25006"

#: SQLSTATEs that say the server went away: an administrator or a shutdown
#: ended the session, a crash restarted the server, it does not take
#: connections (starting up, shutting down, in recovery).
SERVER_GONE = {
    "57P01": "the server ended the session (admin_shutdown)",
    "57P02": "the server crashed (crash_shutdown)",
    "57P03": "the server does not accept connections now (cannot_connect_now)",
}

#: ``target_session_attrs`` values that need the server to take writes.
WRITABLE_REQUIREMENTS = frozenset(("read-write", "primary"))

#: An event about a server is over when a connection to it is found healthy
#: again, or after this many seconds without a new sign (seconds).
EVENT_QUIET_PERIOD = 60.0

#: An event is logged once no suspect connection to its server is left, or
#: this long after it began (seconds), whichever comes first.
EVENT_REPORT_WITHIN = 2.0


@dataclass(frozen=True)
class Role:
    """What a server says it is: a standby or not, read-only by default or not (None: unknown)."""

    standby: bool | None
    read_only: bool | None

    def describe(self) -> str:
        if self.standby:
            return "standby (in_hot_standby=on)"
        if self.standby is None and self.read_only is None:
            return "an unknown role"
        if self.read_only:
            return "primary, read-only (default_transaction_read_only=on)"
        return "primary, read-write" if self.read_only is not None else "primary"


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def role_of(conn: Any, *, ask: bool = False) -> Role:
    """The role ``conn``'s server reported with its last answer.

    Local: no round trip. With ``ask``, a server that does not report these
    parameters (before PostgreSQL 14, or behind a proxy) is asked with a query.
    """
    role = Role(
        _flag(conn.get_parameter_status("in_hot_standby")),
        _flag(conn.get_parameter_status("default_transaction_read_only")),
    )
    if ask and (role.standby is None or role.read_only is None):
        entry = conn.pool_entry
        was_dirty = entry.dirty
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"
            )
            standby, read_only = cursor.fetchone()
        entry.dirty = was_dirty
        role = Role(bool(standby), read_only == "on")
    return role


_Status = Callable[[str], "str | None"]

# What the checkout looks at, per requirement. A server never enters recovery
# while it has sessions (a primary becomes a standby only through a restart,
# which ends them), so on a live connection in_hot_standby can only go from
# on to off (a promotion), and default_transaction_read_only either way (a
# reload). Each requirement reads only what can break it: one local read
# (about 0.2 µs in psycopg2), or none for "primary".


def _rejects_read_write(conn: Any) -> bool:
    status: _Status = conn.get_parameter_status
    return status("default_transaction_read_only") == "on"


def _rejects_read_only(conn: Any) -> bool:
    status: _Status = conn.get_parameter_status
    return status("default_transaction_read_only") == "off" and status("in_hot_standby") == "off"


def _rejects_standby(conn: Any) -> bool:
    status: _Status = conn.get_parameter_status
    return status("in_hot_standby") == "off"


#: For each ``target_session_attrs`` that constrains the role after connect:
#: whether a connection's (locally known) role breaks it, as far as a live
#: session's role can change. Unknown values (a server that doesn't report
#: them) break nothing here. ``primary`` needs no look at checkout; ``any``
#: and ``prefer-standby`` accept whatever they connected to.
REQUIREMENTS: dict[str, Callable[[Any], bool] | None] = {
    "read-write": _rejects_read_write,
    "primary": None,
    "read-only": _rejects_read_only,
    "standby": _rejects_standby,
}


def required_role(
    connect_kwargs: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
) -> str | None:
    """The ``target_session_attrs`` the pool must keep honouring, or None."""
    if callable(connect_kwargs):
        return None
    value = connect_kwargs.get("target_session_attrs")
    return value if value in REQUIREMENTS else None


def requires_writable(target_session_attrs: Any) -> bool:
    """Whether an alias with this ``target_session_attrs`` needs a server that takes writes."""
    return target_session_attrs in WRITABLE_REQUIREMENTS


def _lost(conn: Any) -> bool:
    """Whether ``conn``'s server connection is gone (psycopg2 or libpq noticed)."""
    try:
        return bool(conn.closed) or conn.info.status != 0  # CONNECTION_OK
    except Exception:
        return True


class _Event:
    """A server that changed role or went away, from the first sign until it is healthy again."""

    __slots__ = ("cause", "kept", "last_sign", "logged", "retired", "role", "started")

    def __init__(self, cause: str, role: Role | None) -> None:
        self.started = self.last_sign = time.monotonic()
        self.cause = cause
        self.role = role
        #: Connections to the server retired since, and checked and kept.
        self.retired = 0
        self.kept = 0
        self.logged = False


#: The counters :meth:`RoleWatch.stats` adds to the pool's statistics (with the
#: gauge ``connections_suspect``, and a replica alias's ``replica_lag_seconds``
#: and ``replica_healthy``).
COUNTERS = ("server_events", "connections_wrong_role", "statements_retried")


class RoleWatch:
    """A pool's role awareness: the role its alias requires and the events of its servers."""

    def __init__(self, pool: ConnectionPool, required: str | None) -> None:
        self._pool_ref = weakref.ref(pool)
        self.name = pool.name
        #: The ``target_session_attrs`` kept after connect, or None.
        self.required = required
        #: What a checkout looks at (None: nothing, unless the connection is suspect).
        self.rejects = REQUIREMENTS.get(required) if required else None
        #: Whether a write refused as read-only means the server changed role.
        self.requires_writable = requires_writable(required)
        self._lock = threading.Lock()
        self._events: dict[str, _Event] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)
        #: The server new connections reached last, to say when that changes.
        self._current_server: str | None = None
        #: ``(lag in seconds or None, healthy)`` for a replica alias, written by
        #: the router's monitor (:mod:`django_pgpool.routers`).
        self.replica: tuple[float | None, bool] | None = None

    def _pool(self) -> ConnectionPool | None:
        return self._pool_ref()

    # ------------------------------------------------------------------ checkout

    def acceptable(self, conn: Any) -> bool:
        """Whether ``conn``, about to be handed out, may be: its server still has the role.

        The pool calls this only for an alias whose role can change under a
        live connection (:data:`REQUIREMENTS`), or for a suspect connection.
        A suspect one is checked with a round trip first (which also brings
        its server's current role; an old server is asked).
        """
        entry = conn.pool_entry
        if not entry.suspect:
            rejects = self.rejects
            if rejects is None or not rejects(conn):
                if entry.server != self._current_server:
                    self._new_server(entry.server, conn)
                return True
            role = role_of(conn)
        else:
            entry.suspect = False
            pool = self._pool()
            if pool is None or conn.closed or pool.connector.check(conn) is not None:
                self.server_changed(conn, "went away (a connection to it failed its check)")
                return False
            role = role_of(conn, ask=self.required is not None)
            if self.accepts(role):
                self.server_answered(entry.server)
                return True
        self.add("connections_wrong_role")
        self.server_changed(conn, f"now reports {role.describe()}", role)
        return False

    def accepts(self, role: Role) -> bool:
        """Whether a server of ``role`` has what the alias asks for (unknown never refuses)."""
        required = self.required
        if required == "read-write":
            return not role.standby and not role.read_only
        if required == "primary":
            return not role.standby
        if required == "read-only":
            return role.standby is not False or role.read_only is not False
        if required == "standby":
            return role.standby is not False
        return True

    def _new_server(self, server: str, conn: Any) -> None:
        """New connections reach another server: said once when the old one had an event."""
        previous, self._current_server = self._current_server, server
        if previous is not None and previous in self._events:
            logger.warning(
                "pool %r: connections now reach server %s (%s) instead of %s",
                self.name,
                server,
                role_of(conn).describe(),
                previous,
            )

    # ------------------------------------------------------------------ errors

    def note_error(self, conn: Any, exc: BaseException) -> str:
        """Learn from an error raised by a statement on ``conn``.

        Returns what it says about the server: ``"read-only"`` (a write
        refused on an alias that must be writable), ``"gone"`` (the server
        ended the session or the connection was lost) or ``""``.
        """
        code = getattr(exc, "pgcode", None)
        if code == READ_ONLY_SQL_TRANSACTION:
            if not self.requires_writable:
                return ""
            # The session itself may have been made read-only (SET
            # default_transaction_read_only): the check of the others says.
            self.server_changed(
                conn, "refused a write (25006 read-only transaction)", role_of(conn)
            )
            return "read-only"
        if code in SERVER_GONE or conn.closed:
            why = SERVER_GONE.get(code or "") or exception_summary(exc)
            self.server_changed(conn, f"went away ({why})")
            return "gone"
        return ""

    # ------------------------------------------------------------------ events

    def server_changed(self, conn: Any, cause: str, role: Role | None = None) -> None:
        """``conn``'s server changed role or went away: its other connections become suspect.

        The idle ones are checked in the background now; the others are
        checked before their next use. The event is logged once, when it has
        settled (no suspect connection to that server left) or after
        :data:`EVENT_REPORT_WITHIN` seconds.
        """
        pool = self._pool()
        if pool is None or pool.closed:
            return
        server = conn.pool_entry.server
        conn.pool_entry.suspect = True
        now = time.monotonic()
        with self._lock:
            event = self._events.get(server)
            if event is not None and now - event.last_sign > EVENT_QUIET_PERIOD:
                event = None
            new = event is None
            if event is None:
                event = self._events[server] = _Event(cause, role)
                self._counts["server_events"] += 1
            event.last_sign = now
        if not new:
            return
        for other in list(pool.slots.connections.values()):
            if other.pool_entry.server == server:
                other.pool_entry.suspect = True
        idle = pool.slots.take_idle(lambda idle: [c for c in idle if c.pool_entry.server == server])
        self._in_background(self._sweep, server, event, idle)

    def retiring(self, conn: Any) -> None:
        """The pool retires ``conn``: count it in its server's event; a lost one starts one."""
        entry = conn.pool_entry
        event = self._events.get(entry.server)
        if event is None and _lost(conn):
            self.server_changed(conn, "went away (a connection to it was lost)")
            event = self._events.get(entry.server)
        entry.suspect = False  # its fate is decided
        if event is not None:
            with self._lock:
                event.retired += 1

    def _in_background(self, task: Callable[..., None], *args: Any) -> None:
        pool = self._pool()
        worker = pool.worker if pool is not None else None
        if worker is not None and worker.alive and not worker.is_current_thread():
            worker.submit(task, *args)
        else:
            task(*args)

    def _sweep(self, server: str, event: _Event, idle: list[Any]) -> None:
        """Check the idle connections to a server that changed: keep or retire each."""
        pool = self._pool()
        if pool is None:
            return
        for conn in idle:
            conn.pool_entry.suspect = False
            if conn.closed or pool.connector.check(conn) is not None:
                pool.retire(conn, "its server went away")
                continue
            if self.required is not None and not self.accepts(role_of(conn, ask=True)):
                self.add("connections_wrong_role")
                event.role = role_of(conn)
                pool.retire(conn, "its server no longer has the role the alias asks for")
                continue
            event.kept += 1
            pool.add(conn)
        self._report_when_settled(server, event)

    def _report_when_settled(self, server: str, event: _Event) -> None:
        """Log the event once no suspect connection to its server is left (or it took too long)."""
        pool = self._pool()
        if pool is None or event.logged or pool.closed:
            return
        suspect = sum(
            1
            for conn in list(pool.slots.connections.values())
            if conn.pool_entry.server == server and conn.pool_entry.suspect
        )
        if suspect and time.monotonic() - event.started < EVENT_REPORT_WITHIN:
            timer = threading.Timer(
                EVENT_REPORT_WITHIN / 10,
                self._in_background,
                (self._report_when_settled, server, event),
            )
            timer.daemon = True
            timer.start()
            return
        with self._lock:
            event.logged = True
            retired, kept = event.retired, event.kept
        role = (
            f" (it reports {event.role.describe()})"
            if event.role is not None and "reports" not in event.cause
            else ""
        )
        needs = f"; the alias asks for {self.required}" if self.required else ""
        pending = f", {suspect} in use will be checked before reuse" if suspect else ""
        # A server that changed role, or one whose connections all failed, is
        # worth a warning; one lost connection among others that answer is not.
        if retired and (event.role is not None or (kept == 0 and retired > 1)):
            logger.warning(
                "pool %r: server %s %s%s%s: %d connection(s) to it retired%s",
                self.name,
                server,
                event.cause,
                role,
                needs,
                retired,
                pending,
            )
        else:
            logger.info(
                "pool %r: %d connection(s) to server %s retired (it %s); %d other(s) answered%s",
                self.name,
                retired,
                server,
                event.cause,
                kept,
                pending,
            )
            if kept and not suspect:
                self.server_answered(server)

    def server_answered(self, server: str) -> None:
        """A connection to ``server`` was found healthy, with the right role: its event is over."""
        if server in self._events:
            with self._lock:
                event = self._events.get(server)
                if event is not None and event.logged:
                    del self._events[server]

    # ------------------------------------------------------------------ statistics

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def servers(self) -> dict[str, int]:
        """How many of the pool's open connections reach each server."""
        pool = self._pool()
        counts: dict[str, int] = {}
        if pool is not None:
            for conn in list(pool.slots.connections.values()):
                server = conn.pool_entry.server
                counts[server] = counts.get(server, 0) + 1
        return counts

    def stats(self) -> dict[str, float]:
        """The role statistics :meth:`ConnectionPool.stats` reports."""
        pool = self._pool()
        suspect = (
            sum(1 for conn in list(pool.slots.connections.values()) if conn.pool_entry.suspect)
            if pool is not None
            else 0
        )
        with self._lock:
            values: dict[str, float] = {**self._counts, "connections_suspect": suspect}
        replica = self.replica
        if replica is not None:
            lag, healthy = replica
            values["replica_lag_seconds"] = -1.0 if lag is None else round(lag, 3)
            values["replica_healthy"] = int(healthy)
        return values


def reports_wrong_role(conn: Any) -> bool:
    """Whether ``conn``'s server reported, with its last answer, a role its alias refuses.

    One local read. When it did, the server's event starts (its other
    connections become suspect), as after an error.
    """
    watch: RoleWatch = conn.pool_entry.pool.roles
    rejects = watch.rejects
    if rejects is None or not rejects(conn):
        return False
    if not conn.pool_entry.suspect:
        role = role_of(conn)
        watch.server_changed(conn, f"now reports {role.describe()}", role)
    return True


def note_error(conn: Any, exc: BaseException) -> str:
    """:meth:`RoleWatch.note_error` for a connection of any pool ("" for one of none)."""
    entry = getattr(conn, "pool_entry", None)
    if entry is None:
        return ""
    watch: RoleWatch = entry.pool.roles
    return watch.note_error(conn, exc)
