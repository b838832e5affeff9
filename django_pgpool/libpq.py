"""Sending a query without waiting for its answer, and reading the answer with a
deadline, on a psycopg2 connection.

psycopg2 runs every statement to completion: send, then wait for the answer,
for as long as it takes. The pool needs two other ways. Its session reset has
no answer anyone waits for, so it is sent when a connection is returned and
its answer read when the connection is next taken (by then it has long
arrived): the reset costs no round trip of its own. And its liveness checks
must give up on a server that stopped answering, so their answers are read
with a deadline (several connections' at once, sharing one).
psycopg2 has no API for either, but it gives the address of each connection's
libpq ``PGconn`` (``connection.pgconn_ptr``), and this module calls, with
``ctypes``, the functions of the very libpq psycopg2 is linked against (looked
up through psycopg2's own extension module, so a second libpq loaded in the
process, psycopg 3's for instance, is never used by mistake).

psycopg2's view of the connection stays consistent: it keeps no state about
the server between statements, and a connection with a reset in flight is
never handed to anyone (the pool reads the answer first). Where libpq cannot
be reached this way, :func:`available` is False and the pool resets in the
returning thread instead, with psycopg2.
"""

from __future__ import annotations

import ctypes
import select
import time
from collections.abc import Callable
from typing import Any

#: libpq's ExecStatusType values that mean success (PGRES_EMPTY_QUERY,
#: PGRES_COMMAND_OK, PGRES_TUPLES_OK).
_RESULT_OK = frozenset((0, 1, 2))
_CONNECTION_OK = 0
_PQTRANS_IDLE = 0
# PQresultErrorField codes: the severity, untranslated (PostgreSQL 9.6+), and
# as the server's language says it.
_PG_DIAG_SEVERITY_NONLOCALIZED = ord("V")
_PG_DIAG_SEVERITY = ord("S")

