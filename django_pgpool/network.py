"""What bounds each wait the pool makes on the network.

A connection can go silent at any moment: the server hangs, a network drops
packets, a NAT forgets the flow. Nothing the pool does on its own behalf may
then wait for long, nor stop anything but that one connection:

- **Opening** is bounded by libpq's ``connect_timeout``, set to
  :data:`CONNECTION_DEFAULTS` unless the database's settings give one.
- **The socket** of every pooled connection gets TCP keepalives and
  ``tcp_user_timeout`` (the same defaults): a request whose network goes
  silent, mid-query or not, fails after about ``tcp_user_timeout`` instead of
  the kernel's retransmission timeout (about 15 minutes).
- **The liveness check** (``SELECT 1``) and **the reset's answer** are read
  with a deadline of their own (:data:`CHECK_TIMEOUT`,
  :data:`RESET_ANSWER_TIMEOUT`), since a server that stops answering while
  its kernel still acknowledges (a hung server) is silent to TCP too.
- **Closing** a connection never waits (:func:`close_without_waiting`).

The user's own statements are bounded only by the socket settings (and by
``statement_timeout`` on the server, which the pool never sets).
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import psycopg2.extensions

#: libpq connection parameters every pooled connection gets unless the
#: database's settings (``OPTIONS``, a ``dsn``, or libpq's environment
#: variable ``PGCONNECT_TIMEOUT``) set them: a connect gives up after 10 s, and
#: a connection whose network goes silent is dropped after about 10 s
#: (``tcp_user_timeout`` when data is unacknowledged; keepalive probes after
#: 5 s of silence otherwise, which ``tcp_user_timeout`` also ends after 10 s).
CONNECTION_DEFAULTS: Mapping[str, str] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "1",
    "keepalives_count": "5",
    "tcp_user_timeout": "10000",
}

# Connection parameters libpq reads from the environment when not given.
_ENVIRONMENT = {"connect_timeout": "PGCONNECT_TIMEOUT"}
# The libpq version that brought each parameter (tcp_user_timeout: 12).
_SINCE = {"tcp_user_timeout": 120000}

#: How long the pool waits for the answer to its liveness check, seconds. The
#: answer of a live server takes a millisecond; one that has not answered by
#: then is treated as gone, and only that connection is lost.
CHECK_TIMEOUT = 5.0

#: How long the pool waits for the answer to a session reset it sent when the
#: connection was returned (seconds). It is normally there already.
RESET_ANSWER_TIMEOUT = 5.0


def with_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` for ``psycopg2.connect()``, with :data:`CONNECTION_DEFAULTS` where unset."""
    given = set(kwargs)
    dsn = kwargs.get("dsn")
    if isinstance(dsn, str) and dsn:
        with suppress(psycopg2.Error):
            given.update(psycopg2.extensions.parse_dsn(dsn))
    version = psycopg2.extensions.libpq_version()
    defaults = {
        key: value
        for key, value in CONNECTION_DEFAULTS.items()
        if key not in given
        and not os.environ.get(_ENVIRONMENT.get(key, ""))
        and version >= _SINCE.get(key, 0)
    }
    return {**defaults, **kwargs}


def close_without_waiting(conn: Any) -> None:
    """Close a psycopg2 connection; never wait on its socket.

    libpq says goodbye (a Terminate message) as it closes. A socket that
    cannot take even that (its peer stopped reading) is shut down first, so
    that libpq's write fails at once instead of waiting for room.
    """
    if not conn.closed:
        with suppress(Exception):
            fd = conn.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if not poller.poll(0):
                sock = socket.socket(fileno=os.dup(fd))
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                finally:
                    sock.close()
    with suppress(Exception):  # close() of a broken connection may complain
        conn.close()
