"""One pooled connection: the class the pool hands out, its bookkeeping, and
what the pool does to it (open it with the pool's session, check it, reset it).

The pool hands out real psycopg2 connections, of a subclass that carries one
extra attribute, ``pool_entry``: an :class:`Entry` with everything the pool
knows about that connection (HikariCP's ``PoolEntry``). The subclass also
marks the entry *dirty* whenever a cursor is opened (every statement needs
one) or the client encoding changes, so that a connection that ran nothing
goes back to the pool without a reset.

:class:`Connector` does what happens to a single connection on the pool's
behalf: open it with the session every user of the pool relies on (Django's
time zone and role), check that it is alive, and reset its session.
"""

from __future__ import annotations

import logging
import os
import random
import select
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions as ext

from . import libpq, network, validation

if TYPE_CHECKING:
    from .config import PoolConfig
    from .counters import Counters
    from .ownership import OpenTransactionReports
    from .pool import ConnectionPool

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

#: A connection's ``max_lifetime`` is shortened by up to this fraction, at
#: random, so that connections opened together don't all expire together.
LIFETIME_JITTER = 0.05

#: What :meth:`Connector.finish_reset` says of a reset that failed: the server
#: refused it (the connection works), or the connection is lost.
RESET_REFUSED = "refused"
RESET_LOST = "lost"

TRANSACTION_IDLE = ext.TRANSACTION_STATUS_IDLE
#: In the middle of a query, or the server connection is lost.
UNUSABLE_STATUSES = frozenset((ext.TRANSACTION_STATUS_ACTIVE, ext.TRANSACTION_STATUS_UNKNOWN))
OPEN_TRANSACTION_STATUSES = frozenset(
    (ext.TRANSACTION_STATUS_INTRANS, ext.TRANSACTION_STATUS_INERROR)
)

_INFINITY = float("inf")


class Entry:
    """What the pool knows about one of its connections."""

    __slots__ = (
        "checked_at",
        "checked_out_at",
        "checkout_id",
        "created_at",
        "cursor_factory",
        "dirty",
        "expires_at",
        "generation",
        "holder",
        "key",
        "last_used",
        "leak_reported",
        "lease",
        "notice_receiver",
        "origin",
        "poller",
        "pool",
        "reset_pending",
        "server",
        "session_ended",
        "suspect",
    )

    def __init__(self, pool: ConnectionPool, conn: Any, lifetime: float | None) -> None:
        now = time.monotonic()
        #: The pool the connection belongs to.
        self.pool = pool
        self.created_at = now
        #: When it must be retired (``max_lifetime``, less some jitter).
        self.expires_at = (
            now + lifetime * (1.0 - random.uniform(0.0, LIFETIME_JITTER)) if lifetime else _INFINITY
        )
        #: When it last did something the server answered (a return, a check
        #: before it was handed out): ``max_idle`` counts from here.
        self.last_used = now
        #: When the server last answered a check on it (keepalives included).
        self.checked_at = now
        self.checked_out_at = now
        #: Whether it ran anything since its last reset.
        self.dirty = False
        #: Whether a reset was sent whose answer has not been read yet: nothing
        #: may use the connection before it is (``Connector.finish_reset``).
        self.reset_pending = False
        #: The number of its current checkout; 0 while it is in the pool.
        self.checkout_id = 0
        #: The thread that checked it out (``threading.get_ident()``).
        self.holder: int | None = None
        #: Weak reference to the thread lease it is bound to, if any.
        self.lease: Any = None
        #: The stack that took it, when leak detection is on.
        self.origin: Any = None
        self.leak_reported = False
        #: psycopg2's ``getconn(key)``.
        self.key: Any = None
        #: ``drain()`` starts a new generation; older connections are retired.
        self.generation = pool.generation
        self.cursor_factory = conn.cursor_factory
        self.poller = _make_poller(conn)
        #: The server it reached, "host:port" (one of several with a multi-host
        #: HOST), and whether that server may have changed role or gone away
        #: since: a suspect connection is checked before reuse (see roles.py).
        self.server = f"{conn.info.host}:{conn.info.port}"
        self.suspect = False
        #: Set when the server announced the end of the session (a FATAL
        #: message between statements), maybe before closing its socket.
        self.session_ended = False
        self.notice_receiver: Any = (
            libpq.on_session_end(conn, self.note_session_end) if libpq.available() else None
        )

    def note_session_end(self) -> None:
        self.session_ended = True

    def socket_has_data(self) -> bool:
        """Whether the server sent something to a connection nobody is using.

        An idle connection should receive nothing; data (or end of file) means
        the server terminated the session or restarted, or at least that
        something unexpected is pending. Costs a system call, not a round trip.
        """
        return bool(self.poller.poll(0))