#: libpq's PQnoticeReceiver: void (*)(void *arg, const PGresult *res).
_NoticeReceiver = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class _Libpq:
    """The libpq functions this module needs, bound with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        pgconn, pgresult = ctypes.c_void_p, ctypes.c_void_p

        def bind(name: str, restype: Any, *argtypes: Any) -> Any:
            function = getattr(lib, name)
            function.restype = restype
            function.argtypes = argtypes
            return function

        self.send_query = bind("PQsendQuery", ctypes.c_int, pgconn, ctypes.c_char_p)
        self.flush = bind("PQflush", ctypes.c_int, pgconn)
        self.consume_input = bind("PQconsumeInput", ctypes.c_int, pgconn)
        self.is_busy = bind("PQisBusy", ctypes.c_int, pgconn)
        self.get_result = bind("PQgetResult", pgresult, pgconn)
        self.result_status = bind("PQresultStatus", ctypes.c_int, pgresult)
        self.result_error = bind("PQresultErrorMessage", ctypes.c_char_p, pgresult)
        self.clear = bind("PQclear", None, pgresult)
        self.error_message = bind("PQerrorMessage", ctypes.c_char_p, pgconn)
        self.status = bind("PQstatus", ctypes.c_int, pgconn)
        self.transaction_status = bind("PQtransactionStatus", ctypes.c_int, pgconn)
        self.notifies = bind("PQnotifies", ctypes.c_void_p, pgconn)
        self.free = bind("PQfreemem", None, ctypes.c_void_p)
        self.socket = bind("PQsocket", ctypes.c_int, pgconn)
        self.lib_version = bind("PQlibVersion", ctypes.c_int)
        self.result_error_field = bind(
            "PQresultErrorField", ctypes.c_char_p, pgresult, ctypes.c_int
        )
        self.set_notice_receiver = bind(
            "PQsetNoticeReceiver", _NoticeReceiver, pgconn, _NoticeReceiver, ctypes.c_void_p
        )


_libpq: _Libpq | None = None
_looked_up = False


def _load() -> _Libpq | None:
    global _libpq, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            import psycopg2._psycopg as extension
            import psycopg2.extensions

            # A handle on psycopg2's extension module: symbols are looked up
            # in it and in the libraries it was linked against.
            libpq = _Libpq(ctypes.CDLL(extension.__file__))
            if libpq.lib_version() == psycopg2.extensions.libpq_version():
                _libpq = libpq
        except (AttributeError, ImportError, OSError):  # pragma: no cover - exotic builds
            _libpq = None
    return _libpq


def available() -> bool:
    """Whether queries can be sent without waiting on this psycopg2 build."""
    return _load() is not None


def send(conn: Any, sql: bytes) -> bool:
    """Send ``sql`` (one or more statements) on ``conn`` without waiting for the answer.

    False if it could not be sent (the connection is broken). Nothing may use
    the connection before :func:`finish` has read the answer.
    """
    libpq = _libpq
    assert libpq is not None, "send() without available()"
    pgconn = conn.pgconn_ptr
    if not libpq.send_query(pgconn, sql):
        return False
    # In non-blocking mode (psycopg2 with a wait callback, as under gevent) part
    # of the query may still be buffered; finish() flushes the rest.
    return bool(libpq.flush(pgconn) >= 0)


def finish(conn: Any, timeout: float, what: str = "the reset") -> tuple[str, bool]:
    """Read the answer to what :func:`send` sent: ("", True) if it succeeded, else
    (why not, whether the server answered, with an error, rather than went away).

    Normally the answer is already there and this costs no wait. Waits are
    made with ``select.poll`` (cooperative under gevent) and bounded by
    ``timeout`` seconds: a server that stopped answering costs this one
    connection, never a thread stuck for good. An answer already received is
    read even when ``timeout`` is 0. ``what`` names the statement in messages.
    """
    libpq = _libpq
    assert libpq is not None
    pgconn = conn.pgconn_ptr
    deadline = time.monotonic() + timeout
    while (flushed := libpq.flush(pgconn)) == 1:
        if not _wait(libpq.socket(pgconn), select.POLLOUT, deadline):
            return f"the server did not take {what} within {timeout:g} s", False
    if flushed < 0:
        return _connection_error(libpq, pgconn), False
    failure = ""
    while True:
        while libpq.is_busy(pgconn):
            if not libpq.consume_input(pgconn):
                return _connection_error(libpq, pgconn), False
            if libpq.is_busy(pgconn) and not _wait(libpq.socket(pgconn), select.POLLIN, deadline):
                return f"the server did not answer {what} within {timeout:g} s", False
        result = libpq.get_result(pgconn)
        if not result:
            break
        if libpq.result_status(result) not in _RESULT_OK and not failure:
            failure = (libpq.result_error(result) or b"").decode("utf-8", "replace").strip()
        libpq.clear(result)
    # Notifications that arrived meanwhile were for the previous user.
    while notify := libpq.notifies(pgconn):
        libpq.free(notify)
    if libpq.status(pgconn) != _CONNECTION_OK:
        return _connection_error(libpq, pgconn), False
    if failure:
        return failure, True
    if libpq.transaction_status(pgconn) != _PQTRANS_IDLE:
        return f"{what} left a transaction open", True
    return "", True


def on_session_end(conn: Any, callback: Callable[[], None]) -> Any:
    """Call ``callback()`` when the server announces that it ends the session.

    A server ending an idle session (``pg_terminate_backend()``, a shutdown,
    ``idle_session_timeout``) first sends a FATAL message, then closes the
    socket. libpq hands such a message, arriving between statements, to the
    notice processor (psycopg2's, which keeps it to itself until the next
    statement). When :func:`finish` reads a reset's answer it may read that
    message too, leaving nothing on the socket to tell that the session is
    over until the server's process has exited. This puts a notice receiver
    in front of psycopg2's that calls ``callback`` for a FATAL (or PANIC)
    message and passes every message on. The returned object must be kept
    as long as the connection.
    """
    libpq = _libpq
    assert libpq is not None
    passed_on: list[Any] = []

    def receive(arg: int | None, result: int | None) -> None:
        try:
            if passed_on[0]:
                passed_on[0](arg, result)
        finally:
            severity = libpq.result_error_field(
                result, _PG_DIAG_SEVERITY_NONLOCALIZED
            ) or libpq.result_error_field(result, _PG_DIAG_SEVERITY)
            if severity in (b"FATAL", b"PANIC"):
                callback()

    receiver = _NoticeReceiver(receive)
    # libpq's default receiver, which hands the message to the notice
    # processor (psycopg2's); it takes no argument of its own.
    passed_on.append(libpq.set_notice_receiver(conn.pgconn_ptr, receiver, None))
    return receiver


def _connection_error(libpq: _Libpq, pgconn: int) -> str:
    message = (libpq.error_message(pgconn) or b"").decode("utf-8", "replace").strip()
    return message or "the connection was lost"


def _wait(fd: int, event: int, deadline: float) -> bool:
    """Wait until ``fd`` is ready for ``event``; False once ``deadline`` passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(remaining * 1000.0))