def entry_of(conn: Any) -> Entry | None:
    """The pool's bookkeeping of ``conn``, or None if it is not a pooled connection."""
    return getattr(conn, "pool_entry", None)


def pool_of(conn: Any) -> ConnectionPool | None:
    """The pool ``conn`` was taken from, or None."""
    entry = getattr(conn, "pool_entry", None)
    return entry.pool if entry is not None else None


_pooled_classes: dict[type, type] = {}
_pooled_classes_lock = threading.Lock()


def pooled_connection_class(base: type[Any]) -> type[Any]:
    """A subclass of the psycopg2 connection class ``base`` that the pool can track."""
    if base in _pooled_classes.values():
        return base
    with _pooled_classes_lock:
        cls = _pooled_classes.get(base)
        if cls is None:
            base_cursor = base.cursor
            base_set_client_encoding = base.set_client_encoding

            def cursor(self: Any, *args: Any, **kwargs: Any) -> Any:
                self.pool_entry.dirty = True
                return base_cursor(self, *args, **kwargs)

            def set_client_encoding(self: Any, encoding: str) -> None:
                self.pool_entry.dirty = True
                base_set_client_encoding(self, encoding)

            cls = type(
                f"Pooled{base.__name__.capitalize()}",
                (base,),
                {
                    "__slots__": ("pool_entry",),
                    "__module__": __name__,
                    "__doc__": f"A pooled {base.__module__}.{base.__qualname__}.",
                    "cursor": cursor,
                    "set_client_encoding": set_client_encoding,
                },
            )
            _pooled_classes[base] = cls
        return cls


def evaluated(value: Any) -> Any:
    """A connection parameter's value for a new connection.

    Credentials that change (a cloud IAM token) are given as a callable,
    evaluated for every new connection. Factories are classes: left alone.
    """
    return value() if callable(value) and not isinstance(value, type) else value


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


def _escape_option(value: str) -> str:
    """Escape a value for libpq's ``options`` (spaces and backslashes)."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def exception_summary(exc: BaseException) -> str:
    """``Type: first line of the message``, for logs and errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class Connector:
    """Opens, checks, resets and closes the connections of one pool.

    ``connect_kwargs`` are passed to ``psycopg2.connect()`` for every new
    connection (a callable returning them is called each time instead, so
    credentials can change while the pool runs).

    The session every user of the pool relies on (Django's time zone and role)
    comes in two parts. ``session_settings`` (setting name to value) are sent
    as startup parameters, which makes them the session's defaults: the reset
    (``DISCARD ALL``) restores them for free. Where a proxy refuses or ignores
    startup parameters (PgBouncer), this notices and applies them with SQL
    instead. ``session_sql`` with ``session_params`` runs on every new
    connection and after every reset, in the same round trip as the reset.
    """

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        connect_kwargs: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
        counters: Counters,
        *,
        session_settings: Mapping[str, str] | None = None,
        session_sql: str = "",
        session_params: Sequence[Any] = (),
        prepare: Callable[[Any], None] | None = None,
        transaction_reports: OpenTransactionReports | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.counters = counters
        #: Where a connection returned with its transaction open is reported.
        self.transaction_reports = transaction_reports
        self.connect_kwargs = connect_kwargs
        self.session_settings = dict(session_settings or {})
        # Until a server or proxy proves otherwise.
        self.startup_settings_work = True
        self.session_sql = session_sql
        self.session_params = tuple(session_params)
        self.prepare = prepare
        reset = config.reset
        self.reset_sql = RESET_SQL if reset is True else reset if isinstance(reset, str) else ""
        self.reset_callable = reset if callable(reset) else None
        self.resets_sessions = reset is not False
        # The reset message, by whether startup settings work (it may change once).
        self._reset_messages: dict[bool, bytes] = {}
        self._reset_failure_reported = False

    # ------------------------------------------------------------------ opening

    def open(self, pool: ConnectionPool) -> Any:
        """Connect and apply the session settings. Never called with the pool's lock held.

        Raises what went wrong: psycopg2's error when the server could not be
        reached or refused the connection; the error itself when a
        ``connect_params`` or ``configure`` hook or a callable password
        failed or gave something libpq can't take (waiting won't fix those).
        """
        try:
            kwargs = self.connection_parameters()
        except Exception:
            self.counters.add("connections_errors")
            raise
        application_name = kwargs.get("application_name")
        if isinstance(application_name, str) and "{pid}" in application_name:
            kwargs["application_name"] = application_name.replace("{pid}", str(os.getpid()))
        connection_class = pooled_connection_class(
            kwargs.pop("connection_factory", None) or ext.connection
        )
        use_startup_settings = bool(self.session_settings) and self.startup_settings_work
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
                self.startup_settings_work = use_startup_settings = False
                logger.info(
                    "pool %r: the server refuses startup options; applying session "
                    "settings with SQL instead",
                    self.name,
                )
                conn = psycopg2.connect(connection_factory=connection_class, **kwargs)
        except Exception:
            self.counters.add("connections_errors")
            raise
        try:
            conn.autocommit = True
            conn.pool_entry = Entry(pool, conn, self.config.max_lifetime)
            if use_startup_settings and not self._startup_settings_applied(conn):
                # Accepted but ignored (PgBouncer's ignore_startup_parameters).
                self.startup_settings_work = False
            self._apply_session(conn, "")
            if self.prepare is not None:
                self.prepare(conn)
            if self.config.configure is not None:
                self.config.configure(conn)
                if conn.info.transaction_status != TRANSACTION_IDLE:
                    conn.rollback()
            conn.pool_entry.dirty = False
        except BaseException:
            conn.close()
            self.counters.add("connections_errors")
            raise
        with self.counters.lock:
            values = self.counters.values
            values["connections_num"] += 1
            values["connections_ms"] += (time.monotonic() - started) * 1000.0
        return conn

    def connection_parameters(self) -> dict[str, Any]:
        """The parameters for a new connection: the pool's (callables evaluated),
        ``connect_params``' on top, then :data:`.network.CONNECTION_DEFAULTS`
        where neither gave a value. Raises ``TypeError`` or ``ValueError``,
        naming the pool and where the value came from, for what libpq can't take.
        """
        given = self.connect_kwargs() if callable(self.connect_kwargs) else self.connect_kwargs
        kwargs: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, value in given.items():
            kwargs[key] = evaluated(value)
            if kwargs[key] is not value:
                sources[key] = f"returned by {validation.describe_callable(value)}"
        hook = self.config.connect_params
        if hook is not None:
            extra = hook()
            if not isinstance(extra, Mapping):
                raise TypeError(
                    f"pool {self.name!r}: connect_params ({validation.describe_callable(hook)}) "
                    f"returned {validation.describe(extra, with_type=True)}; it must return a "
                    f"dict of connection parameters, such as {{'password': token}} ({{}} for "
                    f"none)."
                )
            kwargs.update(extra)
            source = f"returned by connect_params ({validation.describe_callable(hook)})"
            sources.update(dict.fromkeys(extra, source))
        for key, value in kwargs.items():
            try:
                validation.connection_parameter(value)
            except validation.InvalidValue as exc:
                source = f" {sources[key]}" if key in sources else ""
                raise ValueError(
                    f"pool {self.name!r}: the connection parameter {key!r}{source} is invalid: "
                    f"it {exc}."
                ) from None
        return network.with_defaults(kwargs)

    def _with_startup_settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` with the session settings added to libpq's ``options``."""
        flags = " ".join(
            f"-c {name}={_escape_option(value)}" for name, value in self.session_settings.items()
        )
        existing = kwargs.get("options") or ""
        return {**kwargs, "options": f"{existing} {flags}".strip()}

    def _startup_settings_applied(self, conn: Any) -> bool:
        return all(
            conn.get_parameter_status(name) == value
            for name, value in self.session_settings.items()
        )

    # ------------------------------------------------------------------ checking

    def check(self, conn: Any) -> BaseException | None:
        """A round-trip check: None if the connection answered, else the error."""
        return self.check_all([conn])[0]

    def check_all(
        self, conns: Sequence[Any], *, keepalive: bool = False
    ) -> list[BaseException | None]:
        """Round-trip checks of idle connections: for each, None if it answered, else why not.

        Every check is sent first and the answers read after, all within one
        :data:`.network.CHECK_TIMEOUT`: a server that stopped answering costs
        that long once, however many connections it holds. A ``check``
        callable runs instead of ``SELECT 1``, one connection after the
        other, bounded only by the sockets' own settings. A ``keepalive``
        leaves ``last_used`` alone, so that ``max_idle`` still applies.
        """
        with self.counters.lock:
            self.counters.values["checks_num"] += len(conns)
        deadline = time.monotonic() + network.CHECK_TIMEOUT
        errors: list[BaseException | None] = [None] * len(conns)
        sent: list[int] = []
        lost_at_reset: set[int] = set()  # counted as lost by finish_reset()
        for index, conn in enumerate(conns):
            if conn.closed:
                errors[index] = psycopg2.InterfaceError("connection already closed")
            elif conn.pool_entry.reset_pending and (
                failed := self.finish_reset(conn, max(0.0, deadline - time.monotonic()))
            ):
                errors[index] = psycopg2.OperationalError("its reset failed")
                if failed == RESET_LOST:
                    lost_at_reset.add(index)
            elif self.config.check is not None or not libpq.available():
                errors[index] = self._check_with_psycopg2(conn)
            elif libpq.send(conn, b"SELECT 1"):
                sent.append(index)
            else:
                errors[index] = psycopg2.OperationalError("the connection was lost")
        for index in sent:
            remaining = max(0.0, deadline - time.monotonic())
            failure, _ = libpq.finish(conns[index], remaining, "the check")
            if failure:
                errors[index] = psycopg2.OperationalError(failure)
        now = time.monotonic()
        for index, (conn, error) in enumerate(zip(conns, errors, strict=True)):
            if error is None:
                conn.pool_entry.checked_at = now
                if not keepalive:
                    conn.pool_entry.last_used = now
                continue
            with self.counters.lock:
                self.counters.values["checks_failed"] += 1
                if index not in lost_at_reset:
                    self.counters.values["connections_lost"] += 1
            logger.info(
                "pool %r: discarding a connection that failed its check (%s)",
                self.name,
                exception_summary(error),
            )
        return errors

    def _check_with_psycopg2(self, conn: Any) -> BaseException | None:
        entry = conn.pool_entry
        was_dirty = entry.dirty
        try:
            if self.config.check is not None:
                self.config.check(conn)
            else:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1")
        except Exception as exc:
            return exc
        entry.dirty = was_dirty
        return None

    # ------------------------------------------------------------------ resetting

    def returned(self, conn: Any, close: bool, now: float) -> tuple[str, bool]:
        """(why it must go, or ""; whether it needs a reset) for a returned connection.

        All local state, no round trip. A transaction left open is reported
        (it is rolled back by the reset).
        """
        if close:
            return "the caller asked to close it", False
        if conn.closed:
            return "it was closed or broken", False
        status = conn.get_transaction_status()
        if status in UNUSABLE_STATUSES:
            why = "it was returned in the middle of a query or with its server connection lost"
            return why, False
        if status in OPEN_TRANSACTION_STATUSES and self.transaction_reports is not None:
            aborted = status == ext.TRANSACTION_STATUS_INERROR
            self.transaction_reports.report(conn, aborted, now)
        return "", self.needs_reset(conn, status)

    def needs_reset(self, conn: Any, transaction_status: int) -> bool:
        """Whether a returned connection needs work before the next user gets it.

        A connection that ran SQL needs the session reset, unless resetting is
        off; any connection needs its transaction ended and psycopg2's session
        characteristics restored.
        """
        if conn.notices:
            del conn.notices[:]
        return bool(
            (conn.pool_entry.dirty and self.resets_sessions)
            or transaction_status != TRANSACTION_IDLE
            or not conn.autocommit
            or conn.isolation_level is not None
            or conn.readonly is not None
            or conn.deferrable is not None
            or conn.notifies
        )

    def begin_reset(self, conn: Any) -> bool:
        """Start bringing a returned connection back to a fresh session; False if unusable.

        Here, in the returning thread: an open transaction is rolled back (a
        round trip, but only for a connection returned mid-transaction) and
        psycopg2's session characteristics restored (local). Then, if the
        connection ran anything, the session reset is *sent* without waiting
        for its answer; :meth:`finish_reset` reads that answer before anyone
        uses the connection again, so the reset costs no round trip of its
        own. A reset callable, or a psycopg2 build whose libpq can't be
        reached, resets here and now instead.
        """
        entry = conn.pool_entry
        try:
            status = conn.info.transaction_status
            if conn.closed or status in UNUSABLE_STATUSES:
                return False
            if status != TRANSACTION_IDLE:
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
            del conn.notifies[:]
            if conn.cursor_factory is not entry.cursor_factory:
                conn.cursor_factory = entry.cursor_factory
            if entry.dirty and self.resets_sessions:
                if self.reset_callable is not None:
                    self.reset_callable(conn)
                    if conn.info.transaction_status != TRANSACTION_IDLE:
                        self._reset_failed("the reset callable left a transaction open", True)
                        return False
                    self._apply_session(conn, "")
                elif libpq.available():
                    if not libpq.send(conn, self._reset_message(conn)):
                        self._reset_failed("the connection was lost", False)
                        return False
                    entry.reset_pending = True
                elif self.reset_sql is RESET_SQL and self._discard_all_suffices():
                    with conn.cursor() as cursor:
                        cursor.execute("DISCARD ALL")
                else:
                    self._apply_session(conn, self.reset_sql)
                self.counters.add("resets_num")
        except Exception as exc:
            # A server that answered with an error, or a reset callable that
            # raised, will do the same next time; a lost connection won't.
            lost = isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError)
            self._reset_failed(exception_summary(exc), not (lost or conn.closed))
            return False
        entry.dirty = False
        return True

    def finish_reset(self, conn: Any, timeout: float = network.RESET_ANSWER_TIMEOUT) -> str:
        """Read the answer to the reset :meth:`begin_reset` sent.

        Returns "" if the reset succeeded; else :data:`RESET_REFUSED` (the
        server answered with an error) or :data:`RESET_LOST` (the connection
        is gone, or silent). Called before anything else uses the
        connection. The answer has normally long arrived; a server that does
        not answer within ``timeout`` seconds costs this connection, not the
        pool.
        """
        entry = conn.pool_entry
        entry.reset_pending = False
        failure, answered = libpq.finish(conn, timeout)
        if not failure and entry.session_ended:
            # Its FATAL message came with the answer; the socket may not
            # show it yet.
            failure, answered = "the server ended the session", False
        if not failure:
            return ""
        self._reset_failed(failure.splitlines()[0], answered)
        if answered:
            return RESET_REFUSED
        self.counters.add("connections_lost")
        return RESET_LOST

    def _reset_failed(self, why: str, by_the_server: bool) -> None:
        """Count a reset that failed, and say so.

        A reset the server refused (or a reset callable that failed) on a
        working connection will fail every time, costing every request a new
        connection: that is a WARNING, once per pool. A connection lost
        during its reset is only news at INFO.
        """
        self.counters.add("resets_failed")
        if by_the_server and not self._reset_failure_reported:
            self._reset_failure_reported = True
            logger.warning(
                "pool %r: the session reset failed on a working connection (%s); the "
                "connection was discarded. A reset that fails every time costs every request "
                "a new connection: check OPTIONS['pool']['reset']. Every failed reset is "
                "counted in stats()['resets_failed'].",
                self.name,
                why,
            )
        else:
            logger.info("pool %r: discarding a connection whose reset failed (%s)", self.name, why)

    def _reset_message(self, conn: Any) -> bytes:
        """The statements :meth:`begin_reset` sends, as one message."""
        cached = self._reset_messages.get(self.startup_settings_work)
        if cached is not None:
            return cached
        if self.reset_sql is RESET_SQL and self._discard_all_suffices():
            # One statement, as cheap as SELECT 1; it restores the startup
            # settings (Django's time zone) by itself.
            message = b"DISCARD ALL"
        else:
            statements, params = self._session_statements(self.reset_sql)
            with conn.cursor() as cursor:  # mogrify() is local: no round trip
                message = cursor.mogrify("; ".join(statements), params or None)
        self._reset_messages[self.startup_settings_work] = message
        return message

    def _discard_all_suffices(self) -> bool:
        """Whether ``DISCARD ALL`` alone leaves the session as its users expect."""
        return not self.session_sql and (not self.session_settings or self.startup_settings_work)

    def _apply_session(self, conn: Any, reset_sql: str) -> None:
        """Run ``reset_sql`` and re-apply the session, in one round trip."""
        statements, params = self._session_statements(reset_sql)
        if statements:
            with conn.cursor() as cursor:
                cursor.execute("; ".join(statements), params or None)

    def _session_statements(self, reset_sql: str) -> tuple[list[str], list[Any]]:
        """``reset_sql`` then the statements that set the pool's session up, with parameters."""
        statements = [reset_sql] if reset_sql else []
        params: list[Any] = []
        if self.session_settings and not self.startup_settings_work:
            for name, value in self.session_settings.items():
                statements.append("SELECT set_config(%s, %s, false)")
                params += [name, value]
        if self.session_sql:
            statements.append(self.session_sql)
            params += self.session_params
        if params and reset_sql:
            # The reset SQL is the caller's text, not a template.
            statements[0] = reset_sql.replace("%", "%%")
        return statements, params

    # ------------------------------------------------------------------ closing

    def close(self, conn: Any, reason: str) -> None:
        """Close the server connection, without waiting (the caller frees its slot)."""
        self.counters.closed(reason)
        logger.debug("pool %r: closing a connection: %s", self.name, reason)
        network.close_without_waiting(conn)
